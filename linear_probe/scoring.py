"""Scoring on the test set, shared by every method: top-k accuracy and the result of one probe."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


def topk_accuracy(scores, labels, k: int) -> float:
    """Share of rows whose true class is among the ``k`` highest scores.

    Ties are broken towards the lower class index (a stable sort), so the answer is deterministic
    and never flatters a row whose scores are all equal. ``k`` larger than the number of classes
    counts every row as correct.

    Args:
        scores: ``(Q, C)`` class scores (NumPy or torch), higher is better.
        labels: ``(Q,)`` true classes.
    """
    scores = np.asarray(scores.detach().cpu() if hasattr(scores, "detach") else scores)
    labels = np.asarray(labels.detach().cpu() if hasattr(labels, "detach") else labels)
    if len(labels) == 0:
        return float("nan")
    k = min(k, scores.shape[1])
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return float((top == labels[:, None]).any(axis=1).mean())


@dataclass
class ProbeResult:
    """What one method scored on the test set, once, with what validation chose.

    Attributes:
        top1, top5: test accuracies in [0, 1].
        predictions: ``(Q,)`` predicted class of every test image (for the confusion matrix).
        chosen: hyper-parameters picked on validation (``C``, ``best_epoch``...) or fixed by the
            protocol (``k``, ``temperature``).
        val_top1: validation top-1 of the chosen setting, or None when nothing was chosen.
    """

    top1: float
    top5: float
    predictions: np.ndarray
    chosen: dict[str, Any] = field(default_factory=dict)
    val_top1: float | None = None


def score_test(scores: np.ndarray, labels: np.ndarray, chosen: dict, val_top1: float | None = None) -> ProbeResult:
    """A ``ProbeResult`` from ``(Q, C)`` test scores; the only place test labels are compared."""
    predictions = np.argsort(-scores, axis=1, kind="stable")[:, 0]
    return ProbeResult(
        top1=topk_accuracy(scores, labels, 1),
        top5=topk_accuracy(scores, labels, 5),
        predictions=predictions.astype(np.int64),
        chosen=chosen,
        val_top1=val_top1,
    )
