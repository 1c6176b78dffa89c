"""How to spend a CPU's cores on one training step: torch's threads inside each operation, or one
process per core (DistributedDataParallel over gloo). Bare forward + backward + SGD step of the
preset's network on random tensors, global batch fixed, side by side in one run:

    python scripts/bench_cpu_parallel.py --config configs/cifar10_cpu.yaml --batch 128

* ``threads``: one process, ``--cores`` intra-op threads, the whole batch (what ssl-pretrain does);
* ``processes, no communication``: ``--cores`` processes with one thread and batch/cores images
  each, nothing exchanged - the ceiling of data parallelism (not a valid training step);
* ``DDP``: the same with DistributedDataParallel's gradient all-reduce (gloo);
* ``DDP + gathered negatives``: and NT-Xent over the global batch (lightly's gather), what
  ``torchrun --nproc-per-node N -m ssl_pretrain`` runs on a CPU.

Images/s of the global batch, the best of three rounds of ``--steps`` steps each.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import benchmarking


CONTENDERS = [("processes, no communication", False, False), ("DDP", True, False),
              ("DDP + gathered negatives", True, True)]


def model_and_views(config: str, overrides: list[str], batch: int, gather: bool = False):
    from ssl_pretrain.config import load_config
    from ssl_pretrain.methods import build_model

    cfg = load_config(config, ["data.source=unused", "train.precision=fp32", *overrides])
    torch.manual_seed(0)
    model = build_model(cfg, gather_distributed=gather).to(memory_format=torch.channels_last)
    size = cfg.augment.input_size
    views = [torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last) for _ in range(2)]
    return model, views


def timed(step, steps: int) -> float:
    """Seconds per step, the best of three rounds (after three warm-up steps)."""
    for _ in range(3):
        step()

    def round_seconds() -> float:
        if dist.is_initialized():  # the ranks start each round together
            dist.barrier()
        return benchmarking.seconds_per_call(step, steps)

    return min(round_seconds() for _ in range(3))


def sgd_step(network, model, views):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        loss = network(views)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def rank_main(rank: int, cores: int, args, contender: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port + contender), RANK=str(rank),
                      WORLD_SIZE=str(cores))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    _, ddp, gather = CONTENDERS[contender]
    model, views = model_and_views(args.config, args.overrides, args.batch // cores, gather)
    network = torch.nn.parallel.DistributedDataParallel(model) if ddp else model
    seconds = timed(sgd_step(network, model, views), args.steps)
    if rank == 0:
        results[contender] = args.batch / seconds
    if dist.is_initialized():
        dist.destroy_process_group()


def main(argv=None) -> int:
    parser = benchmarking.argument_parser(__doc__)
    parser.add_argument("--config", default="configs/cifar10_cpu.yaml")
    benchmarking.add_settings(parser)
    parser.add_argument("--batch", type=int, default=128, help="global batch")
    parser.add_argument("--cores", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--port", type=int, default=29611)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.cores)
    model, views = model_and_views(args.config, args.overrides, args.batch)
    rows = [("threads", args.batch / timed(sgd_step(model, model, views), args.steps))]
    with mp.Manager() as manager:
        results = manager.dict()
        for contender in range(len(CONTENDERS)):
            mp.spawn(rank_main, args=(args.cores, args, contender, results), nprocs=args.cores)
        rows += [(CONTENDERS[index][0], results[index]) for index in range(len(CONTENDERS))]
    print(benchmarking.header(__file__, argv, f"batch {args.batch} ({args.batch // args.cores} per process)",
                              " ".join(args.overrides)))
    print(benchmarking.table_header(f"{args.cores} cores spent on", "images/s", "vs threads"))
    for name, rate in rows:
        print(benchmarking.table_row(name, f"{rate:.0f}", f"{rate / rows[0][1]:.2f}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
