"""Real-time figures of the saved classifier, side by side in one run.

    python scripts/bench_latency.py                       # CPU preset model at 32 px, ResNet-18/50 at 224 px
    python scripts/bench_latency.py --models smallconv32 --end-to-end 5000

For each model, a classifier is saved exactly as ``ssl-finetune`` saves one (random weights: speed
does not depend on their values), loaded back through ``ssl_classifier.Classifier`` / the files,
and timed in each runtime:

* ``torch eager``: fp32, the default memory format, as a plain ``load_network`` gives it;
* ``torch channels-last fp32``: what ``ssl-predict --runtime torch`` runs;
* ``torch channels-last bf16``: autocast, only where the CPU runs bf16 natively (AMX or
  AVX512-BF16, not held below them by ``ONEDNN_MAX_CPU_ISA``: ``ssl_pretrain.engine.hardware``); ``compiled``: ``torch.compile`` of the same, with ``--compile``;
* ``onnxruntime``: ``classifier.onnx`` from ``ssl-export``, CPU execution provider.

Single-image latency: p50 and p99 over ``--repeats`` calls with a batch of one (after warm-up).
Batched throughput: images/s at ``--batch``. ``--end-to-end N``: ``ssl-predict``'s path (PNG files
read, decoded, preprocessed by threads, batched forward, CSV written) on N files, as a ratio to
the bare batched forward of the same runtime. Prints Markdown tables with the machine and date.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

from ssl_classifier.export import export_classifier
from ssl_classifier.model import ClassifierInfo, ImageClassifier, load_network, save_classifier
from ssl_classifier.predict import Classifier, predict_files
from ssl_pretrain.engine.allocator import keep_freed_memory
from ssl_pretrain.models.backbones import build_backbone
from ssl_pretrain.engine.hardware import cpu_bf16_native, cpu_name

MODELS = {
    # name: (architecture, small_stem, input size) - smallconv32 is configs/cifar10_cpu.yaml's network
    "smallconv32": ("smallconv", False, 32),
    "resnet18_224": ("resnet18", False, 224),
    "resnet50_224": ("resnet50", False, 224),
}


def save_model(folder: Path, name: str, classes: int = 10) -> Path:
    architecture, small_stem, size = MODELS[name]
    torch.manual_seed(0)
    backbone, dim = build_backbone(architecture, small_stem, size)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    info = ClassifierInfo([str(c) for c in range(classes)], architecture, small_stem, dim, size, mean, std)
    save_classifier(folder, ImageClassifier(backbone, dim, classes, mean, std).eval(), info)
    return folder


def latencies(run, batch: np.ndarray, repeats: int, warmup: int = 5) -> tuple[float, float]:
    """(p50, p99) milliseconds of ``run(batch)``."""
    for _ in range(warmup):
        run(batch)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run(batch)
        times.append(1000 * (time.perf_counter() - started))
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, int(round(0.99 * (len(times) - 1))))]


def throughput(run, batch: np.ndarray, seconds: float = 3.0) -> float:
    run(batch)
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        run(batch)
        count += len(batch)
    return count / (time.perf_counter() - started)


def _torch_run(network, channels_last: bool, bf16: bool):
    def run(batch):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            images = torch.from_numpy(batch)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            return network(images).float().numpy()

    return run


def torch_runners(folder: Path, compile_model: bool) -> dict:
    """Runtime name -> ``batch -> logits``: eager as loaded, then the settings the project knows."""
    eager, _ = load_network(folder)
    fast, _ = load_network(folder)
    fast = fast.to(memory_format=torch.channels_last)
    runners = {"torch eager (fp32)": _torch_run(eager, False, False),
               "torch channels-last fp32 (ssl-predict)": _torch_run(fast, True, False)}
    if cpu_bf16_native():
        runners["torch channels-last bf16"] = _torch_run(fast, True, True)
    if compile_model:
        runners["torch channels-last compiled" + (" bf16" if cpu_bf16_native() else "")] = \
            _torch_run(torch.compile(fast), True, cpu_bf16_native())
    return runners


def bench_model(name: str, args, root: Path) -> list[dict]:
    folder = save_model(root / name, name)
    export_classifier(folder, "onnx")
    size = MODELS[name][2]
    rng = np.random.default_rng(0)
    single = rng.random((1, 3, size, size), dtype=np.float32)
    batch = rng.random((args.batch, 3, size, size), dtype=np.float32)
    runners = torch_runners(folder, args.compile)
    runners["onnxruntime"] = Classifier.load(folder, runtime="onnxruntime").logits
    rows = []
    for runtime, run in runners.items():
        p50, p99 = latencies(run, single, args.repeats)
        rows.append({"model": name, "runtime": runtime, "p50": p50, "p99": p99,
                     "throughput": throughput(run, batch, args.seconds)})
        print(f"  {name} {runtime}: p50 {p50:.2f} ms, p99 {p99:.2f} ms, {rows[-1]['throughput']:.0f} img/s",
              file=sys.stderr)
    return rows


def end_to_end(name: str, count: int, args, root: Path) -> list[dict]:
    """ssl-predict's files-in, CSV-out path vs the bare batched forward, per runtime."""
    from PIL import Image

    folder = root / name
    size = MODELS[name][2]
    images = root / "images"
    images.mkdir(exist_ok=True)
    rng = np.random.default_rng(1)
    for index in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(images / f"{index:06d}.png")
    rows = []
    for runtime in ("torch", "onnxruntime"):
        classifier = Classifier.load(folder, runtime=runtime)
        batch = rng.random((64, 3, size, size), dtype=np.float32)
        bare = throughput(classifier.logits, batch, args.seconds)
        predict_files(classifier, [str(images)], root / "warm.csv", progress=False)  # page cache, threads
        summary = predict_files(classifier, [str(images)], root / "predictions.csv", progress=False)
        rate = summary.images / summary.seconds
        rows.append({"runtime": runtime, "bare": bare, "end_to_end": rate})
        print(f"  end to end {runtime}: {rate:.0f} img/s vs bare {bare:.0f}", file=sys.stderr)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated from {', '.join(MODELS)}")
    parser.add_argument("--repeats", type=int, default=200, help="single-image calls timed per runtime")
    parser.add_argument("--batch", type=int, default=64, help="batch of the throughput figure")
    parser.add_argument("--seconds", type=float, default=3.0, help="time spent per throughput figure")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the channels-last model (compiling takes a minute)")
    parser.add_argument("--end-to-end", type=int, default=5000, help="files for the ssl-predict row (0: skip)")
    args = parser.parse_args(argv)
    keep_freed_memory()  # as ssl-predict, linear-probe and pretraining do on CPUs
    print(f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"ISA {torch.backends.cpu.get_cpu_capability()}, bf16 native: {cpu_bf16_native()}, {date.today()}")
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        rows = [row for name in args.models.split(",") for row in bench_model(name.strip(), args, root)]
        print("\n| model | runtime | p50 ms (1 image) | p99 ms | images/s (batch %d) | vs eager |" % args.batch)
        print("|---|---|---:|---:|---:|---:|")
        for row in rows:
            eager = next(r for r in rows if r["model"] == row["model"] and r["runtime"].startswith("torch eager"))
            print(f"| {row['model']} | {row['runtime']} | {row['p50']:.2f} | {row['p99']:.2f} | "
                  f"{row['throughput']:.0f} | {row['throughput'] / eager['throughput']:.2f}x |")
        if args.end_to_end and "smallconv32" in args.models:
            e2e = end_to_end("smallconv32", args.end_to_end, args, root)
            print(f"\n| ssl-predict on {args.end_to_end} PNG files (smallconv32) | bare batched forward img/s | "
                  "end-to-end img/s | ratio |")
            print("|---|---:|---:|---:|")
            for row in e2e:
                print(f"| {row['runtime']} | {row['bare']:.0f} | {row['end_to_end']:.0f} | "
                      f"{row['end_to_end'] / row['bare']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
