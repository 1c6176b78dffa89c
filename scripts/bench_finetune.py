"""Fine-tuning throughput, side by side in one run: bare step vs linear-probe's fine-tuning route.

    python scripts/bench_finetune.py --checkpoint RUN --data /tmp/scratch/cifar10/train --images 4500

* bare:  forward + backward + SGD step of the fine-tuned network (backbone + linear head) on one
         ready batch of tensors, the same batch every step (the ceiling);
* ours:  one epoch of ``linear_probe.finetune``'s route as ``linear-probe`` runs it: the labelled
         images decoded once into memory (not timed: once per evaluation), augmented a batch at a
         time (crop, flip, normalise) and trained through ``linear_probe.training``'s epoch loop
         (with its loss bookkeeping);
* ours + validation: the same epoch plus its share of scoring the validation images (early
         stopping), images/s counting the training images only: validation every epoch, and
         every ``training.validation_interval`` epochs, as ``linear-probe`` runs it (at most a quarter
         as many images scored as trained per epoch, at least 5 scores per run of --epochs).

Both in the precision linear-probe trains in (fp32) and the default memory format. Prints a
Markdown table with the ratios, and the CPU, date and command.
"""

from __future__ import annotations

import torch

from linear_probe.finetune import build_classifier, prepare_scoring, training_route
from linear_probe.training import _train_one_epoch, validation_interval
from ssl_pretrain.engine.allocator import keep_freed_memory
from ssl_pretrain.checkpoint import load_backbone
from ssl_pretrain.data import SubsetSource, open_source
from ssl_pretrain.augment.transforms import build_eval_transform

import benchmarking


def subset(source, count: int, seed: int = 0) -> SubsetSource:
    indices = torch.randperm(len(source), generator=torch.Generator().manual_seed(seed))[:count]
    return SubsetSource(source, indices.sort().values.numpy())


def bare_seconds(model, batch: tuple[torch.Tensor, torch.Tensor], steps: int) -> float:
    """Seconds per forward + backward + SGD step on one ready batch, after two warm-up steps."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    inputs, labels = batch

    def step():
        loss = torch.nn.functional.cross_entropy(model(inputs), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return benchmarking.seconds_per_call(step, steps, warmup=2)


def main(argv=None) -> int:
    parser = benchmarking.argument_parser(__doc__)
    parser.add_argument("--checkpoint", required=True, help="run folder or backbone.safetensors")
    parser.add_argument("--data", required=True, help="labelled images (folder with class subfolders)")
    parser.add_argument("--images", type=int, default=4500, help="labelled training images (10%% of CIFAR-10's pool)")
    parser.add_argument("--val-images", type=int, default=5000, help="validation images scored after the epoch")
    parser.add_argument("--batch-size", type=int, default=64, help="linear-probe's --train-batch-size")
    parser.add_argument("--epochs", type=int, default=30, help="linear-probe's --finetune-epochs (the validation interval)")
    parser.add_argument("--repeats", type=int, default=2, help="rounds; each times every contender once, in turn (the best round of each is kept)")
    args = parser.parse_args(argv)
    keep_freed_memory()
    backbone, info = load_backbone(args.checkpoint)
    source = open_source(args.data, labelled=True)
    train, val = subset(source, args.images, 0), subset(source, args.val_images, 1)
    transform = build_eval_transform(info.input_size, info.mean, info.std)
    model = build_classifier(backbone, info.feature_dim, len(source.classes))
    with benchmarking.Stopwatch() as decoding:
        batches, score = training_route(train, transform, args.batch_size, 0, True, 0, "cpu")
        val_pixels = prepare_scoring(val, transform)
    first = next(iter(batches(1)))
    steps = max(1, args.images // args.batch_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    # the contenders take turns, round after round; the best round of each is kept
    best = benchmarking.interleaved({
        "bare": lambda: bare_seconds(model, first, steps),
        "epoch": lambda: benchmarking.timed(_train_one_epoch, model, optimizer, batches(2), "cpu")[1],
        "validation": lambda: benchmarking.timed(score, model, val_pixels)[1],
    }, args.repeats, summary=min)
    rates = {"bare": len(first[1]) / best["bare"]}
    epoch_seconds, val_seconds = best["epoch"], best["validation"]
    every = validation_interval(args.images, args.val_images, args.epochs)
    rates["ours"] = args.images / epoch_seconds
    rates["ours + validation every epoch"] = args.images / (epoch_seconds + val_seconds)
    rates[f"ours + validation every {every} epochs (linear-probe)"] = args.images / (epoch_seconds + val_seconds / every)
    print("\n" + benchmarking.header(__file__, argv, f"{info.architecture} {info.input_size}px, batch {args.batch_size}, "
                                     f"{args.images} training images, {args.val_images} validation") + "\n")
    print(benchmarking.table_header("loop", "images/s", "vs bare"))
    for name, rate in rates.items():
        print(benchmarking.table_row(name, f"{rate:.1f}", f"{rate / rates['bare']:.2f}"))
    print(f"\ndecoding {args.images} + {args.val_images} images once: {decoding.seconds:.1f} s (not in the rates)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
