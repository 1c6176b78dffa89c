"""Scoring on the test set, shared by every method: the result of one probe and its metrics."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from linear_probe.metrics import classification_metrics, predict, to_numpy, topk_accuracy

__all__ = ["ProbeResult", "score_test", "topk_accuracy"]  # topk_accuracy lives in metrics, kept here for callers


@dataclass
class ProbeResult:
    """What one method scored on the test set, once, with what validation chose.

    Attributes:
        top1: test top-1 accuracy in [0, 1].
        top5: test top-5 accuracy in [0, 1], or None with 5 classes or fewer (always 1 there).
        predictions: ``(Q,)`` predicted class of every test image (for the confusion matrix).
        chosen: hyper-parameters picked on validation (``C``, ``best_epoch``...) or fixed by the
            protocol (``k``, ``temperature``).
        val_top1: validation top-1 of the chosen setting, or None when nothing was chosen.
        metrics: ``linear_probe.metrics.classification_metrics`` of the test scores: balanced
            accuracy, macro-F1, ROC AUC and per-class figures beside top-1 / top-5.
    """

    top1: float
    top5: float | None
    predictions: np.ndarray
    chosen: dict[str, Any] = field(default_factory=dict)
    val_top1: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)


def score_test(scores: np.ndarray, labels: np.ndarray, chosen: dict, val_top1: float | None = None,
               num_classes: int | None = None, class_names: list[str] | None = None) -> ProbeResult:
    """A ``ProbeResult`` from test scores; the only place test labels are compared.

    Args:
        scores: ``(Q, C)`` class scores (NumPy or torch), higher means more likely.
        labels: ``(Q,)`` true classes.
        chosen, val_top1: stored as they are in the result.
        num_classes: classes of the task; ``C`` (the columns of ``scores``) when None.
        class_names: names for the per-class metrics; class indices when None.
    """
    scores, labels = to_numpy(scores), to_numpy(labels)
    metrics = classification_metrics(scores, labels, num_classes or scores.shape[1], class_names)
    return ProbeResult(
        top1=topk_accuracy(scores, labels, 1),  # NaN, not None, on an empty test set, as before
        top5=metrics["top5"],
        predictions=predict(scores),
        chosen=chosen,
        val_top1=val_top1,
        metrics=metrics,
    )
