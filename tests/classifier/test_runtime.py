"""Which runtime a saved classifier runs in (the fastest installed for its files, unless told),
and one camera frame at a time: an array or JPEG bytes give the file's answer."""

from __future__ import annotations

import importlib.util
import io
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ssl_classifier import Classifier
from ssl_classifier import runtimes
from ssl_classifier.cli import export_main, predict_main
from ssl_classifier.model import ClassifierError
from ssl_classifier.runtimes import choose_runtime
from ssl_pretrain.data import digits_source

from cli_checks import assert_one_line_error


@pytest.fixture(scope="module")
def exported_model(linear_model, tmp_path_factory):
    """The digits classifier with its fp32 ONNX file (no int8)."""
    pytest.importorskip("onnxruntime")
    model = tmp_path_factory.mktemp("exported") / "model"
    shutil.copytree(linear_model, model)
    assert export_main(["--model", str(model), "--quiet"]) == 0
    return model


def test_auto_takes_the_fastest_installed_runtime_for_the_file_and_torch_without_one(
        exported_model, linear_model, monkeypatch, tmp_path):
    installed = {"openvino", "onnxruntime"}
    monkeypatch.setattr(runtimes, "is_installed", lambda name: name in installed)
    assert choose_runtime(exported_model) == ("onnxruntime", exported_model / "classifier.onnx")  # fp32
    with_int8 = tmp_path / "model"
    shutil.copytree(exported_model, with_int8)
    (with_int8 / "classifier.int8.onnx").write_bytes((with_int8 / "classifier.onnx").read_bytes())  # a stand-in
    assert choose_runtime(with_int8) == ("openvino", with_int8 / "classifier.int8.onnx")
    assert choose_runtime(with_int8, precision="fp32") == ("onnxruntime", with_int8 / "classifier.onnx")
    installed = {"openvino"}
    assert choose_runtime(exported_model) == ("openvino", exported_model / "classifier.onnx")
    installed = {"onnxruntime"}
    assert choose_runtime(exported_model) == ("onnxruntime", exported_model / "classifier.onnx")
    assert choose_runtime(with_int8) == ("onnxruntime", with_int8 / "classifier.int8.onnx")
    installed.clear()
    assert choose_runtime(exported_model) == ("torch", None)  # no ONNX runtime installed
    installed.add("onnxruntime")
    assert choose_runtime(linear_model) == ("torch", None)  # no ONNX file
    assert choose_runtime(exported_model, "torch") == ("torch", None)  # asked for


def test_a_runtime_or_precision_that_cannot_be_served_is_one_line(exported_model, linear_model, monkeypatch, capsys):
    with pytest.raises(ClassifierError, match="ssl-export"):
        choose_runtime(linear_model, "onnxruntime")
    with pytest.raises(ClassifierError, match="--quantize int8"):
        choose_runtime(exported_model, "auto", "int8")
    monkeypatch.setattr(runtimes, "is_installed", lambda name: False)
    with pytest.raises(ClassifierError, match="pip install openvino"):
        choose_runtime(exported_model, "openvino")
    status = predict_main([str(exported_model), "--model", str(exported_model), "--precision", "int8", "--quiet"])
    assert_one_line_error(capsys, status, "--quantize int8", prog="ssl-predict")


def test_ssl_predict_says_which_runtime_it_took(exported_model, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(digits_source("test").images[0]).save(folder / "0.png")
    assert predict_main([str(folder), "--model", str(exported_model), "--out", str(tmp_path / "p.csv")]) == 0
    printed = capsys.readouterr().out
    assert " fp32)" in printed and ("onnxruntime" in printed or "openvino" in printed)


def test_openvino_runs_the_fp32_and_int8_files_as_onnxruntime_does(exported_model, tmp_path):
    """In a subprocess: OpenVINO's thread pool must not live in the pytest process (conftest)."""
    if not importlib.util.find_spec("openvino"):
        pytest.skip("openvino is not installed (pip install -e '.[openvino]')")
    model = tmp_path / "model"
    shutil.copytree(exported_model, model)
    (model / "classifier.int8.onnx").write_bytes((model / "classifier.onnx").read_bytes())  # a stand-in file
    script = (
        "import json, sys, numpy as np\n"
        "from ssl_classifier import Classifier\n"
        "from ssl_pretrain.data import digits_source\n"
        "frames = [np.asarray(digits_source('test').load(i).resize((64, 64))) for i in range(20)]\n"
        "out = {}\n"
        "for runtime in ('openvino', 'onnxruntime'):\n"
        "    for precision in ('fp32', 'int8'):\n"
        "        c = Classifier.load(sys.argv[1], runtime=runtime, precision=precision)\n"
        "        out[f'{c.runtime} {c.precision}'] = [c.predict_frame(f).probability for f in frames]\n"
        "out['auto'] = Classifier.load(sys.argv[1]).runtime\n"
        "print(json.dumps(out))\n")
    done = subprocess.run([sys.executable, "-c", script, str(model)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["auto"] == "openvino"  # for the int8 file
    for precision in ("fp32", "int8"):
        np.testing.assert_allclose(out[f"openvino {precision}"], out[f"onnxruntime {precision}"], atol=1e-4)


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime"])
def test_one_frame_as_an_array_or_jpeg_bytes_answers_as_the_file_does(exported_model, tmp_path, runtime):
    """640 x 480 frames: an RGB array gives the PNG file's probabilities, JPEG bytes the JPEG
    file's (both decoded at reduced size where the input size allows), frame after frame."""
    classifier = Classifier.load(exported_model, runtime=runtime)
    source = digits_source("test")
    for index in range(12):
        frame = source.load(index).resize((640, 480), Image.BICUBIC)
        frame.save(tmp_path / f"{index}.png")
        (tmp_path / f"{index}.jpg").write_bytes(_jpeg(frame))
        from_array = classifier.predict(np.asarray(frame))[0]
        from_png = classifier.predict(str(tmp_path / f"{index}.png"))[0]
        from_bytes = classifier.predict(_jpeg(frame))[0]
        from_jpeg = classifier.predict(str(tmp_path / f"{index}.jpg"))[0]
        assert from_array.label == from_png.label and from_bytes.label == from_jpeg.label
        assert from_array.probability == pytest.approx(from_png.probability, abs=1e-5)
        assert from_bytes.probability == pytest.approx(from_jpeg.probability, abs=1e-5)
        assert from_array.label == str(source.labels[index]) or from_array.probability < 0.9


def test_a_broken_frame_is_an_answer_with_its_error_not_an_exception(exported_model):
    answer = Classifier.load(exported_model).predict(b"\xff\xd8\xff\xe0 not a jpeg")[0]
    assert answer.label is None and answer.error
