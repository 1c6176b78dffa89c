"""SimCLR's loss over multi-crop views: lightly's ``NTXentLoss`` per pair (four products and a
masked copy each) against the one-pass ``multicrop_ntxent`` that ``ssl-pretrain`` trains with,
side by side in one run, contenders interleaved, median of ``--rounds``:

    python scripts/bench_loss.py --config configs/cifar10_cpu.yaml --threads 1

* ``loss``: forward + backward of the loss alone on random projections (batch and projection
  size from the preset), for 2 views (plain SimCLR) and 2 + N crops;
* ``step``: the preset's whole SimCLR training step (forward, loss, backward, SGD) on ready views,
  2 x ``input_size`` + ``--crops`` x ``local_size`` px, the method's one-pass loss against
  lightly's per pair - what the loss saves of a step.

Both losses give the same values and gradients (tests/test_loss.py).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_throughput import fresh_step  # noqa: E402

from ssl_pretrain.config import load_config  # noqa: E402
from ssl_pretrain.engine.hardware import cpu_name, describe_cpu  # noqa: E402
from ssl_pretrain.methods.simclr import multicrop_ntxent  # noqa: E402
from ssl_pretrain.train import train_step  # noqa: E402


def interleaved(contenders: dict, repeats: int, rounds: int) -> dict[str, float]:
    """Median milliseconds per call of each contender, the contenders taking turns each round."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for run in contenders.values():  # warm-up
        run()
    for _ in range(rounds):
        for name, run in contenders.items():
            started = time.perf_counter()
            for _ in range(repeats):
                run()
            times[name].append((time.perf_counter() - started) / repeats * 1000)
    return {name: statistics.median(values) for name, values in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/cifar10_cpu.yaml")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--crops", type=int, default=4, help="small crops in the step comparison")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config, ["data.source=unused", "method=simclr", "train.precision=fp32",
                                    f"augment.local_views={args.crops}"])
    batch, dim, temperature = cfg.train.batch_size, cfg.simclr.output_dim, cfg.simclr.temperature
    step = fresh_step(cfg, torch.device("cpu"))
    lightly_loss = step.model.criterion
    print(f"{date.today()}, {cpu_name()} ({platform.machine()}, {describe_cpu()}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; batch {batch}, projections {dim}-d, T={temperature}\n")

    def per_pair(projections):
        pairs = [(0, 1)] + [(g, v) for v in range(2, len(projections)) for g in (0, 1)]
        return sum(lightly_loss(projections[a], projections[b]) for a, b in pairs) / len(pairs)

    print("| views | lightly's NTXentLoss per pair (ms) | one pass (ms) | speed-up |")
    print("| --- | ---: | ---: | ---: |")
    for views in (2, 4, 6, 8):
        projections = [torch.randn(batch, dim, requires_grad=True) for _ in range(views)]
        ms = interleaved({"lightly": lambda: per_pair(projections).backward(),
                          "ours": lambda: multicrop_ntxent(projections, temperature).backward()}, 10, args.rounds)
        print(f"| 2 + {views - 2} | {ms['lightly']:.1f} | {ms['ours']:.1f} | {ms['lightly'] / ms['ours']:.2f}x |")

    size, local = cfg.augment.input_size, cfg.augment.local_size
    ready = [torch.rand(batch, 3, size, size) for _ in range(2)] + [
        torch.rand(batch, 3, local, local) for _ in range(args.crops)]

    def with_loss(fused: bool):
        def run():
            step.model.fused = fused
            train_step(step, ready)
        return run

    ms = interleaved({"lightly": with_loss(False), "ours": with_loss(True)}, 4, args.rounds)
    print(f"\n| {cfg.model.backbone} step, 2 x {size} px + {args.crops} x {local} px | ms/step | images/s |")
    print("| --- | ---: | ---: |")
    for name, label in (("lightly", "lightly's NTXentLoss per pair"), ("ours", "one-pass loss (ssl-pretrain)")):
        print(f"| {label} | {ms[name]:.0f} | {batch * 1000 / ms[name]:.0f} |")
    print(f"\none-pass / per-pair images/s: {ms['lightly'] / ms['ours']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
