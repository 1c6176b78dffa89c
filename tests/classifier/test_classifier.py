"""The classifier people take home: ssl-finetune -> classifier files -> ssl-predict / ssl-export,
on real digits; every bad input a one-line error with nothing half-written."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from linear_probe.linear import Standardise
from ssl_classifier import Classifier
from ssl_classifier.cli import export_main, finetune_main, predict_main
from ssl_classifier.model import ClassifierError, load_network
from ssl_classifier.preprocess import to_input
from ssl_classifier.fitting import fold_standardisation
from ssl_classifier.train import FinetuneSettings, class_weights, train_classifier
from ssl_pretrain.augment.transforms import build_eval_transform

from cli_checks import assert_one_line_error
from digit_files import write_digits_folder

QUIET = ["--device", "cpu", "--quiet"]


def test_linear_classifier_is_saved_described_and_accurate_on_held_out_digits(linear_model, test_digit_files):
    info = json.loads((linear_model / "classifier.json").read_text())
    assert info["classes"] == [str(digit) for digit in range(10)]
    assert info["architecture"] == "smallconv" and info["input_size"] == 16 and info["mode"] == "linear"
    assert len(info["backbone"]["weights_sha256"]) == 64 and info["training"]["n_train"] > 1000
    # chosen inside the labels (cross-validation): no validation set, every label trains the refit
    assert info["validation"] is None and info["training"]["validation"]["protocol"] == "cv"
    assert info["training"]["labels_used"] == info["training"]["n_train"] == 1347
    assert info["training"]["validation_balanced_accuracy"] > 0.85 and info["test"]["balanced_accuracy"] > 0.85
    folder, labels = test_digit_files
    classifier = Classifier.load(linear_model)
    predictions = classifier.predict(sorted(str(path) for path in folder.glob("*.png")), top_k=3)
    accuracy = np.mean([prediction.label == label for prediction, label in zip(predictions, labels)])
    assert accuracy > 0.85 and abs(accuracy - info["test"]["top1"]) < 0.02  # files ~ the in-memory test set
    assert all(len(prediction.top) == 3 and prediction.error is None for prediction in predictions)
    assert all(prediction.top[0][1] >= prediction.top[1][1] >= prediction.top[2][1] for prediction in predictions)


def test_predict_takes_pil_images_arrays_tensors_and_paths_alike(linear_model, test_digit_files):
    folder, _ = test_digit_files
    path = sorted(folder.glob("*.png"))[0]
    image = Image.open(path).convert("RGB")
    array = np.asarray(image)
    tensor = torch.from_numpy(array).permute(2, 0, 1).float() / 255
    classifier = Classifier.load(linear_model)
    answers = classifier.predict([str(path), image, array, tensor])
    assert len({answer.label for answer in answers}) == 1
    np.testing.assert_allclose([a.probability for a in answers], answers[0].probability, atol=1e-5)
    assert classifier.predict(image)[0].label == answers[0].label
    assert classifier.predict_proba([image]).sum() == pytest.approx(1.0)


def test_the_classifiers_input_is_the_evaluation_transforms():
    transform = build_eval_transform(24, (0, 0, 0), (1, 1, 1))
    rng = np.random.default_rng(0)
    for size in ((8, 8), (40, 30), (31, 57), (24, 24), (100, 13)):
        image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        np.testing.assert_allclose(to_input(image, 24), transform(image).numpy(), atol=1e-6)


def test_folding_the_standardisation_into_the_head_is_exact():
    features = np.random.default_rng(1).normal(3.0, 2.0, (50, 8)).astype(np.float32)
    scaler, linear = Standardise(features), torch.nn.Linear(8, 3)
    folded = fold_standardisation(scaler, linear)
    x = torch.as_tensor(features)
    torch.testing.assert_close(folded(x), linear(scaler(x)), atol=1e-5, rtol=1e-5)


def test_the_saved_network_gives_the_classifiers_logits(linear_model, test_digit_files):
    network, info = load_network(linear_model)
    folder, _ = test_digit_files
    images = [Image.open(path).convert("RGB") for path in sorted(folder.glob("*.png"))[:16]]
    batch = np.stack([to_input(image, info.input_size) for image in images])
    with torch.no_grad():
        reference = network(torch.from_numpy(batch)).numpy()
    # the classifier runs channels-last: another summation order, float32 rounding apart
    np.testing.assert_allclose(Classifier.load(linear_model).logits(batch), reference, rtol=1e-5, atol=1e-4)


def test_finetune_mode_trains_the_backbone_with_a_label_budget(backbone_run, tmp_path, capsys):
    out = tmp_path / "model"
    argv = ["--checkpoint", str(backbone_run), "--train", "builtin:digits:train", "--out", str(out), "--mode",
            "finetune", "--labels-per-class", "10", "--epochs", "2", "--no-flip"] + QUIET
    assert finetune_main(argv) == 0
    info = json.loads((out / "classifier.json").read_text())
    assert info["mode"] == "finetune" and info["training"]["n_train"] == 100
    assert set(info["training"]["train_counts"].values()) == {10}
    # linear-probe's fine-tuning (a new head, one learning rate), so the report's rows are what it trains
    assert info["training"]["epochs"] <= 2 and "linear_probe" not in info["training"]
    assert (info["training"]["head_init"], info["training"]["lr"], info["training"]["backbone_lr_scale"]) == (
        "random", 0.05, 1.0)
    network, _ = load_network(out)
    pretrained, _ = load_network(out)  # same file: compare against the exported backbone instead
    from ssl_pretrain.checkpoint import load_backbone

    backbone, _ = load_backbone(backbone_run)
    changed = [name for name, tensor in backbone.state_dict().items()
               if tensor.is_floating_point() and not torch.equal(tensor, network.backbone.state_dict()[name])]
    assert changed, "fine-tuning must update the backbone"
    assert "cross-validated inside the labels" in capsys.readouterr().out


def test_lp_ft_trains_the_head_first_then_the_backbone_at_a_tenth():
    settings = FinetuneSettings(mode="finetune", head_init="probe")
    resolved = settings.resolved("finetune")
    assert (resolved["lr"], resolved["backbone_lr_scale"]) == (0.01, 0.1)
    assert FinetuneSettings(head_init="probe", backbone_lr_scale=0.5, lr=0.2).resolved("finetune")[
        "backbone_lr_scale"] == 0.5
    with pytest.raises(ClassifierError, match="backbone-lr-scale"):
        FinetuneSettings(backbone_lr_scale=-1)


def test_imbalanced_classes_get_a_weighted_loss_and_balanced_metrics(backbone_run, tmp_path, caplog):
    train = write_digits_folder(tmp_path / "train", 40, classes=[1])
    write_digits_folder(train, 120, classes=[7])
    out = tmp_path / "model"
    settings = FinetuneSettings(device="cpu", progress=False, epochs=20, mode="linear", validation="pool")
    with caplog.at_level("INFO"):
        result = train_classifier(backbone_run, str(train), out, settings=settings)
    assert "imbalanced" in caplog.text
    weights = result.info.training["class_weights"]
    assert weights is not None and weights[0] == pytest.approx(3 * weights[1])
    assert result.info.validation["roc_auc"] is not None and result.info.validation["top5"] is None
    assert class_weights(np.array([0, 0, 1, 1]), 2, "auto") is None
    assert class_weights(np.array([0, 0, 0, 1]), 2, "none") is None


def test_csv_label_file_trains_like_a_folder(backbone_run, tmp_path):
    train = write_digits_folder(tmp_path / "images", 15, classes=[0, 3, 8])
    lines = ["path,label"] + [f"{path.relative_to(tmp_path)},{path.parent.name}" for path in sorted(train.rglob("*.png"))]
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    result = train_classifier(backbone_run, str(tmp_path / "labels.csv"), tmp_path / "model",
                              settings=FinetuneSettings(device="cpu", progress=False, epochs=10, mode="linear"))
    assert result.info.classes == ["0", "3", "8"] and result.info.training["n_train"] + result.info.training["n_val"] == 45


# ---------------------------------------------------------------------------------------------
# ssl-predict


def _write_messy_folder(folder: Path, test_digit_files) -> None:
    source, _ = test_digit_files
    folder.mkdir()
    for path in sorted(source.glob("*.png"))[:20]:
        shutil.copy(path, folder / path.name)
    (folder / "empty.png").write_bytes(b"")
    (folder / "not-an-image.jpg").write_text("hello")
    (folder / "truncated.png").write_bytes((folder / "0000.png").read_bytes()[:40])


def test_ssl_predict_writes_a_row_per_image_with_errors_for_unreadable_ones(linear_model, test_digit_files, tmp_path, capsys):
    folder = tmp_path / "inbox"
    _write_messy_folder(folder, test_digit_files)
    out = tmp_path / "predictions.csv"
    assert predict_main([str(folder), "--model", str(linear_model), "--out", str(out), "--top-k", "3", "--quiet"]) == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 23 and list(rows[0]) == ["path", "label", "probability", "label_2", "probability_2",
                                                "label_3", "probability_3", "error"]
    errors = {Path(row["path"]).name: row["error"] for row in rows if row["error"]}
    assert set(errors) == {"empty.png", "not-an-image.jpg", "truncated.png"} and "0 bytes" in errors["empty.png"]
    good = [row for row in rows if not row["error"]]
    assert all(row["label"] in [str(d) for d in range(10)] and 0 < float(row["probability"]) <= 1 for row in good)
    assert "3 unreadable" in capsys.readouterr().out


def test_folder_prediction_decodes_in_threads_in_order_and_agrees_with_decoding_inline(linear_model, test_digit_files,
                                                                                       tmp_path):
    from ssl_classifier.predict import predict_files

    folder = tmp_path / "inbox"
    _write_messy_folder(folder, test_digit_files)
    classifier = Classifier.load(linear_model, runtime="torch")
    # batches of 4 over 23 files: six batches in flight across two decoding threads, bad files among them
    threaded = predict_files(classifier, [str(folder)], tmp_path / "threads.csv", batch_size=4, workers=2, progress=False)
    inline = predict_files(classifier, [str(folder)], tmp_path / "inline.csv", batch_size=4, workers=0, progress=False)
    assert (threaded.images, threaded.errors) == (inline.images, inline.errors) == (23, 3)
    rows, reference = (list(csv.DictReader((tmp_path / name).open())) for name in ("threads.csv", "inline.csv"))
    assert [row["path"] for row in rows] == sorted(row["path"] for row in rows)  # the input order, kept
    assert [(row["path"], row["label"], row["error"]) for row in rows] == [
        (row["path"], row["label"], row["error"]) for row in reference]
    assert np.allclose([float(row["probability"] or 0) for row in rows],
                       [float(row["probability"] or 0) for row in reference], atol=1e-5)


def test_ssl_predict_exit_status_is_one_only_when_nothing_could_be_read(linear_model, tmp_path, capsys):
    (tmp_path / "bad.png").write_bytes(b"nope")
    assert predict_main([str(tmp_path / "bad.png"), str(tmp_path / "missing.png"), "--model", str(linear_model),
                         "--out", str(tmp_path / "p.jsonl"), "--quiet"]) == 1
    records = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [record["error"] is not None for record in records] == [True, True]
    assert "none of the images could be read" in capsys.readouterr().err


def test_ssl_predict_on_a_labelled_list_reports_accuracy_and_refuses_unknown_labels(linear_model, test_digit_files,
                                                                                     tmp_path, capsys):
    folder, labels = test_digit_files
    paths = sorted(folder.glob("*.png"))[:50]
    (tmp_path / "list.csv").write_text("".join(f"{path},{label}\n" for path, label in zip(paths, labels)))
    out = tmp_path / "p.jsonl"
    assert predict_main([str(tmp_path / "list.csv"), "--model", str(linear_model), "--out", str(out), "--quiet"]) == 0
    assert "accuracy on the 50 labelled images" in capsys.readouterr().out
    assert all("true_label" in json.loads(line) for line in out.read_text().splitlines())
    (tmp_path / "wrong.csv").write_text(f"{paths[0]},cat\n{paths[1]},3\n")
    status = predict_main([str(tmp_path / "wrong.csv"), "--model", str(linear_model), "--out",
                           str(tmp_path / "w.csv"), "--quiet"])
    assert_one_line_error(capsys, status, "not among the model's classes", "cat", prog="ssl-predict")
    assert not (tmp_path / "w.csv").exists() and not list(tmp_path.glob(".w.csv*"))


# ---------------------------------------------------------------------------------------------
# ssl-export


def test_onnx_export_matches_pytorch_and_runs_in_onnxruntime(linear_model, test_digit_files, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(linear_model, model)
    assert export_main(["--model", str(model), "--quiet"]) == 0
    assert "max |logit difference|" in capsys.readouterr().out
    import onnx
    import onnxruntime

    graph = onnx.load(str(model / "classifier.onnx"))
    assert graph.opset_import[0].version >= 17
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a named, dynamic batch
    folder, _ = test_digit_files
    batch = np.stack([to_input(Image.open(path).convert("RGB"), 16) for path in sorted(folder.glob("*.png"))[:37]])
    session = onnxruntime.InferenceSession(str(model / "classifier.onnx"), providers=["CPUExecutionProvider"])
    onnx_logits = session.run(None, {"images": batch})[0]
    network, _ = load_network(model)
    with torch.no_grad():
        torch_logits = network(torch.from_numpy(batch)).numpy()
    assert np.abs(onnx_logits - torch_logits).max() <= 1e-4
    paths = [str(path) for path in sorted(folder.glob("*.png"))[:40]]
    via_onnx = Classifier.load(model, runtime="onnxruntime").predict(paths)
    via_torch = Classifier.load(model, runtime="torch").predict(paths)
    assert [p.label for p in via_onnx] == [p.label for p in via_torch]
    np.testing.assert_allclose([p.probability for p in via_onnx], [p.probability for p in via_torch], atol=1e-4)


def test_torchscript_export_matches_pytorch(linear_model, tmp_path):
    out = tmp_path / "model.pt"
    assert export_main(["--model", str(linear_model), "--format", "torchscript", "--out", str(out), "--quiet"]) == 0
    scripted = torch.jit.load(str(out))
    network, _ = load_network(linear_model)
    images = torch.rand(5, 3, 16, 16)
    with torch.no_grad():
        assert (scripted(images) - network(images)).abs().max() <= 1e-4


def test_onnxruntime_without_an_export_is_a_one_line_error(linear_model, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(linear_model, model)
    (model / "classifier.onnx").unlink(missing_ok=True)
    status = predict_main([str(tmp_path), "--model", str(model), "--runtime", "onnxruntime", "--quiet"])
    assert_one_line_error(capsys, status, "ssl-export", prog="ssl-predict")


# ---------------------------------------------------------------------------------------------
# Bad input


def _finetune(capsys, *argv: str) -> str:
    status = finetune_main(list(argv) + QUIET)
    return assert_one_line_error(capsys, status, prog="ssl-finetune")


def test_bad_training_input_is_one_line_and_writes_nothing(backbone_run, tmp_path, capsys):
    out = tmp_path / "out"
    ok = ["--checkpoint", str(backbone_run), "--out", str(out)]
    (tmp_path / "missing.csv").write_text("a.png,cat\nb.png,dog\n")
    assert "do not exist" in _finetune(capsys, *ok, "--train", str(tmp_path / "missing.csv"))
    write_digits_folder(tmp_path / "one", 5, classes=[4])
    assert "at least two" in _finetune(capsys, *ok, "--train", str(tmp_path / "one"))
    write_digits_folder(tmp_path / "two", 5, classes=[4, 5])
    (tmp_path / "two" / "6").mkdir()
    assert "no images" in _finetune(capsys, *ok, "--train", str(tmp_path / "two"))
    assert "does not fit" in _finetune(capsys, *ok, "--train", "builtin:digits:train", "--input-size", "4")
    assert "not found" in _finetune(capsys, "--checkpoint", str(tmp_path / "nope"), "--out", str(out),
                                    "--train", "builtin:digits:train")
    assert not out.exists() or not any(out.iterdir())


def test_an_existing_model_is_not_overwritten_without_the_flag(linear_model, backbone_run, capsys):
    before = (linear_model / "classifier.safetensors").read_bytes()
    message = _finetune(capsys, "--checkpoint", str(backbone_run), "--train", "builtin:digits:train",
                        "--out", str(linear_model))
    assert "--overwrite" in message and (linear_model / "classifier.safetensors").read_bytes() == before


def test_truncated_or_foreign_model_files_are_one_line_errors(linear_model, tmp_path, capsys):
    truncated = tmp_path / "truncated"
    shutil.copytree(linear_model, truncated)
    weights = (truncated / "classifier.safetensors").read_bytes()
    (truncated / "classifier.safetensors").write_bytes(weights[: len(weights) // 2])
    status = predict_main([str(tmp_path), "--model", str(truncated), "--quiet"])
    assert_one_line_error(capsys, status, "truncated", prog="ssl-predict")
    foreign = tmp_path / "foreign"
    shutil.copytree(linear_model, foreign)
    info = json.loads((foreign / "classifier.json").read_text())
    info["architecture"], info["feature_dim"] = "resnet18", 512
    (foreign / "classifier.json").write_text(json.dumps(info))
    status = export_main(["--model", str(foreign), "--quiet"])
    assert_one_line_error(capsys, status, "does not match", prog="ssl-export")
    (foreign / "classifier.json").write_text("{\"format\": \"something else\"}")
    with pytest.raises(ClassifierError, match="not an ssl_classifier"):
        Classifier.load(foreign)
    assert not (foreign / "classifier.onnx").exists()


def test_without_validation_the_whole_budget_runs(backbone_run, tmp_path):
    settings = FinetuneSettings(device="cpu", progress=False, epochs=7, validation="none", mode="linear")
    result = train_classifier(backbone_run, "builtin:digits:train", tmp_path / "model", settings=settings)
    training = result.info.training
    assert training["n_val"] == 0 and result.info.validation is None and training["validation"]["protocol"] == "none"
    assert training["epochs"] == 7 and training["labels_used"] == training["n_train"] == 1347


def test_auto_mode_chooses_by_cross_validation_inside_the_labels(backbone_run, tmp_path):
    train = write_digits_folder(tmp_path / "train", 12, classes=[0, 1, 7])
    settings = FinetuneSettings(device="cpu", progress=False, epochs=3, hflip=False)
    result = train_classifier(backbone_run, str(train), tmp_path / "auto", settings=settings)
    training = result.info.training
    assert set(training["modes"]) == {"linear", "finetune"} and result.info.mode in ("linear", "finetune")
    scores = {mode: entry["validation_balanced_accuracy"] for mode, entry in training["modes"].items()}
    assert result.info.mode == max(scores, key=lambda mode: (scores[mode], mode == "linear"))
    assert training["validation"]["protocol"] == "cv" and training["labels_used"] == training["n_train"] == 36
    assert 1 <= training["epochs"] <= 3 and result.info.validation is None
    # the older protocol: the held-out labels train nothing and are counted in the labels used
    pool = train_classifier(backbone_run, str(train), tmp_path / "pool", settings=FinetuneSettings(
        device="cpu", progress=False, epochs=3, mode="linear", validation="pool"))
    assert pool.info.training["labels_used"] == pool.info.training["n_train"] + pool.info.training["n_val"] == 36
    assert pool.info.training["n_val"] > 0 and pool.info.validation is not None
