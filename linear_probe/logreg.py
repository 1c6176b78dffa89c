"""Multinomial logistic regression on standardised frozen features (scikit-learn).

The regularisation strength C is chosen on held-out labelled images, then the test set is scored
once. By default (``evaluate_logreg_folds`` with a ``cv`` plan) they are folds of the labelled
subset itself and the chosen C is refit on all of it (``linear_probe.crossval``). With the
``pool`` protocol (``evaluate_logreg``) they are a validation split outside the budget, and the
model fit on the labelled subset alone is scored: it is *not* refit on train + val, which would
break the label budget (a "1%" run would learn from 1% + 10% of the labels).
"""

from __future__ import annotations

import copy
import logging
import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from linear_probe.crossval import FIXED
from linear_probe.errors import EvaluationError
from linear_probe.scoring import ProbeResult, score_test, topk_accuracy

log = logging.getLogger(__name__)

DEFAULT_C_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
"""Inverse regularisation strengths tried, strongest first (a tie goes to the stronger one): few
labels want small C, all labels of a large set want large C."""
GRID_PATIENCE = 2
"""Stop the grid after this many C values in a row below the best validation score: accuracy
rises then falls along C, and the weakly regularised fits at the end are the slow ones."""
SMALL_PROBLEM = 1 << 22
"""Training matrices with fewer values than this (e.g. 8,000 x 512) are fit on one BLAS thread:
lbfgs then makes many small matrix products, for which threads that spin while they wait cost
more than they give (far more on a busy machine). Larger ones use every core."""


def _class_scores(model: LogisticRegression, features: np.ndarray, num_classes: int) -> np.ndarray:
    """``(Q, num_classes)`` probabilities; classes absent from the fit get zero."""
    scores = np.zeros((len(features), num_classes), dtype=np.float64)
    scores[:, model.classes_] = model.predict_proba(features)
    return scores


def _fit(model: LogisticRegression, features: np.ndarray, labels: np.ndarray, c: float) -> LogisticRegression:
    """Refit ``model`` with a new C, starting from its current weights (``warm_start``)."""
    model.set_params(C=c)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(features, labels)
    if any(issubclass(w.category, ConvergenceWarning) for w in caught):
        log.info("logistic regression with C=%g stopped at max_iter=%d before converging", c, model.max_iter)
    return model


def evaluate_logreg(train_features: np.ndarray, train_labels: np.ndarray, val_features: np.ndarray,
                    val_labels: np.ndarray, test_features: np.ndarray, test_labels: np.ndarray,
                    num_classes: int, c_grid=DEFAULT_C_GRID, max_iter: int = 300,
                    seed: int = 0) -> ProbeResult:
    """Fit one model per C on standardised train features, keep the best on validation, score
    it once on test (the ``pool`` protocol: the validation images are outside the budget).

    Args:
        train_features: ``(N, D)`` features of the labelled subset; ``train_labels``: ``(N,)``.
        val_features, val_labels: ``(V, D)`` / ``(V,)``, used only to choose C.
        test_features, test_labels: ``(Q, D)`` / ``(Q,)``.
        num_classes: columns of the score matrix (classes missing from train score zero).
        c_grid: C values to try, in increasing order (see ``GRID_PATIENCE``).
        max_iter: lbfgs iterations per C; a fit stopped there is used as it is (and logged).

    Returns:
        ``ProbeResult`` with ``chosen = {"C": ...}`` and the validation top-1 of that C.
    """
    if len(val_labels) == 0:
        raise EvaluationError("logistic regression chooses C on validation data, and the validation split is empty")
    folds = [(np.arange(len(train_labels)), val_features, val_labels)]
    return evaluate_logreg_folds(train_features, train_labels, test_features, test_labels, num_classes, folds,
                                 refit=False, c_grid=c_grid, max_iter=max_iter, seed=seed)


def evaluate_logreg_folds(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray,
                          test_labels: np.ndarray, num_classes: int, folds, refit: bool = True,
                          c_grid=DEFAULT_C_GRID, max_iter: int = 300, seed: int = 0) -> ProbeResult:
    """Choose C by the mean validation top-1 over ``folds``, score the test set once.

    Args:
        train_features, train_labels: ``(N, D)`` / ``(N,)``: every labelled image of the budget.
        folds: ``[(train positions into train_features, val features, val labels)]``; empty when
            nothing can be validated (C is then ``crossval.FIXED["C"]``).
        refit: fit the chosen C on all ``N`` images (cross-validation); else the first fold's
            model, which must train on all ``N``, is the one scored (the ``pool`` protocol).

    The scaler is fit on all ``N`` labelled features (no label is read) and shared by the folds,
    so the refit starts from the best fold's weights (``warm_start``): nearly free.
    """
    if len(np.unique(train_labels)) < 2:
        raise EvaluationError("logistic regression needs labelled images of at least two classes")
    # Standardising makes one C grid fit features of any scale (pixels, ResNet-50 features).
    scaler = StandardScaler().fit(train_features)
    train_scaled = scaler.transform(train_features)
    parts = [(positions, scaler.transform(val_features), val_labels) for positions, val_features, val_labels in folds]
    with threadpool_limits(limits=1 if train_scaled.size < SMALL_PROBLEM else None):
        if parts:
            best_c, best_val, best_models, means = _choose_c(parts, train_scaled, train_labels, num_classes,
                                                             c_grid, max_iter, seed)
        else:
            best_c, best_val, best_models, means = FIXED["C"], None, [], {}
        if refit or not best_models:
            # from the best fold's weights where its classes are all there (same coefficient shape)
            full = np.unique(train_labels)
            model = next((copy.deepcopy(m) for m in best_models if np.array_equal(m.classes_, full)),
                         LogisticRegression(max_iter=max_iter, random_state=seed, warm_start=True))
            best_model = _fit(model, train_scaled, train_labels, best_c)
        else:
            best_model = best_models[0]
    test_scores = _class_scores(best_model, scaler.transform(test_features), num_classes)
    chosen = {"C": best_c, **({"val_top1_by_C": means} if len(parts) > 1 else {})}
    return score_test(test_scores, test_labels, chosen, val_top1=best_val)


def _choose_c(parts, train_scaled, train_labels, num_classes, c_grid, max_iter, seed):
    """Along the increasing C grid, one warm-started model per fold; the C of the best mean
    validation top-1 (``GRID_PATIENCE`` Cs in a row below it end the grid)."""
    models = [LogisticRegression(max_iter=max_iter, random_state=seed, warm_start=True) for _ in parts]
    best_models, best_c, best_val, worse, means = [], None, -1.0, 0, {}
    for c in sorted(c_grid):
        scores = []
        for model, (positions, val_scaled, val_labels) in zip(models, parts):
            _fit(model, train_scaled[positions], train_labels[positions], c)
            scores.append(topk_accuracy(_class_scores(model, val_scaled, num_classes), val_labels, 1))
        means[f"{c:g}"] = mean = float(np.mean(scores))
        if mean > best_val:
            best_models, best_c, best_val, worse = [copy.deepcopy(m) for m in models], c, mean, 0
        elif (worse := worse + 1) >= GRID_PATIENCE:
            break
    return best_c, best_val, best_models, means
