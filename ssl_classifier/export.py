"""A saved classifier -> ONNX or TorchScript, checked against PyTorch's logits (``ssl-export``).

ONNX: torch's dynamo exporter, opset 18, a dynamic batch dimension; input ``images``
``(batch, 3, S, S)`` float32 RGB in [0, 1] (normalisation is inside the graph), output ``logits``
``(batch, C)``. After writing, the file is run with onnxruntime (when installed) on a batch of
the same inputs as the PyTorch model, and the largest absolute difference of the logits is
reported; over ``TOLERANCE`` the export is refused and nothing is left behind.

``quantize="int8"`` then also writes ``classifier.int8.onnx`` (``ssl_classifier.quantize``):
static int8, calibrated on the user's images and kept only if it classifies held-out labelled
images within a point of the fp32 file.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ssl_classifier.model import (ONNX_FILE, ONNX_INT8_FILE, TORCHSCRIPT_FILE, ClassifierError, load_network,
                                  resolve_model_dir)
from ssl_classifier.quantize import (MAX_ACCURACY_DROP, CheckImages, QuantizationCheck, calibration_batches,
                                     default_calibration_source, default_check_source, check_images,
                                     quantize_checked)
from ssl_pretrain.checkpoint import atomic_write

log = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript")
QUANTIZATIONS = ("int8",)
OPSET = 18
TOLERANCE = 1e-4
"""Largest absolute logit difference accepted between the export and PyTorch (float32 noise
across different kernels is ~1e-6 of the logits' scale)."""


@dataclass
class ExportResult:
    path: Path
    format: str
    max_abs_diff: float | None  # None: onnxruntime not installed, not checked
    int8_path: Path | None = None
    int8_check: QuantizationCheck | None = None


def _check_batch(input_size: int, count: int = 4, seed: int = 0) -> torch.Tensor:
    """Inputs to compare the export with PyTorch: smooth random images in [0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, max(2, input_size // 4), max(2, input_size // 4), generator=generator)
    return torch.nn.functional.interpolate(coarse, size=input_size, mode="bilinear", align_corners=False).clamp(0, 1)


def _onnx_bytes(network, example: torch.Tensor) -> bytes:
    import warnings

    batch = torch.export.Dim("batch", min=1)
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        target = Path(folder) / ONNX_FILE
        logging.disable(logging.INFO)  # the exporter's pass manager logs every pass at INFO
        try:
            torch.onnx.export(network, (example,), str(target), input_names=["images"], output_names=["logits"],
                              opset_version=OPSET, dynamo=True, dynamic_shapes={"images": {0: batch}},
                              external_data=False, verbose=False)
        except ImportError as error:
            raise ClassifierError(f"ONNX export needs onnx and onnxscript (pip install onnx onnxscript): {error}") from None
        finally:
            logging.disable(logging.NOTSET)
        return target.read_bytes()


def onnx_max_abs_diff(payload: bytes, network, inputs: torch.Tensor) -> float | None:
    """Largest |onnxruntime logits - PyTorch logits| on ``inputs`` (None without onnxruntime)."""
    try:
        import onnxruntime
    except ImportError:
        return None
    session = onnxruntime.InferenceSession(payload, providers=["CPUExecutionProvider"])
    ours = session.run(None, {session.get_inputs()[0].name: inputs.numpy()})[0]
    with torch.no_grad():
        reference = network(inputs).numpy()
    return float(np.abs(ours - reference).max())


def export_classifier(model_dir: str | Path, fmt: str = "onnx", out: str | Path | None = None,
                      quantize: str | None = None, calibration: str | None = None,
                      check_data: str | None = None) -> ExportResult:
    """Export the classifier in ``model_dir`` (default file: inside it, next to the weights).

    Args:
        quantize: ``"int8"`` (ONNX only): also write the int8 file (``out``, else
            ``classifier.int8.onnx`` in the model folder), calibrated on ``calibration`` (default:
            the training images) and checked on the labelled ``check_data`` (default: the test set
            given at training).

    Raises:
        ClassifierError: an unknown format, a model that cannot be loaded, an export whose
            logits differ from PyTorch's by more than ``TOLERANCE``, or an int8 file that loses
            more than a point of accuracy (both figures in the message; nothing int8 written).
    """
    if fmt not in FORMATS:
        raise ClassifierError(f"unknown export format '{fmt}': choose {' or '.join(FORMATS)}")
    if quantize is not None and (quantize not in QUANTIZATIONS or fmt != "onnx"):
        raise ClassifierError(f"--quantize {quantize}: only int8, and only with --format onnx")
    model_dir = resolve_model_dir(model_dir)
    network, info = load_network(model_dir)
    network = network.float().eval()
    if quantize:  # what int8 needs is decoded first: a missing or wrong folder fails before any export
        checking = check_images(check_data or default_check_source(info), info)
        calibration = calibration or default_calibration_source(info)
        prepared = calibration_batches(calibration, info.input_size)
    inputs = _check_batch(info.input_size)
    default = model_dir / (ONNX_FILE if fmt == "onnx" else TORCHSCRIPT_FILE)
    path = Path(out) if out and not quantize else default
    if fmt == "onnx":
        payload = _onnx_bytes(network, inputs[:2])
        diff = onnx_max_abs_diff(payload, network, inputs)
        _refuse_if_off(diff, fmt)
        atomic_write(path, lambda file: file.write(payload))
    else:
        with torch.no_grad():
            traced = torch.jit.trace(network, inputs[:2], check_trace=False)
            diff = float((traced(inputs) - network(inputs)).abs().max())
        _refuse_if_off(diff, fmt)
        atomic_write(path, lambda file: torch.jit.save(traced, file))
    log.info("exported %s to %s (max |logit difference| vs PyTorch %s)", fmt, path,
             "not checked: onnxruntime not installed" if diff is None else f"{diff:.2e}")
    result = ExportResult(path, fmt, diff)
    if quantize:
        target = Path(out) if out else model_dir / ONNX_INT8_FILE
        result.int8_path, result.int8_check = target, _export_int8(path, target, calibration, prepared,
                                                                   checking)
    return result


def _export_int8(fp32_path: Path, target: Path, calibration_spec: str, prepared: tuple[list, int],
                 checking: CheckImages):
    """Quantise, check against fp32, and only then move the int8 file into place."""
    batches, skipped_calibration = prepared
    with tempfile.TemporaryDirectory(dir=target.parent if target.parent.is_dir() else None) as folder:
        candidate = Path(folder) / target.name
        check, skipped_check = quantize_checked(fp32_path, candidate, batches, checking)
        check.calibration_images, check.skipped = len(batches), skipped_calibration + skipped_check
        if check.skipped:
            log.warning("int8 export: %d unreadable image(s) skipped (calibration %d, check %d)",
                        check.skipped, skipped_calibration, skipped_check)
        if not check.acceptable():
            raise ClassifierError(f"the int8 model loses more than {100 * MAX_ACCURACY_DROP:g} point of accuracy: "
                                  f"{check.describe()}; nothing int8 was written (the fp32 file stands)")
        payload = candidate.read_bytes()
    atomic_write(target, lambda file: file.write(payload))
    log.info("int8 -> %s, calibrated on %d images of %s: %s (labels agree on %.1f%%)", target,
             check.calibration_images, calibration_spec, check.describe(), 100 * check.agreement)
    return check


def _refuse_if_off(diff: float | None, fmt: str) -> None:
    if diff is not None and not diff <= TOLERANCE:
        raise ClassifierError(f"the {fmt} export's logits differ from PyTorch's by {diff:.2e} "
                              f"(more than {TOLERANCE:g}); nothing was written")

