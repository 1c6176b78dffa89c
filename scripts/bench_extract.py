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

import sys

import torch

from linear_probe.embeddings import extract_embeddings
from ssl_pretrain.models.backbones import build_backbone
from ssl_pretrain.checkpoint import load_backbone
from ssl_pretrain.engine.allocator import keep_freed_memory
from ssl_pretrain.data import DecodedSource, common_small_size, open_source, random_subset
from ssl_pretrain.augment.transforms import build_eval_transform

import benchmarking


def main(argv=None) -> int:
    parser = benchmarking.argument_parser(__doc__)
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
        bare = args.batch_size / benchmarking.seconds_per_call(lambda: backbone(images),
                                                               max(1, len(source) // args.batch_size), warmup=1)
    transform = build_eval_transform(size, mean, std)
    _, seconds = benchmarking.timed(extract_embeddings, backbone, source, transform, args.batch_size,
                                    num_workers=args.num_workers, progress=False)
    streamed = len(source) / seconds
    decoded_source = DecodedSource(source, common_small_size(source) or (size, size))
    held, decode_seconds = benchmarking.timed(lambda: decoded_source.decoded() is not None)
    _, seconds = benchmarking.timed(extract_embeddings, backbone, decoded_source, transform, args.batch_size,
                                    progress=False)
    in_memory = len(source) / seconds
    print("\n" + benchmarking.header(__file__, argv, f"{name} {size}px batch {args.batch_size}, {len(source)} images")
          + "\n")
    print(benchmarking.table_header("loop", "images/s", "vs bare"))
    print(benchmarking.table_row("bare inference", f"{bare:.0f}", "1.00"))
    print(benchmarking.table_row(f"extract_embeddings, from files ({args.num_workers} workers)", f"{streamed:.0f}",
                                 f"{streamed / bare:.2f}"))
    if held:
        print(benchmarking.table_row("extract_embeddings, decoded once in memory", f"{in_memory:.0f}",
                                     f"{in_memory / bare:.2f}"))
        print(f"\ndecoding the {len(source)} images once into memory: {decode_seconds:.1f} s "
              f"({len(source) / decode_seconds:.0f} images/s), paid once per evaluation, not per feature set")
    else:
        print("\n(the images are not all of one small size: they are not held in memory)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
