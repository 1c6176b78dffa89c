"""Where one camera frame's time goes in ``Classifier.predict_frame``: decoding, resizing, the
float conversion, the network - and the network alone in a hot loop against the same network
called between frames (what decoding does to its caches and threads).

    python scripts/bench_frame_stages.py
    scripts/avx2_only/run.sh python scripts/bench_frame_stages.py     # as on an AVX2-only CPU

The classifier is ``bench_latency.py``'s (ResNet-18 at 224 px by default, exported to ONNX and
int8) in the default runtime; the frames are its 640 x 480 JPEG frames. Each stage is the median
over ``--frames`` frames, in ``--rounds`` rounds (the median round is shown). The last row times
Pillow's resize of the same decoded frames, the resampling ``predict_frame`` used before.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torchvision.transforms as T

import benchmarking
from bench_latency import MODELS, build_model, camera_frames
from ssl_classifier.predict import Classifier, _name, _rows, softmax
from ssl_classifier.preprocess import as_pil, resize_and_crop

STAGES = ("decode (as_pil, JPEG at reduced size)", "resize and crop (torch's uint8 antialiased bicubic)",
          "to float (3, S, S)", "network, between frames", "probabilities and rows", "predict_frame, whole")
PILLOW = "for comparison: resize and crop with Pillow (torchvision on a PIL image)"


def one_round(classifier: Classifier, frames: list[bytes]) -> dict[str, float]:
    size, times = classifier.info.input_size, {stage: [] for stage in (*STAGES, PILLOW)}
    pillow = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size)])
    buffer = np.empty((1, 3, size, size), dtype=np.float32)
    for frame in frames:
        marks = [time.perf_counter()]
        image = as_pil(frame, min_side=size)
        marks.append(time.perf_counter())
        pixels = resize_and_crop(image, size)
        marks.append(time.perf_counter())
        np.multiply(pixels.transpose(2, 0, 1), np.float32(1.0 / 255.0), out=buffer[0], casting="unsafe")
        marks.append(time.perf_counter())
        logits = classifier.logits(buffer)
        marks.append(time.perf_counter())
        next(_rows([_name(frame, 0)], softmax(logits), [None], classifier.classes, 5))
        marks.append(time.perf_counter())
        for stage, start, end in zip(STAGES, marks, marks[1:]):
            times[stage].append(end - start)
        started = time.perf_counter()
        classifier.predict_frame(frame)
        times[STAGES[-1]].append(time.perf_counter() - started)
        started = time.perf_counter()
        np.asarray(pillow(image))
        times[PILLOW].append(time.perf_counter() - started)
    return {stage: 1000 * statistics.median(values) for stage, values in times.items()}


def hot_network(classifier: Classifier, calls: int) -> float:
    size = classifier.info.input_size
    image = np.random.default_rng(0).random((1, 3, size, size), dtype=np.float32)
    for _ in range(10):
        classifier.logits(image)
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        classifier.logits(image)
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = benchmarking.argument_parser(__doc__)
    parser.add_argument("--model", default="resnet18_224", choices=sorted(MODELS))
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    title = benchmarking.header(__file__, argv, f"{args.rounds} rounds x {args.frames} frames")
    frames = camera_frames(args.frames)
    with tempfile.TemporaryDirectory() as folder:
        classifier = Classifier.load(build_model(args.model, Path(folder)))
        for frame in frames[:10]:
            classifier.predict_frame(frame)
        rounds = []
        for _ in range(args.rounds):
            result = one_round(classifier, frames)
            result["network alone, hot loop"] = hot_network(classifier, args.frames)
            rounds.append(result)
    middle = sorted(rounds, key=lambda result: result[STAGES[-1]])[len(rounds) // 2]
    print(f"\n{title}\n\n{args.model}, {classifier.runtime} {classifier.precision}\n")
    print(benchmarking.table_header("stage", "p50 ms"))
    for stage, value in middle.items():
        print(benchmarking.table_row(stage, f"{value:.3f}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
