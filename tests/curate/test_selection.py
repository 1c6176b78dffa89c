"""Cold-start selection (``ssl_curate.selection``, ``ssl-select``, ``linear-probe --label-selection``)
on real digits: the strategies against slow transcriptions and against random, the command line
end to end, and every bad input as one line."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits

from linear_probe.cli import main as probe_main
from linear_probe.splits import LabelBudget, sample_label_subset, uniform_label_subset
from ssl_curate.select_cli import main as select_main
from ssl_curate.selection import STRATEGIES, SelectionError, kcenter_greedy, select, select_indices, typicality

from digit_files import write_digit_images
from cli_checks import EVAL_FAST as FAST, assert_one_line_error


@pytest.fixture(scope="module")
def digits():
    """``(features, labels)``: the 1,797 digits as standardised 64-d pixels, L2-normalised."""
    data = load_digits()
    features = (data.data - data.data.mean(0)) / (data.data.std(0) + 1e-6)
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    return features.astype(np.float32), data.target


def covering_radius(features: np.ndarray, chosen: np.ndarray) -> float:
    """The largest distance from any row to its nearest chosen row."""
    distances = np.linalg.norm(features[:, None, :] - features[None, chosen, :], axis=2)
    return float(distances.min(axis=1).max())


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_gives_budget_unique_indices_deterministically(digits, strategy):
    features, _ = digits
    for budget in (1, 10, 37):
        chosen = select_indices(features, budget, strategy, seed=3)
        assert len(chosen) == budget and len(np.unique(chosen)) == budget
        assert chosen.min() >= 0 and chosen.max() < len(features)
        np.testing.assert_array_equal(chosen, select_indices(features, budget, strategy, seed=3))
    assert not np.array_equal(select_indices(features, 10, strategy, seed=0),
                              select_indices(features, 10, strategy, seed=1))


def test_a_budget_of_every_image_and_more_picks_than_clusters(digits):
    features, _ = digits
    small = features[:40]  # typiclust caps clusters at 40 / 5 = 8, so picks repeat clusters
    for strategy in STRATEGIES:
        assert sorted(select_indices(small, 40, strategy, seed=0)) == list(range(40))
    picked = select(small, 20, "typiclust", seed=0)
    counts = np.bincount(picked.clusters)
    counts = counts[counts > 0]  # clusters under 5 points are skipped while others are left
    assert counts.max() - counts.min() <= 1  # the cluster with the fewest picks goes next


def naive_kcenter(features: np.ndarray, first: int, budget: int) -> list[int]:
    """Sener & Savarese's k-center greedy, word for word: all pairwise distances, then argmax of
    the distance to the nearest chosen centre."""
    distances = np.linalg.norm(features[:, None, :].astype(np.float64) - features[None, :, :], axis=2)
    chosen = [first]
    for _ in range(budget - 1):
        chosen.append(int(np.argmax(distances[:, chosen].min(axis=1))))
    return chosen


def test_kcenter_greedy_matches_the_brute_force_transcription(digits):
    features, _ = digits
    small = features[:150]
    indices, radii = kcenter_greedy(small, 25, seed=4)
    assert indices.tolist() == naive_kcenter(small, int(indices[0]), 25)
    # Each pick's distance is the covering radius just before it, so it never grows.
    assert np.isinf(radii[0]) and np.all(np.diff(radii[1:]) <= 1e-6)
    np.testing.assert_allclose(radii[-1], covering_radius(small, indices[:-1]), rtol=1e-5)


def test_kcenter_covers_digits_better_than_random(digits):
    features, _ = digits
    for seed in range(3):
        kcenter = covering_radius(features, select_indices(features, 20, "kcenter", seed))
        random = covering_radius(features, select_indices(features, 20, "random", seed))
        assert kcenter <= random


def test_typicality_matches_the_definition(digits):
    features, _ = digits
    rows = features[:60]
    distances = np.linalg.norm(rows[:, None, :] - rows[None, :, :], axis=2)
    nearest = np.sort(distances, axis=1)[:, 1:21]  # 20 neighbours, the row itself excluded
    np.testing.assert_allclose(typicality(rows), 1.0 / nearest.mean(axis=1), rtol=1e-4)


def test_typiclust_picks_one_typical_point_per_cluster_and_covers_more_classes_than_random(digits):
    features, labels = digits
    picked = select(features, 10, "typiclust", seed=0)
    assert len(np.unique(picked.clusters)) == 10 and np.all(picked.scores > 0)
    covered = {strategy: np.mean([len(np.unique(labels[select_indices(features, 10, strategy, seed)]))
                                  for seed in range(10)]) for strategy in ("typiclust", "random")}
    # Measured: 7.8 against 6.8 classes of 10 (5 seeds); random covers ~6.5 in expectation.
    assert covered["typiclust"] > covered["random"] + 0.5, covered


def test_bad_budget_or_strategy_is_one_clear_error(digits):
    features, _ = digits
    with pytest.raises(SelectionError, match="typiclust, kcenter, kmeans, random"):
        select_indices(features, 10, "margin", 0)
    for budget in (0, -1, len(features) + 1):
        with pytest.raises(SelectionError, match="budget must be between 1 and the number of images"):
            select_indices(features, budget, "kcenter", 0)


# ---------------------------------------------------------------------------------------------
# ssl-select


@pytest.fixture(scope="module")
def inbox(tmp_path_factory) -> Path:
    """120 real digits as PNG files in one folder, plus one file that is not an image."""
    folder = tmp_path_factory.mktemp("inbox")
    write_digit_images(folder, 120, with_classes=False)
    (folder / "broken.png").write_bytes(b"not a png at all")
    return folder


def test_ssl_select_writes_the_list_csv_and_grid(random_checkpoint, inbox, tmp_path, caplog):
    caplog.set_level("INFO")
    out = tmp_path / "picked" / "to_label.txt"
    argv = ["--checkpoint", str(random_checkpoint), "--data", str(inbox), "--budget", "12",
            "--strategy", "typiclust", "--seed", "1", "--out", str(out)]
    assert select_main(argv + ["--quiet"]) == 0
    paths = out.read_text().splitlines()
    assert len(paths) == 12 == len(set(paths)) and all(Path(path).is_file() for path in paths)
    assert not any(path.endswith("broken.png") for path in paths)
    with open(out.with_suffix(".csv"), newline="") as file:
        rows = list(csv.DictReader(file))
    assert [row["path"] for row in rows] == paths and all(float(row["typicality"]) > 0 for row in rows)
    assert out.with_suffix(".png").stat().st_size > 0
    assert select_main(argv + ["--overwrite", "--no-plot"]) == 0  # same seed, same list
    assert out.read_text().splitlines() == paths
    assert "1 of 121 images could not be read" in caplog.text  # the broken file is counted in the log
    assert "1 unreadable skipped" in caplog.text


def test_ssl_select_bad_inputs_are_one_line_and_write_nothing(random_checkpoint, inbox, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    existing = tmp_path / "existing.txt"
    existing.write_text("keep me\n")
    base = ["--checkpoint", str(random_checkpoint), "--data", str(inbox), "--budget", "5", "--quiet"]
    cases = [
        (["--checkpoint", str(tmp_path / "no-run"), "--data", str(inbox), "--budget", "5"], "no-run"),
        (["--checkpoint", str(random_checkpoint), "--data", str(empty), "--budget", "5"], str(empty)),
        (base[:4] + ["--budget", "121"], "more than the 120 readable images"),
        (base[:4] + ["--budget", "0"], "at least 1"),
        (base + ["--strategy", "margin"], "typiclust, kcenter, kmeans, random"),
    ]
    for argv, fragment in cases:
        out = tmp_path / "out" / "to_label.txt"
        assert_one_line_error(capsys, select_main(argv + ["--out", str(out), "--quiet"]), fragment, prog="ssl-select")
        assert not out.parent.exists() or not any(out.parent.iterdir())
    assert_one_line_error(capsys, select_main(base + ["--out", str(existing)]), "--overwrite", prog="ssl-select")
    assert existing.read_text() == "keep me\n"


# ---------------------------------------------------------------------------------------------
# linear-probe --label-selection


def test_linear_probe_with_typiclust_label_selection(random_checkpoint, digits_folders, tmp_path):
    train, test = digits_folders
    out = tmp_path / "eval"
    argv = ["--checkpoint", str(random_checkpoint), "--train", str(train), "--test", str(test), "--out", str(out),
            "--methods", "knn,logreg,linear", "--label-fractions", "2pc,0.1", "--seeds", "2",
            "--label-selection", "typiclust", "--no-plots"] + FAST
    assert probe_main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["label_selection"] == "typiclust"
    rows = results["rows"]
    assert rows and all(row["label_selection"] == "typiclust" for row in rows)
    assert {row["features"] for row in rows} == {"ssl", "random_init", "pixels"}
    pool = results["data"]["n_pool"]
    for budget, expected in (("2/class", 20), ("10%", round(0.1 * pool))):
        # Every method and kind of features learns from the same number of selected images.
        assert {row["n_train"] for row in rows if row["label_budget"] == budget} == {expected}


def test_uniform_selection_reads_no_label_and_follows_the_pool():
    # 900 images of class 0, 100 of class 1: 50 per class buys 100 images; a uniform pick takes
    # them in the pool's proportions (about 90 / 10), the class-balanced sample 50 / 50.
    labels = np.repeat([0, 1], [900, 100])
    budget = LabelBudget(per_class=50)
    picks = [uniform_label_subset(len(labels), budget, 2, seed) for seed in range(200)]
    assert all(len(pick) == 100 and len(np.unique(pick)) == 100 and np.all(np.diff(pick) > 0) for pick in picks)
    assert np.array_equal(picks[0], uniform_label_subset(len(labels), budget, 2, 0))  # seeded
    assert not np.array_equal(picks[0], picks[1])
    minority = np.mean([np.sum(labels[pick] == 1) for pick in picks])
    assert abs(minority - 10) < 1.0  # hypergeometric mean 10, standard error of the mean about 0.2
    assert np.sum(labels[sample_label_subset(labels, budget, 0)] == 1) == 50
    assert len(uniform_label_subset(30, LabelBudget(fraction=0.1), 2, 0)) == 3


def test_linear_probe_with_a_uniform_pick(random_checkpoint, digits_folders, tmp_path):
    train, test = digits_folders
    out = tmp_path / "eval"
    argv = ["--checkpoint", str(random_checkpoint), "--train", str(train), "--test", str(test), "--out", str(out),
            "--methods", "knn,logreg", "--label-fractions", "3pc", "--seeds", "2", "--label-selection", "uniform",
            "--no-plots", "--no-baselines"] + FAST
    assert probe_main(argv) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert rows and {row["n_train"] for row in rows} == {30} and {row["label_selection"] for row in rows} == {"uniform"}


def test_fine_tuning_alone_on_a_selected_subset(random_checkpoint, digits_folders, tmp_path):
    # No feature method and no plots: the selection still has the ssl embeddings it reads.
    train, test = digits_folders
    out = tmp_path / "eval"
    argv = ["--checkpoint", str(random_checkpoint), "--train", str(train), "--test", str(test), "--out", str(out),
            "--methods", "finetune", "--label-fractions", "0.1", "--seeds", "1", "--label-selection", "kmeans",
            "--no-plots"] + FAST
    assert probe_main(argv) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert {row["features"] for row in rows} == {"ssl", "scratch"} and len({row["n_train"] for row in rows}) == 1


def test_a_selection_of_one_class_skips_logreg_with_a_reason(random_checkpoint, digits_folders, tmp_path, caplog):
    train, test = digits_folders
    out = tmp_path / "eval"
    argv = ["--checkpoint", str(random_checkpoint), "--train", str(train), "--test", str(test), "--out", str(out),
            "--methods", "knn,logreg,linear", "--label-fractions", "0.003", "--seeds", "1",
            "--label-selection", "kcenter", "--no-plots", "--no-baselines"] + FAST
    with caplog.at_level("WARNING"):
        assert probe_main(argv) == 0  # 0.3% of 270 images: a single labelled image
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert sorted(row["method"] for row in rows) == ["knn", "linear"]
    assert all(row["n_train"] == 1 for row in rows)
    assert "logreg skipped" in caplog.text and "at least two classes" in caplog.text


def test_a_protocol_where_every_run_is_skipped_is_one_line(random_checkpoint, digits_folders, tmp_path, capsys):
    train, test = digits_folders
    argv = ["--checkpoint", str(random_checkpoint), "--train", str(train), "--test", str(test),
            "--out", str(tmp_path / "eval"), "--methods", "logreg", "--label-fractions", "0.003", "--seeds", "1",
            "--label-selection", "typiclust", "--no-plots"] + FAST
    assert_one_line_error(capsys, probe_main(argv), "every run was skipped")
    assert not (tmp_path / "eval" / "results.json").exists()


def test_unknown_label_selection_is_refused(random_checkpoint, digits_folders, tmp_path, capsys):
    train, test = digits_folders
    with pytest.raises(SystemExit) as exit_info:  # argparse's choices: its one-line usage error
        probe_main(["--checkpoint", str(random_checkpoint), "--train", str(train), "--test", str(test),
                    "--out", str(tmp_path / "eval"), "--label-selection", "margin"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'margin'" in capsys.readouterr().err
