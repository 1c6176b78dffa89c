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

import torch

from ssl_pretrain.config import load_config
from ssl_pretrain.methods.simclr import multicrop_ntxent
from ssl_pretrain.train import train_step

import benchmarking
from bench_throughput import fresh_step


def median_ms(contenders: dict, repeats: int, rounds: int) -> dict[str, float]:
    """Median milliseconds per call of each contender (after one warm-up call), the contenders
    taking turns each round."""
    for run in contenders.values():
        run()
    return benchmarking.interleaved({name: lambda run=run: 1000 * benchmarking.seconds_per_call(run, repeats)
                                     for name, run in contenders.items()}, rounds)


def main(argv=None) -> int:
    parser = benchmarking.argument_parser(__doc__)
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
    print(benchmarking.header(__file__, argv, f"batch {batch}, projections {dim}-d, T={temperature}") + "\n")

    def per_pair(projections):
        pairs = [(0, 1)] + [(g, v) for v in range(2, len(projections)) for g in (0, 1)]
        return sum(lightly_loss(projections[a], projections[b]) for a, b in pairs) / len(pairs)

    print(benchmarking.table_header("views", "lightly's NTXentLoss per pair (ms)", "one pass (ms)", "speed-up"))
    for views in (2, 4, 6, 8):
        projections = [torch.randn(batch, dim, requires_grad=True) for _ in range(views)]
        ms = median_ms({"lightly": lambda: per_pair(projections).backward(),
                        "ours": lambda: multicrop_ntxent(projections, temperature).backward()}, 10, args.rounds)
        print(benchmarking.table_row(f"2 + {views - 2}", f"{ms['lightly']:.1f}", f"{ms['ours']:.1f}",
                                     f"{ms['lightly'] / ms['ours']:.2f}x"))

    size, local = cfg.augment.input_size, cfg.augment.local_size
    ready = [torch.rand(batch, 3, size, size) for _ in range(2)] + [
        torch.rand(batch, 3, local, local) for _ in range(args.crops)]

    def with_loss(fused: bool):
        def run():
            step.model.fused = fused
            train_step(step, ready)
        return run

    ms = median_ms({"lightly": with_loss(False), "ours": with_loss(True)}, 4, args.rounds)
    print("\n" + benchmarking.table_header(f"{cfg.model.backbone} step, 2 x {size} px + {args.crops} x {local} px",
                                           "ms/step", "images/s"))
    for name, label in (("lightly", "lightly's NTXentLoss per pair"), ("ours", "one-pass loss (ssl-pretrain)")):
        print(benchmarking.table_row(label, f"{ms[name]:.0f}", f"{batch * 1000 / ms[name]:.0f}"))
    print(f"\none-pass / per-pair images/s: {ms['lightly'] / ms['ours']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
