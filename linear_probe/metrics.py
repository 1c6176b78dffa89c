"""Test-set metrics that stay meaningful on imbalanced and few-class tasks.

Top-1 accuracy rewards predicting the most common class: on a 1 normal : 3 pneumonia test set a
classifier that always answers "pneumonia" scores 75%. Balanced accuracy (50% for it), macro-F1
and ROC AUC (50% for scores that carry no information) do not. Top-5 is only reported with more
than 5 classes, since with 5 or fewer every row is trivially correct.

Every number is a plain Python ``float`` (or ``None`` where the metric is undefined), so the
result can be written with ``json.dumps(..., allow_nan=False)``. The computations are
scikit-learn's; this module only picks the conventions and documents them.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from sklearn.metrics import balanced_accuracy_score, precision_recall_fscore_support, roc_auc_score

TOP5_ABOVE = 5  # with this many classes or fewer, top-5 accuracy is always 1


def to_numpy(values) -> np.ndarray:
    """NumPy view of a NumPy array or a (possibly CUDA) torch tensor."""
    return np.asarray(values.detach().cpu() if hasattr(values, "detach") else values)


def topk_accuracy(scores, labels, k: int) -> float:
    """Share of rows whose true class is among the ``k`` highest scores.

    Ties are broken towards the lower class index (a stable sort), so the answer is deterministic
    and never flatters a row whose scores are all equal. ``k`` larger than the number of classes
    counts every row as correct.

    Args:
        scores: ``(Q, C)`` class scores (NumPy or torch), higher is better.
        labels: ``(Q,)`` true classes.

    Returns:
        The share in [0, 1]; NaN when there are no rows.
    """
    scores, labels = to_numpy(scores), to_numpy(labels)
    if len(labels) == 0:
        return float("nan")
    k = min(k, scores.shape[1])
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return float((top == labels[:, None]).any(axis=1).mean())


def _number(value) -> float | None:
    """A JSON-safe float: ``None`` instead of NaN."""
    value = float(value)
    return None if math.isnan(value) else value


def predict(scores: np.ndarray) -> np.ndarray:
    """Highest-scoring class of each row, ties to the lower index (as ``topk_accuracy``).

    Args:
        scores: ``(Q, C)`` class scores.

    Returns:
        ``(Q,)`` int64 predicted classes.
    """
    return np.argsort(-scores, axis=1, kind="stable")[:, 0].astype(np.int64)


def roc_auc(scores: np.ndarray, labels: np.ndarray, num_classes: int) -> float | None:
    """ROC AUC from class scores, which need not be probabilities.

    Two classes: the AUC of ``scores[:, 1] - scores[:, 0]`` for the positive class (index 1). For
    logits that difference is the log-odds, for probabilities it orders rows as ``p(class 1)``
    does, and for kNN vote sums it is the vote margin; AUC depends only on that order.

    More classes: the unweighted mean over the classes present in ``labels`` of the one-vs-rest
    AUC of ``scores[:, c]``. It is computed class by class rather than with scikit-learn's
    ``multi_class="ovr"``, which insists on rows of probabilities summing to 1 (kNN votes and
    logits do not).

    Args:
        scores: ``(Q, C)`` class scores, higher means more likely.
        labels: ``(Q,)`` true classes.

    Returns:
        The AUC in [0, 1]; 0.5 for constant scores; ``None`` when fewer than two classes occur in
        ``labels`` (no positive/negative pair to rank) or a score is not finite.
    """
    present = np.unique(labels)
    if len(present) < 2 or not np.isfinite(scores).all():  # a diverged probe's NaN logits rank nothing
        return None
    if num_classes == 2:
        return _number(roc_auc_score(labels == 1, scores[:, 1] - scores[:, 0]))
    return _number(np.mean([roc_auc_score(labels == c, scores[:, c]) for c in present]))


def per_class_metrics(labels: np.ndarray, predictions: np.ndarray, class_names: list[str]) -> list[dict]:
    """Precision, recall, F1 and support of every class, in class order.

    A figure whose denominator is zero is ``None`` rather than 0: precision of a class never
    predicted, recall of a class absent from ``labels``, F1 of a class neither present nor
    predicted.

    Args:
        labels, predictions: ``(Q,)`` true and predicted classes.
        class_names: one name per class (its index when the names are unknown).
    """
    classes = range(len(class_names))
    if len(labels) == 0:  # scikit-learn refuses empty input; every figure is undefined
        return [{"class": name, "precision": None, "recall": None, "f1": None, "support": 0} for name in class_names]
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predictions, labels=classes, zero_division=0)
    predicted = np.bincount(predictions, minlength=len(class_names))
    return [{
        "class": name,
        "precision": float(precision[c]) if predicted[c] else None,
        "recall": float(recall[c]) if support[c] else None,
        "f1": float(f1[c]) if predicted[c] or support[c] else None,
        "support": int(support[c]),
    } for c, name in zip(classes, class_names)]


def _check(scores: np.ndarray, labels: np.ndarray, num_classes: int, class_names: list[str] | None) -> None:
    if scores.ndim != 2 or scores.shape != (len(labels), num_classes):
        raise ValueError(f"scores must be (Q, num_classes) = ({len(labels)}, {num_classes}), got {scores.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for {num_classes} classes")


def classification_metrics(scores, labels, num_classes: int, class_names: list[str] | None = None) -> dict:
    """Every test-set figure of one classifier: accuracy, and what fits imbalanced classes.

    Conventions:
        - ``top1``, ``top5``: share of rows whose true class is among the 1 / 5 highest scores,
          ties to the lower class index; ``top5`` is ``None`` with 5 classes or fewer.
        - ``balanced_accuracy``: mean recall over the classes present in ``labels`` (a class
          absent from the test set has no recall), as ``sklearn.metrics.balanced_accuracy_score``.
        - ``macro_f1``: mean F1 over *all* ``num_classes`` classes, scikit-learn's
          ``f1_score(labels=range(num_classes), average="macro", zero_division=0)``: a class
          neither present nor predicted counts as 0, so a test set that lacks classes lowers it.
        - ``roc_auc``: see ``roc_auc``; ``None`` when fewer than two classes are present.
        - ``per_class``: see ``per_class_metrics``.

    Args:
        scores: ``(Q, num_classes)`` class scores (NumPy or torch), higher means more likely;
            probabilities, logits and kNN vote sums all work.
        labels: ``(Q,)`` true classes in ``[0, num_classes)``.
        num_classes: number of classes of the task (columns of ``scores``).
        class_names: names for ``per_class``; ``"0"``, ``"1"``... when None.

    Returns:
        ``{"top1", "top5", "balanced_accuracy", "macro_f1", "roc_auc": float | None,
        "per_class": [{"class", "precision", "recall", "f1", "support"}, ...]}``; every figure
        is ``None`` on an empty test set.

    Raises:
        ValueError: scores, labels and class names that do not fit together.
    """
    scores, labels = to_numpy(scores).astype(np.float64), to_numpy(labels).astype(np.int64)
    _check(scores, labels, num_classes, class_names)
    class_names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
    if len(labels) == 0:
        return {"top1": None, "top5": None, "balanced_accuracy": None, "macro_f1": None, "roc_auc": None,
                "per_class": per_class_metrics(labels, labels, class_names)}
    predictions = predict(scores)
    per_class = per_class_metrics(labels, predictions, class_names)
    with warnings.catch_warnings():
        # Predicting a class absent from the test set is expected, not worth a warning: its
        # recall is undefined and left out of the mean.
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        balanced = balanced_accuracy_score(labels, predictions)
    _, _, f1, _ = precision_recall_fscore_support(labels, predictions, labels=range(num_classes), zero_division=0)
    return {
        "top1": _number(topk_accuracy(scores, labels, 1)),
        "top5": _number(topk_accuracy(scores, labels, 5)) if num_classes > TOP5_ABOVE else None,
        "balanced_accuracy": _number(balanced),
        "macro_f1": _number(f1.mean()),
        "roc_auc": roc_auc(scores, labels, num_classes),
        "per_class": per_class,
    }
