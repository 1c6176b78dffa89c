"""``ssl-embed``: features of every image of a source, on one process or many (``torchrun``).

    ssl-embed --checkpoint runs/c10 --data /data/images --out features/images.npy
    torchrun --nproc-per-node 8 -m linear_probe.embed --checkpoint runs/c10 --data ... --out ...

Each rank embeds one contiguous shard of the source; rank 0 gathers the shards and writes one
file in the source's order (``.npy``, memory-mapped when read back with
``linear_probe.embeddings.load_embeddings``; or ``.npz``). Unreadable images are listed in the
file's ``skipped`` entries and counted in the log.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from linear_probe.embeddings import Embeddings, _assemble, extract_embeddings, save_embeddings
from linear_probe.errors import EvaluationError
from ssl_pretrain.augment.transforms import build_eval_transform
from ssl_pretrain.checkpoint import load_backbone
from ssl_pretrain.data import DataError, SubsetSource, open_source
from ssl_pretrain.engine.devices import resolve_device
from ssl_pretrain.engine.distributed import DistInfo, init_distributed, shutdown
from ssl_pretrain.engine.run_folder import setup_console_logging
from ssl_pretrain.errors import SSLError

log = logging.getLogger("ssl_pretrain")


def shard_bounds(count: int, rank: int, world_size: int) -> tuple[int, int]:
    """The contiguous ``[start, stop)`` of ``count`` items that ``rank`` embeds (sizes differ by 1 at most)."""
    return count * rank // world_size, count * (rank + 1) // world_size


def extract_embeddings_distributed(backbone: torch.nn.Module, source, transform, dist_info: DistInfo,
                                   batch_size: int = 256, device="cpu", num_workers: int = 0,
                                   progress: bool = True) -> Embeddings | None:
    """``extract_embeddings`` split over the ranks of a process group.

    Returns:
        On rank 0 the ``Embeddings`` of the whole source, in its order (exactly what one process
        would return); None on the other ranks. Without a process group, the plain extraction.
    """
    if not dist_info.enabled:
        return extract_embeddings(backbone, source, transform, batch_size, device, num_workers, progress)
    start, stop = shard_bounds(len(source), dist_info.rank, dist_info.world_size)
    shard = SubsetSource(source, np.arange(start, stop))
    try:
        part = extract_embeddings(backbone, shard, transform, batch_size, device, num_workers,
                                  progress and dist_info.is_main)
        piece = (part.features, part.indices + start, part.skipped)
    except EvaluationError:  # every image of this shard unreadable: the others may still have some
        piece = (np.zeros((0, 0), np.float32), np.zeros(0, np.int64), [(source.name(i), "unreadable")
                                                                         for i in range(start, stop)])
    pieces: list | None = [None] * dist_info.world_size if dist_info.is_main else None
    # gather_object pickles the pieces between the job's own ranks (never data from elsewhere).
    dist.gather_object(piece, pieces, dst=0)
    if not dist_info.is_main:
        return None
    assert pieces is not None
    features = [p[0] for p in pieces if len(p[1])]
    indices = [int(index) for p in pieces for index in p[1]]
    skipped = [pair for p in pieces for pair in p[2]]
    return _assemble(source, indices, features, skipped)  # the same rows one process would give


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ssl-embed",
        description="Write the backbone's features of every image of --data into one file "
        "(.npy: memory-mapped when read back; .npz). Under torchrun each rank embeds a shard.",
    )
    parser.add_argument("--checkpoint", required=True, help="run folder, backbone.safetensors or checkpoints/last.pt")
    parser.add_argument("--data", required=True, help="a folder (class subfolders give labels), a .txt list, "
                        "tar shards, builtin:digits, cifar10:ROOT, ...")
    parser.add_argument("--out", required=True, help="output file, .npy or .npz")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, ... (under torchrun: each rank's GPU)")
    parser.add_argument("--workers", type=int, default=0, help="data-loader processes per rank")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if Path(args.out).suffix not in (".npy", ".npz"):
        print(f"ssl-embed: error: --out must end in .npy or .npz, got {args.out}", file=sys.stderr)
        return 2
    setup_console_logging()
    dist_info = DistInfo()
    try:
        dist_info, rank_device = init_distributed(args.device)
        device = rank_device or resolve_device(args.device)
        backbone, info = load_backbone(args.checkpoint)
        backbone = backbone.to(device)
        try:
            source = open_source(args.data, labelled=True)  # class subfolders give labels
        except DataError:
            source = open_source(args.data)
        transform = build_eval_transform(info.input_size, info.mean, info.std)
        started = time.perf_counter()
        embeddings = extract_embeddings_distributed(backbone, source, transform, dist_info, args.batch_size,
                                                    device, args.workers, not args.no_progress)
        if embeddings is not None:
            save_embeddings(args.out, embeddings)
            log.info("%d x %d features of %s written to %s in %.1f s (%d ranks; %d unreadable skipped)",
                     *embeddings.features.shape, args.data, args.out, time.perf_counter() - started,
                     dist_info.world_size, len(embeddings.skipped))
    except (SSLError, ValueError) as error:
        print(f"ssl-embed: error: {error}", file=sys.stderr)
        return 2
    finally:
        shutdown(dist_info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
