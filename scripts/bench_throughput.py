"""Pretraining throughput, side by side in one run: bare step vs our pipeline vs a lightly-style loop.

    python scripts/bench_throughput.py --data /tmp/cifar10/train --config configs/cifar10_cpu.yaml

* bare:    forward + backward + step of the same model and batch on ready tensors (the ceiling);
* ours:    the full pipeline of ``ssl-pretrain`` (read, decode, two views, step), as configured;
* lightly: a loop written the way lightly's SimCLR example is (per-image ``SimCLRTransform`` in a
           torchvision-style folder dataset, DataLoader workers, same backbone, batch and recipe,
           the model in fp32 and the default memory format, as the example leaves it).

Images/s counts images (each image gives two views). Prints a Markdown table with the ratios.

``--sweep`` adds a second table: the bare step of the same model in each precision (fp32, bf16
autocast) and memory format (default, channels-last), as ratios to fp32 / default format - the
figures behind the preset's ``train.precision`` and ``train.channels_last`` choices.
"""

from __future__ import annotations

import os
import sys
from itertools import chain

import torch
from torch.utils.data import DataLoader, Dataset

from ssl_pretrain.engine.allocator import keep_freed_memory
from ssl_pretrain.config import load_config
from ssl_pretrain.data import open_source, random_subset
from ssl_pretrain.methods import build_model
from ssl_pretrain.engine.optim import build_optimizer, build_scheduler
from ssl_pretrain.train import build_loader, make_step, resolve_device, train_step
from ssl_pretrain.augment.transforms import build_view_transform

import benchmarking


def timed_steps(batches, step, warmup: int, steps: int, batch_size: int) -> float:
    """Images/s over ``steps`` steps after ``warmup`` untimed ones."""
    iterator = iter(batches)
    return batch_size / benchmarking.seconds_per_call(lambda: train_step(step, next(iterator)["views"]), steps, warmup)


def fresh_step(cfg, device):
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    optimizer = build_optimizer(model, cfg.optim, cfg.train.batch_size)
    scheduler = build_scheduler(optimizer, cfg.optim, 1000, 10)
    return make_step(cfg, model, optimizer, scheduler, device)


def endless(make_iterable):
    while True:
        yield from make_iterable()


class _LightlyStyleFolder(Dataset):
    """What lightly's examples do: a folder dataset whose transform returns the two views."""

    def __init__(self, source, transform):
        self.source, self.transform = source, transform

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        return self.transform(self.source.load(index))


def lightly_style_batches(source, cfg, workers: int):
    loader = DataLoader(_LightlyStyleFolder(source, build_view_transform(cfg.augment)),
                        batch_size=cfg.train.batch_size, shuffle=True, drop_last=True,
                        num_workers=workers, persistent_workers=workers > 0)
    return ({"views": (views[0], views[1])} for views in endless(lambda: loader))


def bare_batches(cfg, device):
    size = cfg.augment.input_size
    views = (torch.randn(cfg.train.batch_size, 3, size, size, device=device),
             torch.randn(cfg.train.batch_size, 3, size, size, device=device))
    while True:
        yield {"views": views}


def main(argv=None) -> int:
    parser = benchmarking.argument_parser(__doc__)
    parser.add_argument("--data", required=True, help="image folder (e.g. CIFAR-10 train)")
    parser.add_argument("--config", default="configs/cifar10_cpu.yaml")
    benchmarking.add_settings(parser)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per contender")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--images", type=int, default=20000, help="subset of the folder to use")
    parser.add_argument("--lightly-workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--sweep", action="store_true",
                        help="also time the bare step in fp32/bf16 x default/channels-last")
    parser.add_argument("--sweep-only", action="store_true", help="only the precision/format sweep")
    parser.add_argument("--augment-only", action="store_true",
                        help="only time the batched augmentation (two views of one batch, as the tensor pipeline makes them)")
    args = parser.parse_args(argv)
    keep_freed_memory()  # as ssl-pretrain does on a CPU (train.keep_freed_memory); the whole process
    if args.sweep_only:
        return sweep(args, argv)
    if args.augment_only:
        return time_augmentation(args, argv)

    cfg = load_config(args.config, [f"data.source={args.data}", *args.overrides])
    device = resolve_device(cfg.train.device)
    source = random_subset(open_source(args.data), args.images)
    batch = cfg.train.batch_size
    (ours_batches, _), setup_seconds = benchmarking.timed(build_loader, cfg, source, device, progress=False)
    plain = load_config(args.config, [f"data.source={args.data}", *args.overrides, "train.channels_last=false",
                                      "train.precision=fp32", "train.compile=false"])
    results = {
        "bare": timed_steps(bare_batches(cfg, device), fresh_step(cfg, device), args.warmup, args.steps, batch),
        "ours": timed_steps(endless(lambda: ours_batches), fresh_step(cfg, device), args.warmup, args.steps, batch),
        # lightly's example trains the model as it comes: fp32, default memory format.
        "lightly-style": timed_steps(lightly_style_batches(source, cfg, args.lightly_workers),
                                     fresh_step(plain, device), args.warmup, args.steps, batch),
    }
    print("\n" + run_header(argv, cfg, device) + "\n")
    print(benchmarking.table_header("loop", "images/s", "vs bare", "ours vs it"))
    for name, rate in results.items():
        print(benchmarking.table_row(name, f"{rate:.1f}", f"{rate / results['bare']:.2f}",
                                     f"{results['ours'] / rate:.2f}"))
    if args.sweep:
        sweep(args, argv, header=False)
    print(f"\nours: {setup_seconds:.1f} s to set up the pipeline for {len(source)} images "
          f"(decoding them once when data.pipeline resolves to tensor), not in the rates above.")
    return 0


def run_header(argv: list[str] | None, cfg, device: torch.device) -> str:
    return benchmarking.header(__file__, argv, f"device {device}",
                               f"{cfg.model.backbone} {cfg.augment.input_size}px batch {cfg.train.batch_size}")


def time_augmentation(args, argv: list[str] | None) -> int:
    """Milliseconds per batch of ``batch_views`` (crop, flip, jitter, grey, normalise; two views);
    for grey images also with the colour steps that cannot change them skipped, as training does."""
    from ssl_pretrain.augment.batch_transforms import batch_views, build_batch_augment, is_grey
    from ssl_pretrain.data import common_small_size, decode_all

    cfg = load_config(args.config, [f"data.source={args.data}", *args.overrides])
    source = random_subset(open_source(args.data), cfg.train.batch_size)
    size = common_small_size(source)
    if size is None:
        raise SystemExit("--augment-only needs small images of one size (the tensor pipeline's case)")
    images = torch.from_numpy(decode_all(source, size, progress=False)[0])
    print("\n" + benchmarking.header(__file__, argv) + "\n")
    variants = {"every step": build_batch_augment(cfg.augment)}
    if is_grey(images):
        variants["grey images: colour steps skipped"] = build_batch_augment(cfg.augment, grey=True)
    for name, augment in variants.items():
        seeds = chain(range(args.warmup), range(args.steps))  # the same views for every variant
        seconds = benchmarking.seconds_per_call(lambda: batch_views(images, augment, next(seeds)), args.steps,
                                                args.warmup)
        print(f"batched augmentation ({name}), two views of {len(images)} images of {size[0]}x{size[1]}: "
              f"{seconds * 1e3:.2f} ms per batch ({seconds / len(images) * 1e6:.1f} us per image)")
    return 0


def sweep(args, argv: list[str] | None, header: bool = True) -> int:
    """Bare step in each precision x memory format, as ratios to fp32 in the default format."""
    rates = {}
    for precision in ("fp32", "bf16"):
        for channels_last in (False, True):
            cfg = load_config(args.config, [f"data.source={args.data}", *args.overrides,
                                             f"train.precision={precision}",
                                             f"train.channels_last={str(channels_last).lower()}"])
            device = resolve_device(cfg.train.device)
            rates[precision, channels_last] = timed_steps(bare_batches(cfg, device), fresh_step(cfg, device),
                                                          args.warmup, args.steps, cfg.train.batch_size)
    if header:
        print("\n" + run_header(argv, cfg, device))
    base = rates["fp32", False]
    print("\n" + benchmarking.table_header("bare step", "memory format", "images/s", "vs fp32, default format", left=2))
    for (precision, channels_last), rate in rates.items():
        layout = "channels-last" if channels_last else "default"
        print(benchmarking.table_row(precision, layout, f"{rate:.1f}", f"{rate / base:.2f}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
