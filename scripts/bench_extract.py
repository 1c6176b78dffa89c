"""Embedding extraction against the backbone's bare inference, side by side in one run.

    python scripts/bench_extract.py --data /tmp/cifar10/test --checkpoint runs/my-run

* bare: the backbone's forward pass in eval mode on ready tensors (the ceiling);
* ours: ``linear_probe.embeddings.extract_embeddings`` from the image folder (read, decode,
  eval transform, forward), as ``linear-probe`` runs it.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from datetime import date

import torch

from linear_probe.embeddings import extract_embeddings
from ssl_pretrain.backbones import build_backbone
from ssl_pretrain.checkpoint import load_backbone
from ssl_pretrain.data import open_source, random_subset
from ssl_pretrain.transforms import build_eval_transform


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="labelled image folder")
    parser.add_argument("--checkpoint", help="run folder or backbone file (default: random smallconv, 32 px)")
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--num-workers", type=int, default=0)
    args = parser.parse_args(argv)

    if args.checkpoint:
        backbone, info = load_backbone(args.checkpoint)
        name, size, mean, std = info.architecture, info.input_size, info.mean, info.std
    else:
        backbone, _ = build_backbone("smallconv", True)
        name, size, mean, std = "smallconv", 32, (0.5,) * 3, (0.25,) * 3
    backbone.eval()
    source = random_subset(open_source(args.data, labelled=True), args.images)
    images = torch.randn(args.batch_size, 3, size, size)
    with torch.inference_mode():
        backbone(images)
        started = time.perf_counter()
        for _ in range(len(source) // args.batch_size):
            backbone(images)
        bare = (len(source) // args.batch_size) * args.batch_size / (time.perf_counter() - started)
    started = time.perf_counter()
    extract_embeddings(backbone, source, build_eval_transform(size, mean, std), args.batch_size,
                       num_workers=args.num_workers, progress=False)
    ours = len(source) / (time.perf_counter() - started)
    print(f"\n{date.today()} | {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__} | {name} {size}px batch {args.batch_size}, {len(source)} images | "
          f"`python {' '.join(sys.argv)}`\n")
    print("| loop | images/s | vs bare |\n| --- | ---: | ---: |")
    print(f"| bare inference | {bare:.0f} | 1.00 |\n| extract_embeddings | {ours:.0f} | {ours / bare:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
