"""Multinomial logistic regression on standardised frozen features (scikit-learn).

The regularisation strength C is chosen on the validation split; the model fit on the labelled
training subset alone is then scored once on the test set. It is *not* refit on train + val: the
validation images are labelled too, and adding them would break the label budget (a "1%" run
would learn from 1% + 10% of the labels).
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
    it once on test.

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
    if len(np.unique(train_labels)) < 2:
        raise EvaluationError("logistic regression needs labelled images of at least two classes")
    if len(val_labels) == 0:
        raise EvaluationError("logistic regression chooses C on validation data, and the validation split is empty")
    # Standardising makes one C grid fit features of any scale (pixels, ResNet-50 features).
    scaler = StandardScaler().fit(train_features)
    train_scaled, val_scaled = scaler.transform(train_features), scaler.transform(val_features)
    # Along an increasing C grid each solution starts from the previous one: several times faster
    # than cold starts, same optimum (the problem is convex).
    model = LogisticRegression(max_iter=max_iter, random_state=seed, warm_start=True)  # lbfgs, multinomial
    best_model, best_c, best_val, worse = None, None, -1.0, 0
    with threadpool_limits(limits=1 if train_scaled.size < SMALL_PROBLEM else None):
        for c in sorted(c_grid):
            _fit(model, train_scaled, train_labels, c)
            val_top1 = topk_accuracy(_class_scores(model, val_scaled, num_classes), val_labels, 1)
            if val_top1 > best_val:
                best_model, best_c, best_val, worse = copy.deepcopy(model), c, val_top1, 0
            elif (worse := worse + 1) >= GRID_PATIENCE:
                break
    test_scores = _class_scores(best_model, scaler.transform(test_features), num_classes)
    return score_test(test_scores, test_labels, {"C": best_c}, val_top1=best_val)
