"""Metrics for imbalanced and few-class tasks, checked against slow NumPy transcriptions of their
definitions on real digits, and the report that shows them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

from linear_probe.logreg import evaluate_logreg
from linear_probe.metrics import classification_metrics
from linear_probe.report import format_markdown, format_table, make_row, summarise, write_report
from linear_probe.scoring import score_test
from linear_probe.splits import LabelBudget


def weak_digit_split():
    """Only the top two pixel rows of each digit (16 of 64 values): a classifier that is right
    about 60% of the time, so the metrics have errors to count rather than a wall of 1.0s."""
    digits = load_digits()
    return train_test_split(digits.data[:, :16], digits.target, test_size=0.3, stratify=digits.target, random_state=0)


@pytest.fixture(scope="module")
def ten_class_probabilities() -> tuple[np.ndarray, np.ndarray]:
    """``(Q, 10)`` logistic-regression probabilities on held-out digits and their ``(Q,)`` labels."""
    train_x, test_x, train_y, test_y = weak_digit_split()
    model = LogisticRegression(max_iter=2000).fit(train_x, train_y)
    return model.predict_proba(test_x), test_y


@pytest.fixture(scope="module")
def zero_vs_rest_probabilities() -> tuple[np.ndarray, np.ndarray]:
    """``(Q, 2)`` probabilities of "digit 0 vs rest" (about 1 : 9) and the ``(Q,)`` 0/1 labels."""
    train_x, test_x, train_y, test_y = weak_digit_split()
    model = LogisticRegression(max_iter=2000).fit(train_x, (train_y == 0).astype(int))
    return model.predict_proba(test_x), (test_y == 0).astype(int)


def mann_whitney_auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """AUC as the Mann-Whitney U statistic: the share of (positive, negative) pairs that the
    scores order correctly, a tie counting one half."""
    wins = (positive[:, None] > negative[None, :]).sum()
    ties = (positive[:, None] == negative[None, :]).sum()
    return float((wins + 0.5 * ties) / (len(positive) * len(negative)))


def counts(labels: np.ndarray, predictions: np.ndarray, c: int) -> tuple[int, int, int]:
    """True positives, false positives and false negatives of class ``c``."""
    return (int(((predictions == c) & (labels == c)).sum()), int(((predictions == c) & (labels != c)).sum()),
            int(((predictions != c) & (labels == c)).sum()))


def test_binary_auc_is_the_mann_whitney_statistic_of_the_positive_class(zero_vs_rest_probabilities):
    probabilities, labels = zero_vs_rest_probabilities
    metrics = classification_metrics(probabilities, labels, num_classes=2)
    expected = mann_whitney_auc(probabilities[labels == 1, 1], probabilities[labels == 0, 1])
    assert 0.8 < expected < 0.99  # informative, not perfect: the comparison means something
    assert metrics["roc_auc"] == pytest.approx(expected, abs=1e-12)
    # Rank based: log-probabilities (scores that are not probabilities) give the same AUC.
    assert classification_metrics(np.log(probabilities), labels, 2)["roc_auc"] == pytest.approx(expected, abs=1e-12)


def test_multiclass_auc_is_the_mean_one_vs_rest_mann_whitney_statistic(ten_class_probabilities):
    probabilities, labels = ten_class_probabilities
    expected = np.mean([mann_whitney_auc(probabilities[labels == c, c], probabilities[labels != c, c])
                        for c in range(10)])
    assert 0.8 < expected < 0.99
    assert classification_metrics(probabilities, labels, 10)["roc_auc"] == pytest.approx(expected, abs=1e-12)
    # Logits are log-probabilities plus a per-row constant (the log of softmax's normaliser): rows
    # that do not sum to 1, which scikit-learn's multi_class="ovr" would refuse.
    logits = np.log(probabilities) + (3.0 * np.arange(len(labels)) % 5)[:, None]
    per_class = [mann_whitney_auc(logits[labels == c, c], logits[labels != c, c]) for c in range(10)]
    assert classification_metrics(logits, labels, 10)["roc_auc"] == pytest.approx(np.mean(per_class), abs=1e-12)


def test_accuracy_balanced_accuracy_and_macro_f1_match_a_count_by_hand(ten_class_probabilities):
    probabilities, labels = ten_class_probabilities
    metrics = classification_metrics(torch.from_numpy(probabilities), torch.from_numpy(labels), 10)
    predictions = probabilities.argmax(axis=1)
    recalls, f1s = [], []
    for c in range(10):
        tp, fp, fn = counts(labels, predictions, c)
        recalls.append(tp / (tp + fn))
        f1s.append(2 * tp / (2 * tp + fp + fn))
        entry = metrics["per_class"][c]
        assert entry["class"] == str(c) and entry["support"] == tp + fn
        assert entry["precision"] == pytest.approx(tp / (tp + fp)) and entry["recall"] == pytest.approx(tp / (tp + fn))
    assert 0.4 < metrics["top1"] < 0.8
    assert metrics["top1"] == pytest.approx(np.mean(predictions == labels))
    assert metrics["balanced_accuracy"] == pytest.approx(np.mean(recalls))
    assert metrics["macro_f1"] == pytest.approx(np.mean(f1s))
    assert metrics["top5"] == pytest.approx(np.mean([label in np.argsort(-row)[:5] for row, label in zip(probabilities, labels)]))


def test_balanced_accuracy_averages_only_the_classes_in_the_test_set_and_macro_f1_all_classes():
    labels, scores = np.array([0, 0, 1, 1]), np.eye(3)[[0, 0, 1, 2]]  # class 2 predicted, never true
    metrics = classification_metrics(scores, labels, 3, class_names=["cat", "dog", "fox"])
    assert metrics["balanced_accuracy"] == pytest.approx((1.0 + 0.5) / 2)
    assert metrics["macro_f1"] == pytest.approx((1.0 + 2 / 3 + 0.0) / 3)
    fox = metrics["per_class"][2]
    assert fox == {"class": "fox", "precision": 0.0, "recall": None, "f1": 0.0, "support": 0}


def test_majority_class_predictor_on_an_imbalanced_set_is_exposed():
    labels = np.array([0] * 10 + [1] * 30)  # 1 normal : 3 pneumonia
    always_pneumonia = np.tile([0.1, 0.9], (40, 1))
    metrics = classification_metrics(always_pneumonia, labels, 2, class_names=["normal", "pneumonia"])
    assert metrics["top1"] == 0.75 and metrics["balanced_accuracy"] == 0.5 and metrics["roc_auc"] == 0.5
    assert metrics["macro_f1"] == pytest.approx((0.0 + 2 * 30 / (2 * 30 + 10)) / 2)
    assert metrics["per_class"][0] == {"class": "normal", "precision": None, "recall": 0.0, "f1": 0.0, "support": 10}
    # Equal scores: the tie goes to the lower index (as top-1), the AUC stays at chance.
    tied = classification_metrics(np.ones((40, 2)), labels, 2)
    assert tied["top1"] == 0.25 and tied["balanced_accuracy"] == 0.5 and tied["roc_auc"] == 0.5
    assert classification_metrics(np.ones((40, 4)), labels, 4)["roc_auc"] == 0.5


def test_auc_is_none_with_a_single_class_in_the_test_set():
    metrics = classification_metrics(np.eye(3)[[0, 1, 2]], np.array([1, 1, 1]), 3)
    assert metrics["roc_auc"] is None and metrics["balanced_accuracy"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("num_classes, defined", [(2, False), (5, False), (6, True), (10, True)])
def test_top5_is_reported_only_with_more_than_five_classes(num_classes, defined):
    labels = np.arange(20) % num_classes
    scores = np.eye(num_classes)[labels]
    assert (classification_metrics(scores, labels, num_classes)["top5"] is not None) == defined
    assert (score_test(scores, labels, {}).top5 is not None) == defined


def test_mismatched_scores_and_class_count_are_refused():
    with pytest.raises(ValueError, match="num_classes"):
        classification_metrics(np.zeros((4, 3)), np.zeros(4, dtype=int), 4)
    with pytest.raises(ValueError, match="labels"):
        classification_metrics(np.zeros((2, 3)), np.array([0, 3]), 3)


def digit_rows(classes: list[int]) -> list[dict]:
    """``make_row`` rows of logistic regression on the digits of ``classes`` (labels renumbered
    0, 1...): raw pixels as the "ssl" features and the weak top-rows view as a baseline, 2 seeds."""
    digits = load_digits()
    keep = np.isin(digits.target, classes)
    labels = np.searchsorted(classes, digits.target[keep])
    rows = []
    for kind, features in (("ssl", digits.data[keep]), ("pixels", digits.data[keep][:, :16])):
        for seed in (0, 1):
            rest_x, test_x, rest_y, test_y = train_test_split(features, labels, test_size=0.3, stratify=labels,
                                                              random_state=seed)
            train_x, val_x, train_y, val_y = train_test_split(rest_x, rest_y, test_size=0.2, stratify=rest_y,
                                                              random_state=seed)
            result = evaluate_logreg(train_x, train_y, val_x, val_y, test_x, test_y, len(classes), seed=seed)
            rows.append(make_row(kind, "logreg", LabelBudget(fraction=1.0), seed, result, len(train_y),
                                 len(train_y), 0.1))
    return rows


def test_a_two_class_report_has_no_top5_table_but_the_imbalance_metrics():
    rows = digit_rows([3, 8])
    meta = {"data": {"train": "digits", "test": "digits", "val": "digits", "classes": ["three", "eight"]}}
    markdown = format_markdown(rows, meta)
    assert "Top-5" not in markdown
    for heading in ("## Top-1", "## Balanced accuracy", "## Macro-F1", "## ROC AUC", "## Per class"):
        assert heading in markdown, heading
    assert "| three |" in markdown and "| eight |" in markdown  # names from meta, not indices
    assert all(row["top5"] is None for row in rows) and summarise(rows, "top5") == {}
    assert "| logreg | 100% |" in format_table(rows, "top5") and "–" in format_table(rows, "top5")
    ssl = summarise(rows, "balanced_accuracy")[("logreg", "100%", "ssl")]
    assert ssl["seeds"] == 2 and ssl["mean"] > 0.9  # 3 vs 8 from all 64 pixels is easy
    # Without the class list the rows decide.
    assert "Top-5" not in format_markdown(rows, {"data": {}})


def test_a_ten_class_report_keeps_the_top5_table():
    rows = digit_rows(list(range(10)))
    markdown = format_markdown(rows, {"data": {"classes": [str(c) for c in range(10)]}})
    assert "## Top-5" in markdown and "## Balanced accuracy" in markdown
    assert "## Top-5" in format_markdown(rows, {"data": {}})
    assert all(0.0 <= row["top5"] <= 1.0 and row["top1"] <= row["top5"] for row in rows)


def test_result_rows_are_strict_json(tmp_path):
    rows = digit_rows([3, 8])
    text = json.dumps(rows, allow_nan=False)
    row = json.loads(text)[0]
    assert {"balanced_accuracy", "macro_f1", "roc_auc", "per_class"} <= set(row)
    assert [entry["class"] for entry in row["per_class"]] == ["0", "1"]
    assert sum(entry["support"] for entry in row["per_class"]) == row["n_test"]
    json_path, _ = write_report(tmp_path, rows, {"data": {"classes": ["three", "eight"]}})
    assert json.loads(json_path.read_text())["rows"][0]["roc_auc"] == row["roc_auc"]
