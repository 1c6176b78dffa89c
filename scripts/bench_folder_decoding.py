"""``ssl-predict`` over a folder: decoding in threads (what it does) against worker processes (what
it did before) and against decoding inline, as ratios to the bare batched forward of the runtime.

    python scripts/bench_folder_decoding.py                                # ResNet-18, 224-px PNGs
    python scripts/bench_folder_decoding.py --models smallconv32 --files 5000

The classifier is ``bench_latency.py``'s (random backbone, linear head on the digits, ONNX fp32 and
int8); ``auto`` takes the fastest installed runtime for it, as ``ssl-predict`` does, ``torch`` is
the fallback. The files are PNGs of random pixels at the network's input size. Each contender runs
``predict_files`` twice (the first warms the page cache) in every round; rounds take turns across
the contenders and the best round of each is kept. Also printed: one core's decode time per file
(the whole decode path) and the float conversion of one batch.
"""

from __future__ import annotations

import multiprocessing
import sys
import tempfile
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

import benchmarking
from bench_latency import MODELS, QUIET_LOAD, QUIET_STEAL, build_model, cpu_times
from ssl_classifier import predict
from ssl_classifier.predict import Classifier, predict_files


def process_batches(items, size, batch_size, workers, prefetch=2):
    """The previous design: ``_prepare_chunk`` in worker processes, forked where that is safe
    (not after OpenVINO has started its thread pool: then from a fork server)."""
    if workers <= 0:
        yield from (predict._prepare_chunk(chunk, size) for chunk in predict._chunks(items, batch_size))
        return
    method = "fork" if "openvino" not in sys.modules else "forkserver"
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method)) as pool:
        pending: deque = deque()
        for chunk in predict._chunks(items, batch_size):
            pending.append(pool.submit(predict._prepare_chunk, chunk, size))
            if len(pending) > workers + prefetch:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


@contextmanager
def decoding(kind: str):
    threads = predict._prepared_batches
    predict._prepared_batches = process_batches if kind == "processes" else threads
    try:
        yield
    finally:
        predict._prepared_batches = threads


def write_files(folder: Path, count: int, size: int) -> list[str]:
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(1)
    for index in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{index:06d}.png")
    return sorted(str(path) for path in folder.glob("*.png"))


def main(argv: list[str] | None = None) -> int:
    parser = benchmarking.argument_parser(__doc__)
    parser.add_argument("--models", default="resnet18_224", help=f"one of {', '.join(MODELS)}")
    parser.add_argument("--files", type=int, default=1000, help="PNG files in the folder")
    parser.add_argument("--workers", default="1,2", help="decoding workers to try (comma-separated)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of every contender in turn; the best is kept")
    parser.add_argument("--runtimes", default="auto,torch", help="auto (the fastest installed) and/or torch")
    args = parser.parse_args(argv)
    steal_start, total_start = cpu_times()
    title = benchmarking.header(__file__, argv, f"{args.files} files, {args.rounds} rounds")
    name, size = args.models, MODELS[args.models][2]
    workers = [int(count) for count in args.workers.split(",")]
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        model = build_model(name, root)
        paths = write_files(root / "images", args.files, size)
        chunks = list(predict._chunks(((path, path) for path in paths), 64))
        decode_ms = 1000 * min(benchmarking.seconds_per_call(
            lambda: [predict._prepare_chunk(chunk, size) for chunk in chunks]) for _ in range(3)) / len(paths)
        batch = predict._prepare_chunk(chunks[0], size)[1]
        convert_ms = 1000 * benchmarking.seconds_per_call(lambda: predict._to_float(batch), calls=10, warmup=1)
        rows: dict[tuple[str, str, int], float] = {}
        bare: dict[str, float] = {}
        for runtime in args.runtimes.split(","):
            classifier = Classifier.load(model, runtime=runtime, precision="auto" if runtime == "auto" else "fp32")
            label = f"{classifier.runtime} {classifier.precision}"
            inputs = predict._to_float(batch)
            calls = max(2, int(3 / benchmarking.seconds_per_call(lambda: classifier.logits(inputs), warmup=1)))
            bare[label] = 64 / benchmarking.seconds_per_call(lambda: classifier.logits(inputs), calls=calls)
            contenders = [("inline", 0)] + [(kind, count) for count in workers for kind in ("threads", "processes")]
            for _ in range(args.rounds):
                for kind, count in contenders:
                    with decoding(kind):
                        predict_files(classifier, [str(root / "images")], root / "warm.csv", workers=count, progress=False)
                        started = time.perf_counter()
                        summary = predict_files(classifier, [str(root / "images")], root / "out.csv", workers=count,
                                                progress=False)
                    speed = summary.images / (time.perf_counter() - started)
                    rows[(label, kind, count)] = max(speed, rows.get((label, kind, count), 0.0))
    steal_end, total_end = cpu_times()
    steal = (steal_end - steal_start) / max(1, total_end - total_start)
    load_start, load_end = benchmarking.LOAD_AT_START, benchmarking.load_average()
    quiet = (load_start is None or load_start[0] <= QUIET_LOAD) and steal <= QUIET_STEAL
    state = ("quiet machine" if quiet else "**NOT QUIET**") + (
        f": load {load_start[0]:.2f} at start, {load_end[0]:.2f} at end" if load_start and load_end else "") + \
        f", {100 * steal:.1f}% CPU stolen"
    print(f"\n{title}\n\n{name}, {len(paths)} PNG files of {size} px ({state}); one core decodes a file in "
          f"{decode_ms:.2f} ms, converts a batch of 64 to float in {convert_ms:.1f} ms\n")
    print(benchmarking.table_header("runtime", "decoding", "workers", "bare forward images/s", "ssl-predict images/s",
                                    "ratio", left=3))
    for (label, kind, count), speed in rows.items():
        print(benchmarking.table_row(label, kind, count, f"{bare[label]:.0f}", f"{speed:.0f}",
                                     f"{speed / bare[label]:.2f}x"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
