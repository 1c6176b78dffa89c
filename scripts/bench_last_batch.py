"""What a short last batch costs fine-tuning: batches of ``batch_size`` and a remainder (450 images
in batches of 64 end every epoch on a batch of 2) against near-equal batches (8 of 56-57), the
cut ``linear_probe.images.balanced_batches`` makes.

    python scripts/bench_last_batch.py --checkpoint RUN --data cifar10 --images 450 448 --seeds 0 1

For each number of labelled images (a random pick of the training folder, the same for both
cuts), fine-tunes the checkpoint's backbone (``ssl``) and the same network from random weights
(``scratch``) for ``--epochs`` epochs, batch 64, linear-probe's learning rate, no early stopping,
and prints test top-1 on ``--test`` random test images. Accuracy only: the CPU may be shared.
"""

from __future__ import annotations

import argparse
import logging

import numpy as np
import torch

import linear_probe.images as images_module
from linear_probe.finetune import evaluate_finetune
from linear_probe.inputs import build_random_backbone
from ssl_pretrain.checkpoint import load_backbone
from ssl_pretrain.data import SubsetSource, open_source

_balanced = images_module.balanced_batches


def remainder_batches(order: torch.Tensor, batch_size: int):
    """The cut before: ``batch_size``-sized batches and the remainder (a remainder of one dropped)."""
    return tuple(part for part in order.split(batch_size) if len(part) > 1 or len(order) == 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", required=True, help="labelled folder with train/ and test/")
    parser.add_argument("--images", type=int, nargs="+", default=[450, 448])
    parser.add_argument("--test", type=int, default=2000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    backbone, info = load_backbone(args.checkpoint if args.checkpoint.endswith(".safetensors")
                                   else f"{args.checkpoint}/backbone.safetensors")
    train = open_source(f"{args.data}/train", labelled=True)
    test = open_source(f"{args.data}/test", labelled=True)
    rng = np.random.default_rng(0)
    test = SubsetSource(test, rng.permutation(len(test))[:args.test])
    print(f"| images | last batch before | features | seed | remainder cut | balanced cut |")
    print("|---:|---:|---|---:|---:|---:|")
    for n in args.images:
        labelled = SubsetSource(train, np.random.default_rng(n).permutation(len(train))[:n])
        for kind in ("scratch", "ssl"):
            for seed in args.seeds:
                scores = []
                for cut in (remainder_batches, _balanced):
                    images_module.balanced_batches = cut
                    network = backbone if kind == "ssl" else build_random_backbone(info, seed)
                    result = evaluate_finetune(network, info.feature_dim, labelled, None, test, len(train.classes),
                                               info.input_size, info.mean, info.std, epochs=args.epochs,
                                               lr=0.05, batch_size=args.batch_size, seed=seed, folds=[],
                                               refit=True, hflip=info.hflip is not False)
                    scores.append(100 * result.top1)
                images_module.balanced_batches = _balanced
                print(f"| {n} | {n % args.batch_size or args.batch_size} | {kind} | {seed} | {scores[0]:.1f} | "
                      f"{scores[1]:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
