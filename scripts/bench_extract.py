"""Embedding extraction against the backbone's bare inference, side by side in one run.

    python scripts/bench_extract.py --data /tmp/cifar10/test --checkpoint runs/my-run

* bare: the backbone's forward pass in eval mode on ready tensors (the ceiling);
* from files: ``linear_probe.embeddings.extract_embeddings`` streaming the image folder (read,
  decode, eval transform, forward) - one pass over files, as for large or odd-sized images;
* decoded once: what ``linear-probe`` does for small images of one size - decode the folder into
  memory once (``DecodedSource``, timed on its own), then extract every feature set (pretrained,
  random init, raw pixels) from the array; the row times one such extraction.
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
from ssl_pretrain.models.backbones import build_backbone
from ssl_pretrain.checkpoint import load_backbone
from ssl_pretrain.engine.allocator import keep_freed_memory
from ssl_pretrain.data import DecodedSource, common_small_size, open_source, random_subset
from ssl_pretrain.augment.transforms import build_eval_transform


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="labelled image folder")
    parser.add_argument("--checkpoint", help="run folder or backbone file (default: random smallconv, 32 px)")
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--num-workers", type=int, default=0)
    args = parser.parse_args(argv)
    keep_freed_memory()  # as ssl-pretrain does on CPUs

    if args.checkpoint:
        backbone, info = load_backbone(args.checkpoint)
        name, size, mean, std = info.architecture, info.input_size, info.mean, info.std
    else:
        backbone, _ = build_backbone("smallconv", True, 32)
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
    transform = build_eval_transform(size, mean, std)
    started = time.perf_counter()
    extract_embeddings(backbone, source, transform, args.batch_size, num_workers=args.num_workers, progress=False)
    streamed = len(source) / (time.perf_counter() - started)
    decoded_source = DecodedSource(source, common_small_size(source) or (size, size))
    started = time.perf_counter()
    held = decoded_source.decoded() is not None
    decode_seconds = time.perf_counter() - started
    started = time.perf_counter()
    extract_embeddings(backbone, decoded_source, transform, args.batch_size, progress=False)
    in_memory = len(source) / (time.perf_counter() - started)
    print(f"\n{date.today()} | {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__} | {name} {size}px batch {args.batch_size}, {len(source)} images | "
          f"`python {' '.join(sys.argv)}`\n")
    print("| loop | images/s | vs bare |\n| --- | ---: | ---: |")
    print(f"| bare inference | {bare:.0f} | 1.00 |")
    print(f"| extract_embeddings, from files ({args.num_workers} workers) | {streamed:.0f} | {streamed / bare:.2f} |")
    if held:
        print(f"| extract_embeddings, decoded once in memory | {in_memory:.0f} | {in_memory / bare:.2f} |")
        print(f"\ndecoding the {len(source)} images once into memory: {decode_seconds:.1f} s "
              f"({len(source) / decode_seconds:.0f} images/s), paid once per evaluation, not per feature set")
    else:
        print("\n(the images are not all of one small size: they are not held in memory)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
