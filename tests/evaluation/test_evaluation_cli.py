"""``linear-probe`` end to end on real digits, and every bad input as a one-line error."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from linear_probe.cli import main

from cli_checks import EVAL_FAST, assert_one_line_error
from digit_files import export_random_backbone, write_digits_folder

ROOT = Path(__file__).resolve().parents[2]


def test_end_to_end_on_digit_folders_has_every_method_fraction_and_baseline(random_checkpoint, digits_folders, tmp_path, capsys):
    train, test = digits_folders
    out = tmp_path / "eval"
    argv = ["--checkpoint", str(random_checkpoint), "--train", str(train), "--test", str(test), "--out", str(out),
            "--methods", "knn,logreg,linear,finetune", "--label-fractions", "0.01,0.1,1.0", "--seeds", "2"] + EVAL_FAST
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    expected = {("knn", "ssl"), ("knn", "random_init"), ("knn", "pixels"), ("logreg", "ssl"),
                ("logreg", "random_init"), ("logreg", "pixels"), ("linear", "ssl"), ("linear", "random_init"),
                ("finetune", "ssl"), ("finetune", "scratch")}
    combos = {(row["method"], row["features"], row["label_fraction"], row["seed"]) for row in results["rows"]}
    # Fine-tuning and its scratch baseline run at the few-label budgets only (--finetune-max-fraction 0.1).
    assert combos == {(m, f, fraction, seed) for m, f in expected for fraction in (0.01, 0.1, 1.0) for seed in (0, 1)
                      if m != "finetune" or fraction <= 0.1}
    for row in results["rows"]:
        assert 0.0 <= row["top5"] <= 1.0 and row["top1"] <= row["top5"] and row["seconds"] >= 0
    one_percent = [row["n_train"] for row in results["rows"] if row["label_fraction"] == 0.01]
    assert set(one_percent) == {10}  # one image of each of the 10 classes
    assert {"torch", "scikit-learn", "faiss-cpu", "ssl-pretrain"} <= set(results["versions"])
    assert results["checkpoint"]["architecture"] == "smallconv" and set(results["data"]["fingerprints"]) == {"train", "test"}
    for name in ("results.md", "label_efficiency.png", "confusion_matrix.png", "embedding_map.png", "nearest_neighbours.png"):
        assert (out / name).stat().st_size > 0, name
    printed = capsys.readouterr().out
    assert "| knn | 1% | 10 |" in printed and "random init" in printed and "scratch" in printed


def test_builtin_digits_with_a_held_out_test_fraction_and_per_class_labels(random_checkpoint, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["--checkpoint", str(random_checkpoint / "backbone.safetensors"), "--train", "builtin:digits:all",
            "--test-fraction", "0.25", "--methods", "knn", "--label-fractions", "5pc", "--seeds", "1",
            "--knn-protocol", "dino", "--no-plots", "--out", str(out)] + EVAL_FAST
    assert main(argv) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert {row["features"] for row in rows} == {"ssl", "random_init", "pixels"}
    assert all(row["n_train"] == 50 and row["chosen"] == {"k": 20, "temperature": 0.07, "fixed": True} for row in rows)
    pixels = next(row for row in rows if row["features"] == "pixels")
    assert pixels["top1"] > 0.7  # 5 labels per class of real digits: kNN on pixels works
    cached = sorted(path.name for path in (out / "embeddings").iterdir())
    assert main(argv) == 0  # a second run reuses the cached embeddings
    assert sorted(path.name for path in (out / "embeddings").iterdir()) == cached


def test_linear_probe_through_the_frozen_backbone_from_the_cli(random_checkpoint, digits_folders, tmp_path):
    train, test = digits_folders
    argv = ["--checkpoint", str(random_checkpoint), "--train", str(train), "--test", str(test),
            "--out", str(tmp_path / "eval"), "--methods", "linear", "--linear-augment", "--label-fractions", "0.1",
            "--seeds", "1", "--no-plots", "--no-baselines", "--no-cache"] + EVAL_FAST
    assert main(argv) == 0
    rows = json.loads((tmp_path / "eval" / "results.json").read_text())["rows"]
    assert [(row["method"], row["features"]) for row in rows] == [("linear", "ssl")]


def test_a_class_with_one_image_stays_in_train_when_validation_is_split_off(random_checkpoint, tmp_path, caplog):
    train = write_digits_folder(tmp_path / "train", 6, classes=[0, 1, 2])
    for extra in sorted((train / "2").iterdir())[1:]:
        extra.unlink()
    test = write_digits_folder(tmp_path / "test", 3, offset=10, classes=[0, 1, 2])
    argv = ["--checkpoint", str(random_checkpoint), "--train", str(train), "--test", str(test), "--out",
            str(tmp_path / "eval"), "--methods", "knn,logreg", "--label-fractions", "1.0", "--seeds", "1", "--no-plots"]
    assert main(argv + ["--validation", "pool"] + EVAL_FAST) == 0
    assert "single image" in caplog.text
    # inside the budget (the default) the single image trains in every fold and is never held out
    assert main(argv + ["--out", str(tmp_path / "cv")] + EVAL_FAST) == 0
    rows = json.loads((tmp_path / "cv" / "results.json").read_text())["rows"]
    assert all("1 class(es) with one labelled image train in every fold" in row["validation"]["rule"] for row in rows)


# ---------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit status 2, no traceback


def run_args(checkpoint, train, test, tmp_path, *extra):
    argv = ["--checkpoint", str(checkpoint), "--train", str(train), "--out", str(tmp_path / "eval")]
    if test is not None:
        argv += ["--test", str(test)]
    return main(argv + ["--methods", "knn", "--seeds", "1", "--no-plots"] + EVAL_FAST + list(extra))


def test_test_folder_with_a_class_missing_from_train(random_checkpoint, tmp_path, capsys):
    train = write_digits_folder(tmp_path / "train", 3, classes=range(9))
    test = write_digits_folder(tmp_path / "test", 3, classes=range(10))
    assert_one_line_error(capsys, run_args(random_checkpoint, train, test, tmp_path), "missing from train: 9")


def test_train_folder_with_a_class_the_test_lacks(random_checkpoint, tmp_path, capsys):
    train = write_digits_folder(tmp_path / "train", 3, classes=range(10))
    test = write_digits_folder(tmp_path / "test", 3, classes=range(9))
    assert_one_line_error(capsys, run_args(random_checkpoint, train, test, tmp_path), "missing from test: 9")


def test_empty_class_folder(random_checkpoint, digits_folders, tmp_path, capsys):
    train = shutil.copytree(digits_folders[0], tmp_path / "train")
    (train / "extra").mkdir()
    assert_one_line_error(capsys, run_args(random_checkpoint, train, digits_folders[1], tmp_path), "no images: extra")


def test_missing_train_folder(random_checkpoint, digits_folders, tmp_path, capsys):
    status = run_args(random_checkpoint, tmp_path / "nowhere", digits_folders[1], tmp_path)
    assert_one_line_error(capsys, status, "not found")


def test_checkpoint_of_another_architecture(digits_folders, tmp_path, capsys):
    # smallconv weights in a file that says resnet18: the weights cannot fill the model.
    run = export_random_backbone(tmp_path / "run", claimed_architecture="resnet18")
    status = run_args(run, digits_folders[0], digits_folders[1], tmp_path)
    assert_one_line_error(capsys, status, "does not match the model")


def test_missing_checkpoint(digits_folders, tmp_path, capsys):
    (tmp_path / "empty-run").mkdir()
    status = run_args(tmp_path / "empty-run", digits_folders[0], digits_folders[1], tmp_path)
    assert_one_line_error(capsys, status, "holds neither")
    status = run_args(tmp_path / "no-such-file.safetensors", digits_folders[0], digits_folders[1], tmp_path)
    assert_one_line_error(capsys, status, "not found")


def test_no_test_set_and_no_test_fraction(random_checkpoint, digits_folders, tmp_path, capsys):
    status = run_args(random_checkpoint, digits_folders[0], None, tmp_path)
    assert_one_line_error(capsys, status, "--test-fraction")


@pytest.mark.parametrize("flags, fragment", [
    (["--methods", "knn,svm"], "unknown method(s) svm"),
    (["--label-fractions", "0.1,2"], "label budget '2'"),
    (["--seeds", "0"], "seeds must be at least 1"),
    (["--device", "cuda:0"] if not __import__("torch").cuda.is_available() else ["--device", "nonsense"], "device"),
])
def test_bad_settings(random_checkpoint, digits_folders, tmp_path, capsys, flags, fragment):
    status = run_args(random_checkpoint, digits_folders[0], digits_folders[1], tmp_path, *flags)
    assert_one_line_error(capsys, status, fragment)


def test_validation_needed_but_switched_off(random_checkpoint, digits_folders, tmp_path, capsys):
    status = run_args(random_checkpoint, digits_folders[0], digits_folders[1], tmp_path,
                      "--methods", "logreg", "--validation", "pool", "--val-fraction", "0")
    assert_one_line_error(capsys, status, "validation")


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--checkpoint", "--train", "--test", "--val", "--val-fraction", "--test-fraction", "--out",
                 "--methods", "--label-fractions", "--seeds", "--device", "--batch-size", "--knn-k", "--knn-t",
                 "--knn-protocol", "--finetune-epochs", "--linear-epochs", "--no-baselines", "--no-plots"):
        assert flag in text


# ---------------------------------------------------------------------------------------------
# scripts/evaluate_embeddings.py


def load_script():
    spec = importlib.util.spec_from_file_location("evaluate_embeddings", ROOT / "scripts" / "evaluate_embeddings.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def digit_pixel_files(tmp_path: Path) -> tuple[Path, Path]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    np.savez(tmp_path / "train.npz", features=digits.data[:1200], labels=digits.target[:1200])
    np.save(tmp_path / "test_x.npy", digits.data[1200:])
    np.save(tmp_path / "test_y.npy", digits.target[1200:])
    return tmp_path / "train.npz", tmp_path / "test_x.npy"


def test_evaluate_embeddings_script_on_digit_pixels(tmp_path, capsys):
    train, test = digit_pixel_files(tmp_path)
    status = load_script().main(["--train", str(train), "--test", str(test), "--test-labels", str(tmp_path / "test_y.npy"),
                                 "--out", str(tmp_path / "out")])
    assert status == 0
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
    assert {row["method"] for row in rows} == {"knn", "logreg"}
    assert all(row["top1"] > 0.85 for row in rows)
    assert "| logreg | 100% |" in capsys.readouterr().out


def test_evaluate_embeddings_script_rejects_mismatched_lengths(tmp_path, capsys):
    train, test = digit_pixel_files(tmp_path)
    np.save(tmp_path / "short_y.npy", np.zeros(10, dtype=np.int64))
    script = load_script()
    status = script.main(["--train", str(train), "--test", str(test), "--test-labels", str(tmp_path / "short_y.npy")])
    assert_one_line_error(capsys, status, "597 feature rows", "10 labels", prog="evaluate_embeddings")
    np.savez(tmp_path / "bad.npz", features=np.zeros((5, 64)), labels=np.zeros(4, dtype=np.int64))
    status = script.main(["--train", str(tmp_path / "bad.npz"), "--test", str(test), "--test-labels",
                          str(tmp_path / "test_y.npy")])
    assert_one_line_error(capsys, status, "mismatched lengths", prog="evaluate_embeddings")


def test_the_training_set_cannot_be_the_test_set(random_checkpoint, digits_folders, tmp_path, capsys):
    status = run_args(random_checkpoint, digits_folders[0], digits_folders[0], tmp_path)
    assert_one_line_error(capsys, status, "must be different")


def test_a_given_validation_folder_is_used_instead_of_a_split(random_checkpoint, digits_folders, tmp_path):
    val = write_digits_folder(tmp_path / "val", 5, offset=60)
    out = tmp_path / "eval"
    argv = ["--checkpoint", str(random_checkpoint), "--train", str(digits_folders[0]), "--test", str(digits_folders[1]),
            "--val", str(val), "--out", str(out), "--methods", "logreg", "--label-fractions", "1.0", "--seeds", "1",
            "--no-plots", "--no-baselines"] + EVAL_FAST
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["data"]["val"] == str(val) and results["data"]["n_val"] == 50
    assert results["data"]["n_pool"] == 300 and results["rows"][0]["n_train"] == 300  # all of train labelled


def test_finetune_runs_at_full_labels_only_when_asked(random_checkpoint, digits_folders, tmp_path, capsys):
    train, test = digits_folders
    common = ["--checkpoint", str(random_checkpoint), "--train", str(train), "--test", str(test),
              "--methods", "finetune", "--label-fractions", "1.0", "--seeds", "1", "--no-plots"] + EVAL_FAST
    # Nothing would run: one line saying which flag adds the budget, nothing written.
    assert main(common + ["--out", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--finetune-max-fraction 1.0" in err and "Traceback" not in err
    assert not (tmp_path / "none" / "results.json").exists()
    assert main(common + ["--out", str(tmp_path / "all"), "--finetune-max-fraction", "1.0"]) == 0
    rows = json.loads((tmp_path / "all" / "results.json").read_text())["rows"]
    assert {(row["features"], row["label_fraction"]) for row in rows} == {("ssl", 1.0), ("scratch", 1.0)}
    assert main(common + ["--out", str(tmp_path / "bad"), "--finetune-max-fraction", "0"]) == 2
    assert "finetune-max-fraction" in capsys.readouterr().err
