"""Real-time figures of the saved classifier, every runtime side by side in one run.

    python scripts/bench_latency.py                              # ResNet-18 at 224 px, every runtime
    python scripts/bench_latency.py --models smallconv32,resnet18_224 --rounds 5 --frames 500

For each model a classifier is built as a user gets one: a random-init backbone with a linear
head trained by ``ssl-finetune`` on the built-in digits (so accuracy means something: the head
is real, only the features are random), exported to ONNX and to int8 (as ``ssl-export --quantize
int8`` quantises, calibrated and checked on the training digits; a file ``ssl-export`` would
refuse is still timed, and the log says so), then timed:

* ``torch eager fp32``, ``torch channels-last fp32`` (and bf16 where the CPU runs it natively);
* ``onnxruntime`` and ``openvino`` (when installed), each on the fp32 and the int8 file.

Network alone: one image of random pixels per call, p50 and p99 over ``--repeats`` calls, in
``--rounds`` rounds that take turns across the runtimes (the median round is reported, so a
neighbour's burst on a shared machine meets every runtime alike), plus batched images/s and
top-1 on the 450 test digits. End to end, one frame: a 640 x 480 JPEG (bytes, as a camera or a
socket gives it) to a label through ``Classifier.predict`` with the default runtime (``auto``),
p50 and p99 over ``--frames`` frames, taken in ``--rounds`` rounds that each start with the picked
runtime's network alone: the ratio to the network is the median round's. Folder: ``ssl-predict``'s
path over ``--folder`` PNG files as a ratio to the bare batched forward of the same runtime, in
``--folder-rounds`` rounds of bare forward then folder pass (the median round is reported).

The load average and the CPU time stolen by the hypervisor are read at the start and the end;
a table measured on a busy machine says so in its title.
"""

from __future__ import annotations

import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import benchmarking
from ssl_classifier.export import export_classifier
from ssl_classifier.quantize import calibration_batches, check_images, quantize_checked
from ssl_classifier.model import ONNX_FILE, ONNX_INT8_FILE, load_network, read_info
from ssl_classifier.predict import Classifier, predict_files
from ssl_classifier.preprocess import to_input
from ssl_classifier import runtimes
from ssl_classifier.runtimes import ONNX_RUNTIMES, onnx_runner, openvino_runner
from ssl_classifier.train import FinetuneSettings, train_classifier
from ssl_pretrain.checkpoint import BackboneInfo, export_backbone
from ssl_pretrain.data import digits_source
from ssl_pretrain.engine.allocator import keep_freed_memory
from ssl_pretrain.engine.hardware import cpu_bf16_native
from ssl_pretrain.models.backbones import build_backbone

MODELS = {
    # name: (architecture, small stem, input size) - smallconv32 is configs/cifar10_cpu.yaml's network
    "smallconv32": ("smallconv", False, 32),
    "resnet18_224": ("resnet18", False, 224),
    "resnet50_224": ("resnet50", False, 224),
}
QUIET_LOAD = 0.5
"""A 1-minute load average above this at the start, or more than ``QUIET_STEAL`` of the CPU time
stolen during the run, marks the table as measured on a busy machine."""
QUIET_STEAL = 0.02


def cpu_times() -> tuple[int, int]:
    """``(steal, total)`` jiffies of all CPUs so far (``/proc/stat``; zeros elsewhere)."""
    try:
        fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    return (fields[7] if len(fields) > 7 else 0), sum(fields)


def build_model(name: str, root: Path) -> Path:
    """A classifier folder for ``name``: random backbone + head trained on the digits, exported
    to ONNX fp32 and int8."""
    architecture, small_stem, size = MODELS[name]
    run = root / f"{name}-run"
    run.mkdir()
    torch.manual_seed(0)
    backbone, dim = build_backbone(architecture, small_stem)
    info = BackboneInfo(architecture, small_stem, dim, size, (0.25,) * 3, (0.35,) * 3)  # the digits' statistics
    export_backbone(run / "backbone.safetensors", backbone, info)
    model = root / name
    # a linear head on the (random) features: the benchmark times the network, not the training
    settings = FinetuneSettings(device="cpu", progress=False, overwrite=True, epochs=30, mode="linear")
    train_classifier(run, "builtin:digits:train", model, test="builtin:digits:test", settings=settings)
    export_classifier(model, "onnx")
    # int8 as ssl-export --quantize int8 makes it (again with the next recipe when a file misses
    # the check), checked on the training digits so that the test digits score each file
    # once, in the table; a file ssl-export would refuse is still timed, and the log says so
    batches, _ = calibration_batches("builtin:digits:train", size)
    check, _ = quantize_checked(model / ONNX_FILE, model / ONNX_INT8_FILE, batches,
                                check_images("builtin:digits:train", read_info(model)))
    print(f"  {name} int8 checked on the {check.images} training digits: top-1 {100 * check.top1_fp32:.1f}% fp32 "
          f"vs {100 * check.top1_int8:.1f}% int8" + (f", {check.recipe}" if check.recipe else "")
          + ("" if check.acceptable() else " - ssl-export would refuse this file"), file=sys.stderr)
    return model


def runners(model: Path) -> dict[str, object]:
    """Runtime name -> ``batch -> logits``."""
    eager, _ = load_network(model)
    fast = load_network(model)[0].to(memory_format=torch.channels_last)

    def torch_run(network, channels_last: bool, bf16: bool):
        def run(batch):
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                images = torch.from_numpy(batch)
                if channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                return network(images).float().numpy()
        return run

    found = {"torch eager fp32": torch_run(eager, False, False),
             "torch channels-last fp32": torch_run(fast, True, False)}
    if cpu_bf16_native():
        found["torch channels-last bf16"] = torch_run(fast, True, True)
    for runtime in ONNX_RUNTIMES:
        if runtimes.is_installed(runtime):
            make = openvino_runner if runtime == "openvino" else onnx_runner
            for precision, file in (("fp32", ONNX_FILE), ("int8", ONNX_INT8_FILE)):
                found[f"{runtime} {precision}"] = make(model / file, None)
    return found


def frame_times(call, inputs: list) -> list[float]:
    """Milliseconds of ``call(x)`` for each ``x`` of ``inputs``, one call each."""
    times = []
    for item in inputs:
        started = time.perf_counter()
        call(item)
        times.append(1000 * (time.perf_counter() - started))
    return times


def percentiles(times: list[float]) -> tuple[float, float]:
    """``(p50, p99)`` of ``times``."""
    times = sorted(times)
    return statistics.median(times), times[min(len(times) - 1, int(round(0.99 * (len(times) - 1))))]


def p50_p99(call, inputs: list) -> tuple[float, float]:
    """``(p50, p99)`` milliseconds of ``call(x)`` for each ``x`` of ``inputs``, one call each."""
    return percentiles(frame_times(call, inputs))


def latency_round(run, image: np.ndarray, repeats: int) -> tuple[float, float]:
    """``(p50, p99)`` milliseconds of ``repeats`` calls on one image, after a short warm-up."""
    for _ in range(5):
        run(image)
    return p50_p99(run, [image] * repeats)


def median_round(rounds: list[tuple[float, float]]) -> tuple[float, float]:
    """The round whose p50 is the median of the rounds' (its p99 with it)."""
    ordered = sorted(rounds)
    return ordered[len(ordered) // 2]


def test_inputs(size: int) -> tuple[np.ndarray, np.ndarray]:
    """The 450 test digits as the classifier sees them, ``(N, 3, S, S)`` float32, and their labels."""
    source = digits_source("test")
    return np.stack([to_input(source.load(index), size) for index in range(len(source))]), source.labels


def accuracy(run, inputs: np.ndarray, labels: np.ndarray, batch: int = 64) -> float:
    logits = np.concatenate([run(np.ascontiguousarray(inputs[start:start + batch]))
                             for start in range(0, len(inputs), batch)])
    return float(np.mean(logits.argmax(1) == labels))


def camera_frames(count: int, seed: int = 0) -> list[bytes]:
    """``count`` different 640 x 480 JPEG frames (quality 90) of smooth random content."""
    rng, frames = np.random.default_rng(seed), []
    for _ in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
        buffer = io.BytesIO()
        coarse.resize((640, 480), Image.BILINEAR).save(buffer, "JPEG", quality=90)
        frames.append(buffer.getvalue())
    return frames


def frame_latency(classifier: Classifier, frames: list[bytes], network, image: np.ndarray, rounds: int,
                  repeats: int) -> tuple[float, float, float]:
    """``(p50, p99, ratio)``: ms of JPEG bytes -> label, one frame per call, over every frame, and the
    median over ``rounds`` rounds of (frame p50 / network-alone p50). Each round times ``network``
    (the runtime the classifier picked, alone) right before its share of the frames, so a
    neighbour's burst meets both sides of the ratio."""
    for frame in frames[:10]:
        classifier.predict_frame(frame)
    times, ratios = [], []
    for share in np.array_split(np.arange(len(frames)), max(1, rounds)):
        network_p50, _ = latency_round(network, image, repeats)
        round_times = frame_times(classifier.predict_frame, [frames[index] for index in share])
        ratios.append(statistics.median(round_times) / network_p50)
        times += round_times
    p50, p99 = percentiles(times)
    return p50, p99, statistics.median(ratios)


def bench_model(name: str, args, root: Path) -> tuple[list[dict], dict]:
    model = build_model(name, root)
    size = MODELS[name][2]
    image = np.random.default_rng(0).random((1, 3, size, size), dtype=np.float32)
    batch = np.random.default_rng(1).random((args.batch, 3, size, size), dtype=np.float32)
    inputs, labels = test_inputs(size)
    found = runners(model)
    rounds = {runtime: [] for runtime in found}
    for _ in range(args.rounds):  # runtimes take turns, round after round
        for runtime, run in found.items():
            rounds[runtime].append(latency_round(run, image, args.repeats))
    rows = []
    for runtime, run in found.items():
        p50, p99 = median_round(rounds[runtime])
        rate = args.batch / benchmarking.seconds_per_call(lambda: run(batch), calls=max(2, int(64 / args.batch * 5)), warmup=1)
        rows.append({"model": name, "runtime": runtime, "p50": p50, "p99": p99, "throughput": rate,
                     "top1": accuracy(run, inputs, labels)})
        print(f"  {name} {runtime}: p50 {p50:.2f} ms, p99 {p99:.2f} ms, {rate:.0f} img/s, top-1 {rows[-1]['top1']:.3f}",
              file=sys.stderr)
    classifier = Classifier.load(model)  # the default: what a user's script gets
    picked = f"{classifier.runtime} {classifier.precision}"
    network = found.get(picked) or (lambda batch: classifier.logits(batch))
    p50, p99, ratio = frame_latency(classifier, camera_frames(args.frames), network, image, args.rounds, args.repeats)
    return rows, {"model": name, "runtime": picked, "p50": p50, "p99": p99, "ratio": ratio}


def folder_ratio(name: str, count: int, root: Path, rounds: int, seconds: float = 3.0) -> list[dict]:
    """``ssl-predict``'s files-in, CSV-out path vs the bare batched forward, per runtime choice.

    In ``rounds`` rounds, each timing the bare forward right before a pass over the folder (a
    neighbour's burst meets both); the round with the median ratio is reported."""
    model, size = root / name, MODELS[name][2]
    images = root / "images"
    images.mkdir(exist_ok=True)
    rng = np.random.default_rng(1)
    for index in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(images / f"{index:06d}.png")
    files = sorted(images.iterdir())
    for file in files:  # into the page cache: every pass reads from memory, the first one too
        file.read_bytes()
    rows = []
    for runtime, precision in (("auto", "auto"), ("torch", "fp32")):
        classifier = Classifier.load(model, runtime=runtime, precision=precision)
        batch = rng.random((64, 3, size, size), dtype=np.float32)
        calls = max(2, int(seconds / benchmarking.seconds_per_call(lambda: classifier.logits(batch), warmup=1)))
        predict_files(classifier, [str(file) for file in files[:64]], root / "warm.csv", progress=False)
        measured = []
        for _ in range(max(1, rounds)):
            bare = 64 / benchmarking.seconds_per_call(lambda: classifier.logits(batch), calls=calls)
            summary = predict_files(classifier, [str(images)], root / "predictions.csv", progress=False)
            end_to_end = summary.images / summary.seconds
            measured.append((end_to_end / bare, bare, end_to_end))
        ratio, bare, end_to_end = sorted(measured)[len(measured) // 2]
        rows.append({"runtime": f"{classifier.runtime} {classifier.precision}", "bare": bare,
                     "end_to_end": end_to_end, "ratio": ratio, "ratios": [each[0] for each in measured]})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = benchmarking.argument_parser(__doc__)
    parser.add_argument("--models", default="resnet18_224", help=f"comma-separated from {', '.join(MODELS)}")
    parser.add_argument("--repeats", type=int, default=100, help="single-image calls timed per runtime and round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of every runtime in turn; the median round is reported")
    parser.add_argument("--batch", type=int, default=32, help="batch of the throughput figure")
    parser.add_argument("--frames", type=int, default=500, help="640 x 480 JPEG frames for the end-to-end row")
    parser.add_argument("--folder", type=int, default=2000, help="PNG files for the ssl-predict row (0: skip)")
    parser.add_argument("--folder-rounds", type=int, default=3, help="passes over the folder, each after the bare "
                        "forward; the median round is reported")
    args = parser.parse_args(argv)
    keep_freed_memory()  # as ssl-predict, linear-probe and pretraining do on CPUs
    steal_start, total_start = cpu_times()
    title = benchmarking.header(__file__, argv, f"{args.rounds} rounds x {args.repeats} calls")
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        results = [bench_model(name.strip(), args, root) for name in args.models.split(",")]
        first = args.models.split(",")[0].strip()
        folder_rows = folder_ratio(first, args.folder, root, args.folder_rounds) if args.folder else []
    steal_end, total_end = cpu_times()
    steal = (steal_end - steal_start) / max(1, total_end - total_start)
    load_end = benchmarking.load_average()
    load_start = benchmarking.LOAD_AT_START
    quiet = (load_start is None or load_start[0] <= QUIET_LOAD) and steal <= QUIET_STEAL
    state = ("quiet machine" if quiet else "**NOT QUIET**") + (
        f": load {load_start[0]:.2f} at start, {load_end[0]:.2f} at end" if load_start and load_end else "") + \
        f", {100 * steal:.1f}% CPU stolen"
    print(f"\n{title}\n\nNetwork alone, batch of one ({state})\n")
    print(benchmarking.table_header("model", "runtime", "p50 ms", "p99 ms", f"images/s (batch {args.batch})",
                                    "p50 vs onnxruntime fp32", "top-1 (450 test digits)", left=2))
    for rows, _ in results:
        reference = next((row for row in rows if row["runtime"] == "onnxruntime fp32"), None)
        for row in rows:
            ratio = f"{row['p50'] / reference['p50']:.2f}x" if reference else "-"
            print(benchmarking.table_row(row["model"], row["runtime"], f"{row['p50']:.2f}", f"{row['p99']:.2f}",
                                         f"{row['throughput']:.0f}", ratio, f"{100 * row['top1']:.1f}%"))
    print(f"\nEnd to end, one frame: 640 x 480 JPEG bytes -> label, Classifier.predict, default runtime ({state})\n")
    print(benchmarking.table_header("model", "runtime (auto)", "p50 ms", "p99 ms",
                                    f"p50 vs network alone (median of {args.rounds} rounds)", left=2))
    for _, frame in results:
        print(benchmarking.table_row(frame["model"], frame["runtime"], f"{frame['p50']:.2f}", f"{frame['p99']:.2f}",
                                     f"{frame['ratio']:.2f}x"))
    if folder_rows:
        print(f"\nssl-predict over {args.folder} PNG files ({first}) vs the bare batched forward ({state})\n")
        print(benchmarking.table_header("runtime", "bare forward images/s", "ssl-predict images/s",
                                        f"ratio (median of {args.folder_rounds} rounds)", "every round"))
        for row in folder_rows:
            print(benchmarking.table_row(row["runtime"], f"{row['bare']:.0f}", f"{row['end_to_end']:.0f}",
                                         f"{row['ratio']:.2f}x", " / ".join(f"{ratio:.2f}" for ratio in row["ratios"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
