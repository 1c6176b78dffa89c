"""kNN's k and temperature chosen on held-out labelled images, as logistic regression's C is.

A fixed k misleads: k=200 (InstDisc's, tuned for ImageNet's 1.28 million images) on a budget of
1,200 labelled images lets a sixth of them vote on every query, and the features look worse than
raw pixels whose best k is different. Here every ``(k, T)`` of the grid is scored on the folds
(``linear_probe.crossval``) from one neighbour search per fold (the ``max k`` nearest, sorted:
each smaller k reads a prefix), and the best is used on the test set: the same rule for the
pretrained features and for every baseline.
"""

from __future__ import annotations

import numpy as np
import torch

from linear_probe.crossval import FIXED, choose
from linear_probe.knn import evaluate_knn, search_neighbours
from linear_probe.scoring import ProbeResult

K_GRID = (5, 10, 20, 50, 100, 200)
"""Neighbours tried, up to InstDisc's 200 (values above the smallest fold's training images are
dropped: they would all mean "every image votes")."""
TEMPERATURE_GRID = (0.03, 0.07, 0.1, 0.2)
"""Vote temperatures tried: DINO's 0.07 and InstDisc's 0.1 with one on either side."""


def candidates(n_train: int, k: int | None = None, temperature: float | None = None) -> list[tuple[int, float]]:
    """``(k, T)`` pairs to score, smallest k and T first; a given ``k`` or ``temperature`` is kept
    fixed. ``n_train``: the fewest training images of any fold."""
    ks = [k] if k is not None else ([value for value in K_GRID if value <= n_train] or [max(1, n_train)])
    temperatures = [temperature] if temperature is not None else list(TEMPERATURE_GRID)
    return [(value, t) for value in ks for t in temperatures]


def fold_scores(train_features, train_labels, val_features, val_labels, num_classes: int,
                pairs: list[tuple[int, float]], backend: str = "auto", device=None) -> list[float]:
    """Validation top-1 of every ``(k, T)`` in ``pairs`` from one search of the largest k."""
    k_max = min(max(k for k, _ in pairs), len(train_labels))
    similarities, indices = search_neighbours(train_features, val_features, k_max, backend=backend, device=device)
    similarities, indices = similarities.float().cpu(), indices.cpu()
    neighbour_labels = torch.as_tensor(np.asarray(train_labels), dtype=torch.int64)[indices.clamp(min=0)]
    truth = torch.as_tensor(np.asarray(val_labels), dtype=torch.int64)
    found = indices >= 0
    scores_of = []
    for k, temperature in pairs:
        k = min(k, k_max)
        votes = torch.where(found[:, :k], (similarities[:, :k] / temperature).exp(), torch.zeros(()))
        scores = torch.zeros(len(truth), num_classes).scatter_add_(1, neighbour_labels[:, :k], votes)
        scores_of.append(float((scores.argmax(dim=1) == truth).float().mean()) if len(truth) else 0.0)
    return scores_of


def evaluate_knn_folds(train_features, train_labels, test_features, test_labels, num_classes: int, folds,
                       k: int | None = None, temperature: float | None = None, **search) -> ProbeResult:
    """kNN on the test set with ``k`` and ``temperature`` chosen over ``folds`` (None: chosen).

    Args:
        train_features, train_labels: every labelled image of the budget (the test set's voters).
        folds: ``[(train positions, val features, val labels)]``; empty when nothing can be
            validated (``crossval.FIXED`` then).
        k, temperature: fixed values (``--knn-k``, ``--knn-t``, ``--knn-protocol``), not chosen.
        search: ``evaluate_knn``'s back-end options (``backend``, ``device``, ``index``...).
    """
    chosen: dict = {}
    val_top1 = None
    if k is not None and temperature is not None:
        chosen["fixed"] = True
    elif not folds:  # nothing to validate on (the caller logs it once per budget): crossval.FIXED
        chosen["fixed"] = True
        k = k if k is not None else FIXED["knn_k"]
        temperature = temperature if temperature is not None else FIXED["knn_temperature"]
    else:
        pairs = candidates(min(len(positions) for positions, _, _ in folds), k, temperature)
        per_fold = [fold_scores(train_features[positions], train_labels[positions], val_features, val_labels,
                                num_classes, pairs, search.get("backend", "auto"), search.get("device"))
                    for positions, val_features, val_labels in folds]
        (k, temperature), val_top1, means = choose(pairs, per_fold)
        chosen["val_top1_by_k_T"] = {f"{pair[0]},{pair[1]:g}": mean for pair, mean in zip(pairs, means)}
    result = evaluate_knn(train_features, train_labels, test_features, test_labels, num_classes, k=k,
                          temperature=temperature, **search)
    result.chosen.update(chosen)
    result.val_top1 = val_top1
    return result
