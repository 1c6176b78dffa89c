"""int8 recipes side by side: what each costs in accuracy in each runtime, on this CPU.

    python scripts/bench_int8_recipes.py                          # ResNet-18 at 224 px
    scripts/avx2_only/run.sh python scripts/bench_int8_recipes.py # as on an AVX2-only CPU

The classifier is ``bench_latency.py``'s (a random-init backbone, a linear head trained on the
built-in digits, exported to ONNX). Each recipe quantises it, calibrated on the training digits
as ``ssl-export --quantize int8`` is, and every file is scored once on the 450 test digits in
onnxruntime and OpenVINO (when installed), with the p50 of single-image calls beside it. The
recipes differ from ``ssl_classifier.quantize``'s (``7-bit weights``) in one setting each.

Run it under ``scripts/avx2_only/run.sh`` to see what a CPU without VNNI does to the same files:
with 8-bit weights its 16-bit pair sums saturate.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import benchmarking
from bench_latency import MODELS, accuracy, build_model, test_inputs
from ssl_classifier import runtimes
from ssl_classifier.model import ONNX_FILE
from ssl_classifier.quantize import calibration_batches, quantize_onnx
from ssl_classifier.runtimes import ONNX_RUNTIMES, onnx_runner, openvino_runner


def recipes() -> dict[str, dict]:
    """Recipe name -> ``quantize_onnx`` keyword arguments."""
    from onnxruntime.quantization import CalibrationMethod

    return {
        "8-bit weights": {"overrides": {"reduce_range": False}},
        "7-bit weights (ssl-export)": {},
        "percentile calibration (ssl-export's second try)": {"overrides": {"calibrate_method": CalibrationMethod.Percentile}},
        "7-bit weights, stem convolution in float (ssl-export's third try)": {"float_stem": True},
        "entropy calibration": {"overrides": {"calibrate_method": CalibrationMethod.Entropy}},
    }


def median_ms(run, image: np.ndarray, calls: int) -> float:
    for _ in range(5):
        run(image)
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        run(image)
        times.append(1000 * (time.perf_counter() - started))
    return float(np.median(times))


def main(argv: list[str] | None = None) -> int:
    parser = benchmarking.argument_parser(__doc__)
    parser.add_argument("--model", default="resnet18_224", choices=sorted(MODELS))
    parser.add_argument("--recipes", default="all", help="comma-separated recipe names' first words, or all")
    parser.add_argument("--calls", type=int, default=50, help="single-image calls timed per file and runtime")
    args = parser.parse_args(argv)
    title = benchmarking.header(__file__, argv, args.model)
    chosen = {name: kwargs for name, kwargs in recipes().items()
              if args.recipes == "all" or any(name.startswith(word.strip()) for word in args.recipes.split(","))}
    installed = [name for name in ONNX_RUNTIMES if runtimes.is_installed(name)]
    size = MODELS[args.model][2]
    inputs, labels = test_inputs(size)
    image = np.random.default_rng(0).random((1, 3, size, size), dtype=np.float32)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        model = build_model(args.model, root)
        batches, _ = calibration_batches("builtin:digits:train", size)
        files = {"fp32": model / ONNX_FILE}
        for index, (name, kwargs) in enumerate(chosen.items()):
            files[name] = root / f"recipe{index}.onnx"
            quantize_onnx(model / ONNX_FILE, files[name], batches, **kwargs)
        for name, path in files.items():
            row = [name]
            for runtime in installed:
                run = (openvino_runner if runtime == "openvino" else onnx_runner)(path, None)
                row += [f"{100 * accuracy(run, inputs, labels):.1f}%", f"{median_ms(run, image, args.calls):.2f}"]
            rows.append(row)
            print(f"  {' | '.join(row)}", file=sys.stderr)
    print(f"\n{title}\n")
    columns = [header for runtime in installed for header in (f"{runtime} top-1", f"{runtime} p50 ms")]
    print(benchmarking.table_header("file", *columns))
    for row in rows:
        print(benchmarking.table_row(*row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
