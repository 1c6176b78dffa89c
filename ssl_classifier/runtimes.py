"""Where a saved classifier runs: torch (the safetensors weights, rebuilt), or the ONNX file from
``ssl-export`` in OpenVINO or onnxruntime, fp32 or int8; ``choose_runtime`` picks the fastest
installed for a model folder (the order is measured: BENCHMARKS.md, "Classifier latency").

Each runner is ``(B, 3, S, S) float32 in [0, 1] -> (B, C) logits`` and keeps its session (and
OpenVINO its one infer request) across calls.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Callable

import numpy as np

from ssl_classifier.model import ONNX_FILE, ONNX_INT8_FILE, ClassifierError, load_network

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "openvino", "onnxruntime", "torch")
ONNX_RUNTIMES = ("openvino", "onnxruntime")
FASTEST = {"int8": ("openvino", "onnxruntime"), "fp32": ("onnxruntime", "openvino")}
"""Runtimes of the ONNX file by precision, fastest first: OpenVINO's int8 kernels beat
onnxruntime's; in fp32 the two tie at the median and onnxruntime has the shorter tail
(BENCHMARKS.md, "Classifier latency")."""
PRECISIONS = ("auto", "int8", "fp32")


def torch_runner(model_dir: Path, device: str, threads: int | None) -> Callable[[np.ndarray], np.ndarray]:
    """The safetensors weights rebuilt in torch, channels-last, fp32 (what ONNX files come from)."""
    import torch

    from ssl_pretrain.engine.devices import resolve_device

    network, _ = load_network(model_dir)
    target = resolve_device(device)
    if target.type == "cpu":
        from ssl_pretrain.engine.allocator import keep_freed_memory

        keep_freed_memory()  # activations reuse heap blocks instead of fresh mmap pages every batch
    # channels-last: faster convolutions on CPUs too (BENCHMARKS.md, "Pretraining throughput")
    network = network.to(target).to(memory_format=torch.channels_last)
    if threads:
        torch.set_num_threads(threads)

    def run(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            images = torch.from_numpy(batch).to(target).contiguous(memory_format=torch.channels_last)
            return network(images).float().cpu().numpy()

    return run


def is_installed(runtime: str) -> bool:
    return importlib.util.find_spec(runtime) is not None


def _onnx_file(model_dir: Path, precision: str) -> Path | None:
    """The ONNX file ``precision`` asks for (``auto``: int8 where exported, else fp32), or None."""
    if precision not in PRECISIONS:
        raise ClassifierError(f"unknown precision '{precision}': choose {', '.join(PRECISIONS)}")
    int8, fp32 = model_dir / ONNX_INT8_FILE, model_dir / ONNX_FILE
    if precision == "int8" and not int8.is_file():
        raise ClassifierError(f"{model_dir} has no {ONNX_INT8_FILE}: run ssl-export --model {model_dir} "
                              "--format onnx --quantize int8")
    if precision in ("auto", "int8") and int8.is_file():
        return int8
    return fp32 if fp32.is_file() else None


def choose_runtime(model_dir: Path, runtime: str = "auto", precision: str = "auto") -> tuple[str, Path | None]:
    """``(runtime, ONNX file or None)`` for a model folder: what ``auto`` picks, or checks of an
    explicit choice (one-line errors naming the fix)."""
    if runtime not in RUNTIMES:
        raise ClassifierError(f"unknown runtime '{runtime}': choose {', '.join(RUNTIMES)}")
    onnx = _onnx_file(model_dir, precision)
    if runtime == "torch":
        if precision == "int8":
            raise ClassifierError("int8 runs in an ONNX runtime (openvino or onnxruntime), not torch")
        return "torch", None
    if runtime == "auto":
        precision_of_file = "int8" if onnx is not None and onnx.name == ONNX_INT8_FILE else "fp32"
        installed = [name for name in FASTEST[precision_of_file] if is_installed(name)]
        if onnx is None or not installed:
            if precision == "int8":
                raise ClassifierError("int8 needs openvino or onnxruntime installed (pip install onnxruntime)")
            return "torch", None
        return installed[0], onnx
    if onnx is None:
        raise ClassifierError(f"{model_dir} has no {ONNX_FILE}: run ssl-export --model {model_dir} --format onnx")
    if not is_installed(runtime):
        raise ClassifierError(f"the {runtime} runtime needs the {runtime} package (pip install {runtime})")
    return runtime, onnx


def onnx_runner(path: Path, threads: int | None) -> Callable[[np.ndarray], np.ndarray]:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    try:
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # noqa: BLE001 - onnxruntime raises its own unexported types
        raise ClassifierError(f"{path} could not be loaded by onnxruntime: {str(error).splitlines()[0][:160]}") from None
    name = session.get_inputs()[0].name
    return lambda batch: session.run(None, {name: batch})[0]


def openvino_runner(path: Path, threads: int | None) -> Callable[[np.ndarray], np.ndarray]:
    """OpenVINO reading the ONNX file, compiled for the CPU with its latency hint; one infer
    request, reused (a batch of any size: the file's batch dimension is dynamic). Float parts run
    in f32: OpenVINO's CPU default on a CPU with native bf16 is to run them in bf16, which would
    make "fp32" a different model (probabilities off by several hundredths)."""
    import openvino

    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    try:
        compiled = openvino.Core().compile_model(str(path), "CPU", config)
    except Exception as error:  # noqa: BLE001 - OpenVINO raises RuntimeError with multi-line reports
        raise ClassifierError(f"{path} could not be loaded by openvino: {str(error).splitlines()[0][:160]}") from None
    request, output = compiled.create_infer_request(), compiled.output(0)
    # the request's output memory is reused by the next call: the caller gets its own copy
    return lambda batch: np.array(request.infer({0: batch})[output], copy=True)
