"""Choosing inside the label budget: folds (stratified, seeded, balanced), the rules for classes
with too few images, the kNN grid against a NumPy transcription of InstDisc's vote, and an
instrumented evaluation on the digits in which no test or out-of-budget image reaches a choice."""

from __future__ import annotations

import json

import numpy as np
import pytest

import linear_probe.evaluate as evaluate_module
from cli_checks import EVAL_FAST
from linear_probe.cli import main
from linear_probe.crossval import choose, median_epoch, plan_folds, refit_epochs, stratified_folds
from linear_probe.knn_choice import candidates, fold_scores


def test_folds_are_stratified_balanced_and_seeded():
    labels = np.repeat(np.arange(4), [13, 7, 5, 22])
    folds = stratified_folds(labels, 5, seed=3)
    assert (folds >= 0).all()
    sizes = np.bincount(folds, minlength=5)
    assert sizes.max() - sizes.min() <= 1
    for class_id in range(4):  # every class spread as evenly as its count allows
        per_fold = np.bincount(folds[labels == class_id], minlength=5)
        assert per_fold.max() - per_fold.min() <= 1
    assert np.array_equal(folds, stratified_folds(labels, 5, seed=3))
    assert not np.array_equal(folds, stratified_folds(labels, 5, seed=4))


def test_single_image_classes_always_train_and_one_label_per_class_cannot_be_validated():
    labels = np.array([0, 0, 0, 1, 2, 2])
    plan = plan_folds(labels, seed=0, n_folds=5)
    assert plan.n_folds == 5 - 0 and "1 class(es) with one labelled image" in plan.rule
    for fold in plan.folds:
        assert 3 in fold.train and 3 not in fold.val  # the only image of class 1
        assert set(labels[fold.train]) == {0, 1, 2}  # every class can be learnt in every fold
        assert sorted(np.concatenate([fold.train, fold.val]).tolist()) == list(range(6))
    assert plan_folds(np.arange(10), seed=0) is None  # one label per class: fixed settings instead


def test_folds_are_scored_until_enough_held_out_predictions():
    many = np.repeat(np.arange(10), 5_000)
    assert len(plan_folds(many, seed=0).folds) == 1  # 10,000 held out in one fold
    few = np.repeat(np.arange(10), 10)
    assert len(plan_folds(few, seed=0).folds) == 5


def test_choose_prefers_the_best_mean_and_the_earlier_candidate_on_a_tie():
    assert choose(["a", "b", "c"], [[0.5, 0.7, 0.7], [0.5, 0.6, 0.6]])[0] == "b"
    assert median_epoch([9, 3, 5, 7]) == 5 and median_epoch([4]) == 4


def test_the_refit_keeps_the_folds_number_of_steps():
    # a fold of 4,000 of 5,000 images best at epoch 28 took 112,000 image-steps: 22.4 epochs of 5,000
    assert refit_epochs([28], [4000], 5000) == 22
    # every fold scaled, then the median (lower middle); never below one epoch
    assert refit_epochs([10, 20, 30, 40], [80, 80, 80, 80], 100) == 16
    assert refit_epochs([1], [2], 10) == 1


def test_knn_grid_scores_match_instdisc_votes_in_numpy(rng):
    train = rng.normal(size=(60, 8)).astype(np.float32)
    train_labels = rng.integers(0, 3, 60)
    val = rng.normal(size=(25, 8)).astype(np.float32)
    val_labels = rng.integers(0, 3, 25)
    pairs = candidates(60)
    assert (200, 0.1) not in pairs and (50, 0.2) in pairs  # k above the training images is dropped
    scores = fold_scores(train, train_labels, val, val_labels, 3, pairs, backend="torch")
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    similarity = unit(val) @ unit(train).T
    for (k, temperature), score in zip(pairs, scores):
        order = np.argsort(-similarity, axis=1)[:, :k]
        votes = np.zeros((25, 3))
        for query in range(25):
            for neighbour in order[query]:
                votes[query, train_labels[neighbour]] += np.exp(similarity[query, neighbour] / temperature)
        assert score == pytest.approx(np.mean(votes.argmax(axis=1) == val_labels))


def test_no_test_or_out_of_budget_image_reaches_a_choice(random_checkpoint, digits_folders, tmp_path, monkeypatch):
    """Every image a fold trains or validates on is inside that budget's labelled subset."""
    seen = {"subsets": [], "leaks": []}
    draw, folds_of = evaluate_module.draw_labelled, evaluate_module.image_folds

    def recording_draw(context, budget, seed):
        labelled = draw(context, budget, seed)
        seen["subsets"].append(set(labelled.indices.tolist()))
        return labelled

    def checking_folds(context, plan, labelled):
        folds = folds_of(context, plan, labelled)
        inside = seen["subsets"][-1]
        for fold_train, fold_val in folds:
            assert fold_train.source is labelled.source and fold_val.source is labelled.source
            outside = (set(fold_train.indices.tolist()) | set(fold_val.indices.tolist())) - inside
            seen["leaks"].append(len(outside))
        return folds

    monkeypatch.setattr(evaluate_module, "draw_labelled", recording_draw)
    monkeypatch.setattr(evaluate_module, "image_folds", checking_folds)
    train, test = digits_folders
    out = tmp_path / "eval"
    assert main(["--checkpoint", str(random_checkpoint), "--train", str(train), "--test", str(test), "--out", str(out),
                 "--methods", "knn,logreg,linear,finetune", "--label-fractions", "0.1", "--seeds", "1", "--no-plots",
                 "--no-leak-check", "--finetune-max-fraction", "1.0"] + EVAL_FAST) == 0
    assert seen["leaks"] and not any(seen["leaks"])
    results = json.loads((out / "results.json").read_text())
    assert results["data"]["n_val"] == 0  # nothing held out of the pool: the budget is all there is
    for row in results["rows"]:
        assert row["validation"]["protocol"] == "cv" and row["validation"]["n_val"] == 0
    knn = next(row for row in results["rows"] if row["method"] == "knn" and row["features"] == "ssl")
    assert knn["chosen"]["k"] in (5, 10, 20, 50, 100, 200) and "val_top1_by_k_T" in knn["chosen"]
    report = (out / "results.md").read_text()
    assert "inside each label budget" in report and "ssl-finetune --checkpoint" in report
    assert "--validation none" in report


def test_the_classifier_command_takes_the_median_of_the_seeds_epochs_and_says_so():
    from linear_probe.report import best_classifier, classifier_command

    def row(method, seed, top1, epochs):
        return {"method": method, "features": "ssl", "label_budget": "10/class", "seed": seed, "top1": top1,
                "n_train": 100, "chosen": {"epochs": epochs}}

    rows = [row("linear", 0, 0.70, 9), row("linear", 1, 0.66, 4), row("linear", 2, 0.67, 5),
            row("finetune", 0, 0.60, 30), row("finetune", 1, 0.61, 30), row("finetune", 2, 0.62, 30)]
    best = best_classifier(rows)
    assert (best["method"], best["epochs"], best["seed_epochs"]) == ("linear", 5, [9, 4, 5])
    text = classifier_command(rows, {"data": {"train": "DATA"}, "checkpoint": {"path": "RUN"}, "settings": {}})
    assert "--mode linear --epochs 5" in text and "(9, 4, 5)" in text and "median" in text
    same = [row("linear", seed, 0.7, 6) for seed in range(3)]
    assert "median" not in classifier_command(same, {"data": {"train": "DATA"}, "settings": {}})
