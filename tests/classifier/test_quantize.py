"""``ssl-export --quantize int8``: static int8 calibrated on the user's images, kept only when it
classifies held-out labelled digits within a point of the fp32 file, and run by default after."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from ssl_classifier import Classifier
from ssl_classifier import quantize
from ssl_classifier.cli import export_main
from ssl_classifier.model import ONNX_FILE, ONNX_INT8_FILE, read_info
from ssl_classifier.runtimes import ONNX_RUNTIMES

from cli_checks import assert_one_line_error
from digit_files import write_digits_folder

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def int8_model(linear_model, tmp_path_factory):
    """The digits classifier exported to fp32 and int8 ONNX (calibration and check: its own train and test digits)."""
    model = tmp_path_factory.mktemp("int8") / "model"
    shutil.copytree(linear_model, model)
    assert export_main(["--model", str(model), "--quantize", "int8", "--quiet"]) == 0
    return model


def _accuracy(classifier: Classifier, folder, labels) -> float:
    paths = sorted(str(path) for path in folder.glob("*.png"))
    return float(np.mean([p.label == label for p, label in zip(classifier.predict(paths), labels)]))


def test_int8_keeps_accuracy_within_a_point_and_is_what_auto_loads(int8_model, test_digit_files, capsys):
    assert (int8_model / ONNX_INT8_FILE).is_file() and (int8_model / ONNX_FILE).is_file()
    assert (int8_model / ONNX_INT8_FILE).stat().st_size < 0.5 * (int8_model / ONNX_FILE).stat().st_size
    folder, labels = test_digit_files
    int8, fp32 = Classifier.load(int8_model), Classifier.load(int8_model, precision="fp32")
    assert int8.precision == "int8" and fp32.precision == "fp32"
    assert int8.runtime in ONNX_RUNTIMES and fp32.runtime in ONNX_RUNTIMES
    assert abs(_accuracy(int8, folder, labels) - _accuracy(fp32, folder, labels)) <= 0.01
    assert Classifier.load(int8_model, runtime="onnxruntime").precision == "int8"
    assert Classifier.load(int8_model, runtime="torch", precision="fp32").runtime == "torch"  # still there


def _conv_weights(path):
    """``[(int8 weights or None where float) of each Conv, in graph order]``."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    producers = {output: node for node in graph.node for output in node.output}
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    weights = []
    for conv in (node for node in graph.node if node.op_type == "Conv"):
        source = producers.get(conv.input[1])
        quantized = source is not None and source.op_type == "DequantizeLinear"
        weights.append(numpy_helper.to_array(initializers[source.input[0]]) if quantized else None)
    return weights


def test_every_convolution_is_int8_with_7_bit_weights(int8_model):
    """7 bits: u8 x s8 pair sums cannot saturate the 16-bit adds of CPUs without VNNI."""
    weights = _conv_weights(int8_model / ONNX_INT8_FILE)
    assert weights and all(w is not None and w.dtype == np.int8 for w in weights)
    assert max(int(np.abs(w.astype(np.int16)).max()) for w in weights) <= 64


@pytest.mark.parametrize("misses", [1, 2])
def test_a_file_that_misses_the_check_is_made_again_with_the_next_recipe(linear_model, tmp_path, monkeypatch, misses):
    model = tmp_path / "model"
    shutil.copytree(linear_model, model)
    real, checks = quantize.check_int8, []

    def first_ones_miss(*args, **kwargs):
        check, skipped = real(*args, **kwargs)
        if len(checks) < misses:
            check.top1_int8 = check.top1_fp32 - 0.5
        checks.append(check)
        return check, skipped

    monkeypatch.setattr(quantize, "check_int8", first_ones_miss)
    assert export_main(["--model", str(model), "--quantize", "int8", "--quiet"]) == 0
    assert len(checks) == misses + 1
    weights = _conv_weights(model / ONNX_INT8_FILE)
    if misses == 1:  # percentile ranges, every convolution still int8
        assert checks[-1].recipe == "percentile ranges" and all(w is not None for w in weights)
    else:
        assert checks[-1].recipe == "stem convolution in float" and "(stem convolution in float)" in checks[-1].describe()
        assert weights[0] is None and all(w is not None for w in weights[1:])


def test_calibration_folder_with_bad_files_skips_and_counts_them(linear_model, tmp_path, caplog):
    model = tmp_path / "model"
    shutil.copytree(linear_model, model)
    calibration = write_digits_folder(tmp_path / "calibration", 5)
    (calibration / "3" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (calibration / "3" / "empty.png").write_bytes(b"")
    (calibration / "notes.txt").write_text("not an image")
    assert export_main(["--model", str(model), "--quantize", "int8", "--calibration", str(calibration)]) == 0
    assert (model / ONNX_INT8_FILE).is_file()
    skipped = [record.getMessage() for record in caplog.records if "unreadable image(s) skipped" in record.getMessage()]
    assert skipped and skipped[0].startswith("int8 export: 2 unreadable")


def test_an_int8_file_that_loses_accuracy_is_refused_with_both_figures(linear_model, tmp_path, capsys, monkeypatch):
    model = tmp_path / "model"
    shutil.copytree(linear_model, model)
    monkeypatch.setattr(quantize, "MAX_ACCURACY_DROP", -0.5)  # no int8 file can gain 50 points: every check fails
    status = export_main(["--model", str(model), "--quantize", "int8", "--quiet"])
    assert_one_line_error(capsys, status, "% fp32 vs ", "% int8, balanced accuracy", "nothing int8 was written",
                          prog="ssl-export")
    assert not (model / ONNX_INT8_FILE).exists() and (model / ONNX_FILE).is_file()
    assert not list(model.glob("*.tmp*")) and not [p for p in model.iterdir() if p.is_dir()]


def test_without_held_out_labels_int8_asks_for_them_in_one_line(linear_model, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(linear_model, model)
    info = read_info(model)
    info.training["data"]["test"] = None
    (model / "classifier.json").write_text(info.to_json())
    status = export_main(["--model", str(model), "--quantize", "int8", "--quiet"])
    assert_one_line_error(capsys, status, "--check-data", prog="ssl-export")
    assert not (model / ONNX_INT8_FILE).exists() and not (model / ONNX_FILE).exists()  # said before any export


def test_check_data_with_classes_the_classifier_does_not_know_is_one_line(linear_model, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(linear_model, model)
    check = write_digits_folder(tmp_path / "check", 2)
    (check / "7").rename(check / "seven")
    status = export_main(["--model", str(model), "--quantize", "int8", "--check-data", str(check), "--quiet"])
    assert_one_line_error(capsys, status, "classes seven are not the classifier's", prog="ssl-export")
    assert not (model / ONNX_INT8_FILE).exists() and not (model / ONNX_FILE).exists()


def test_quantize_needs_onnx(linear_model, tmp_path, capsys):
    status = export_main(["--model", str(linear_model), "--format", "torchscript", "--quantize", "int8",
                          "--out", str(tmp_path / "m.pt"), "--quiet"])
    assert_one_line_error(capsys, status, "only with --format onnx", prog="ssl-export")


def test_a_calibration_folder_with_no_readable_image_is_one_line_before_any_export(linear_model, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(linear_model, model)
    calibration = tmp_path / "calibration"
    calibration.mkdir()
    (calibration / "empty.png").write_bytes(b"")
    (calibration / "truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    status = export_main(["--model", str(model), "--quantize", "int8", "--calibration", str(calibration), "--quiet"])
    assert_one_line_error(capsys, status, "calibration images:", "could be read", prog="ssl-export")
    assert not (model / ONNX_INT8_FILE).exists() and not (model / ONNX_FILE).exists()
