"""Choosing hyper-parameters inside the label budget: stratified k-fold cross-validation over the
labelled images a budget buys, then one refit on all of them.

A user with 40 labels has 40 labels: holding out a share of the *whole* labelled pool to choose C
or the number of epochs (the ``pool`` protocol) uses labels that user does not have, and makes
few-label results look better than they are (Oliver et al., NeurIPS 2018, "Realistic evaluation
of deep semi-supervised learning algorithms"). Here (the ``cv`` protocol, the default) the
labelled subset itself is split into folds; every candidate setting is scored on the held-out
fold(s); the best mean wins (ties go to the earlier, simpler candidate); the method is refit with
it on every labelled image; the test set is scored once.

Rules, each logged where it applies:

- Folds are stratified: each class's images, in a permutation seeded by ``(seed, class)``, are
  dealt round-robin over the folds, starting where the previous class stopped, so fold sizes
  differ by at most one image.
- A class with a single labelled image is never held out: with it held out its class could not be
  learnt in that fold. It trains in every fold.
- When no class has two labelled images (one label per class), nothing can be validated: the
  methods use fixed, documented settings (``FIXED``) and say so.
- Folds are scored until ``VALIDATION_PREDICTIONS`` held-out predictions are reached (all folds
  for small budgets, where a choice is noisy and fits are cheap; one fold of 10,000 images at
  50,000 labels); fine-tuning, which trains through the whole network, scores one fold
  (``TRAINING_FOLDS``): a 20% hold-out inside the budget.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

log = logging.getLogger(__name__)

PROTOCOLS = ("cv", "pool")
"""``cv``: hyper-parameters chosen by cross-validation inside the label budget (the default).
``pool``: chosen on a validation share of the whole labelled pool, outside the budget: the older
protocol, optimistic at few labels (kept to measure by how much)."""
DEFAULT_FOLDS = 5
VALIDATION_PREDICTIONS = 2_000
"""Held-out predictions the feature methods' choice rests on, at least (when the budget has them):
folds are scored until this many. Beyond it a choice's noise is small and more folds only cost."""
TRAINING_FOLDS = 1
"""Folds scored when a candidate is a training run through the network (fine-tuning): one fold of
``DEFAULT_FOLDS``, a 20% hold-out inside the budget, keeps cross-validation's cost near the pool
protocol's (BENCHMARKS.md, "Choosing inside the label budget")."""
FIXED = {"knn_k": 20, "knn_temperature": 0.07, "C": 1.0}
"""Settings used when nothing can be validated (no class has two labelled images): DINO's kNN
(k=20, T=0.07; k capped at the labelled images) and scikit-learn's default C; the linear probe
and fine-tuning run their whole epoch budget."""


@dataclass(frozen=True)
class Fold:
    """Positions into the labelled subset: what trains and what is scored."""

    train: np.ndarray
    val: np.ndarray


@dataclass(frozen=True)
class FoldPlan:
    """How one labelled subset's hyper-parameters are chosen.

    Attributes:
        folds: the scored folds (``cv``) or one fold of (labelled subset, pool validation) in
            positions of their own sources (``pool``).
        protocol: ``cv`` or ``pool``.
        n_folds: folds the subset was split into (``cv``), of which ``len(folds)`` are scored.
        refit: refit the chosen setting on the whole labelled subset (``cv``); with ``pool`` the
            model fit on the subset is the one scored.
        rule: how the folds were made, in words (results.json).
    """

    folds: tuple[Fold, ...]
    protocol: str
    n_folds: int
    refit: bool
    rule: str

    def describe(self) -> dict[str, Any]:
        return {"protocol": self.protocol, "folds": self.n_folds, "scored": len(self.folds), "rule": self.rule,
                "held_out": int(sum(len(fold.val) for fold in self.folds))}

    def limited(self, count: int) -> "FoldPlan":
        """The same plan scoring at most ``count`` folds."""
        if len(self.folds) <= count:
            return self
        return FoldPlan(self.folds[:count], self.protocol, self.n_folds, self.refit, self.rule)


def stratified_folds(labels: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """Fold of every labelled image, ``(N,)`` in ``[0, n_folds)``, or -1 for an image never held
    out (the only image of its class).

    Each class's images, in a permutation seeded by ``(seed, class)``, are dealt round-robin over
    the folds starting where the previous class stopped: every fold gets ``floor`` or ``ceil`` of
    a class's share, and fold sizes differ by at most one.
    """
    labels = np.asarray(labels)
    folds = np.full(len(labels), -1, dtype=np.int64)
    start = 0
    for class_id in np.unique(labels):
        positions = np.flatnonzero(labels == class_id)
        if len(positions) < 2:
            continue
        order = np.random.default_rng([seed, int(class_id), 7]).permutation(positions)
        folds[order] = (start + np.arange(len(order))) % n_folds
        start = (start + len(order)) % n_folds
    return folds


def plan_folds(labels: np.ndarray, seed: int, n_folds: int = DEFAULT_FOLDS,
               predictions: int = VALIDATION_PREDICTIONS) -> FoldPlan | None:
    """The ``cv`` plan of a labelled subset, or None when nothing can be validated.

    Args:
        labels: ``(N,)`` classes of the labelled subset.
        seed: the subset's seed (folds change with it, as the subset does).
        n_folds: folds to split into; fewer when fewer images can be held out.
        predictions: score folds until this many held-out predictions (``VALIDATION_PREDICTIONS``).
    """
    labels = np.asarray(labels)
    counts = np.bincount(labels) if len(labels) else np.zeros(0, np.int64)
    singles = int(np.sum(counts == 1))
    holdable = int(np.sum(counts[counts >= 2]))
    if holdable == 0:
        return None
    n_folds = max(2, min(n_folds, holdable))
    assigned = stratified_folds(labels, n_folds, seed)
    per_fold = holdable / n_folds
    scored = max(1, min(n_folds, math.ceil(predictions / per_fold)))
    everything = np.arange(len(labels))
    folds = tuple(Fold(everything[assigned != fold], everything[assigned == fold]) for fold in range(scored))
    rule = f"stratified {n_folds}-fold over the {len(labels)} labelled images, {scored} scored"
    if singles:
        rule += f"; {singles} class(es) with one labelled image train in every fold, never held out"
    return FoldPlan(folds, "cv", n_folds, True, rule)


def pool_plan(n_labelled: int, n_val: int, given: bool = False) -> FoldPlan:
    """The ``pool`` plan: train on the labelled subset, choose on the validation images (positions
    into the validation source), no refit."""
    where = "the user's validation set" if given else "a validation share of the labelled pool"
    return FoldPlan((Fold(np.arange(n_labelled), np.arange(n_val)),), "pool", 1, False,
                    f"chosen on {n_val} images of {where}, outside the label budget")


def choose(candidates: Sequence[Any], fold_scores: Sequence[Sequence[float]]) -> tuple[Any, float, list[float]]:
    """The candidate of the best mean score over folds; a tie goes to the earlier candidate.

    Args:
        candidates: settings in order of preference (simplest / most regularised first).
        fold_scores: ``[fold][candidate]`` validation scores.

    Returns:
        ``(candidate, its mean score, every candidate's mean)``.
    """
    means = np.asarray(fold_scores, dtype=np.float64).mean(axis=0)
    best = int(np.argmax(means))  # first maximum: the earlier candidate wins a tie
    return candidates[best], float(means[best]), [float(mean) for mean in means]


def median_epoch(best_epochs: Sequence[int]) -> int:
    """The epoch count a refit trains for: the median of the folds' best epochs (the lower middle
    of an even count: fewer epochs, a tie-break toward less fitting)."""
    ordered = sorted(int(epoch) for epoch in best_epochs)
    return max(1, ordered[(len(ordered) - 1) // 2])


def refit_epochs(best_epochs: Sequence[int], fold_sizes: Sequence[int], total: int) -> int:
    """The epoch count a refit on all ``total`` labelled images trains for: the same number of
    optimiser steps as the folds' best (Goodfellow, Bengio and Courville 2016, "Deep Learning",
    7.8, Algorithm 7.2: retrain on all the data "for i* steps"), each fold's best epoch scaled by
    its training part's share of the images, then the median (``median_epoch``). Keeping the steps
    rather than the epochs also keeps the refit's cost at the folds': on 5,000 images a refit of
    the same epochs would train 25% longer than the fold that chose them."""
    scaled = [round(int(epoch) * int(size) / max(int(total), 1)) for epoch, size in zip(best_epochs, fold_sizes)]
    return median_epoch(scaled)


def fold_runs(plan: FoldPlan, run: Callable[[Fold], Any]) -> list[Any]:
    """``run(fold)`` for every scored fold, in order."""
    return [run(fold) for fold in plan.folds]
