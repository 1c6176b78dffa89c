"""``ssl-dedup``: a command line over ``find_duplicates`` (exact groups from ``dedup``, near ones
from a checkpoint's embeddings, ``linear_probe.embeddings``) and ``dedup.write_results``.

Bad input ends in one line on stderr (``ssl-dedup: error: ...``) and exit status 2, never a
traceback, and nothing is written.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from linear_probe.embeddings import extract_embeddings
from linear_probe.errors import EvaluationError
from ssl_curate.dedup import (DedupResult, check_out_dir, exact_groups_of, plot_groups, rows_of,
                              write_results)
from ssl_curate.duplicates import (DEFAULT_THRESHOLD, DuplicateError, check_threshold, describe_groups,
                                   find_near_duplicates)
from ssl_pretrain.augment.transforms import build_eval_transform
from ssl_pretrain.checkpoint import load_backbone, resolve_backbone_path
from ssl_pretrain.data import DecodedSource, check_readable, common_small_size, decode_workers, open_source
from ssl_pretrain.errors import SSLError

PROG = "ssl-dedup"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Find byte-identical and near-duplicate images (cosine similarity of a pretrained "
        "backbone's embeddings) and write duplicates.csv, duplicates.json and duplicates.png to --out.")
    parser.add_argument("--checkpoint", help="run folder, backbone.safetensors or checkpoints/last.pt "
                        "(not needed with --exact-only)")
    parser.add_argument("--data", required=True, help="image folder (recursive), .txt list of paths, tar shards, "
                        "builtin:digits:test")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                        help="cosine similarity from which two images are near duplicates, in (0, 1]. 0.99 caught "
                        "re-encoded copies and little else with a briefly trained smallconv; a weak backbone puts "
                        "unrelated images above 0.95, so look at duplicates.png before lowering it")
    parser.add_argument("--exact-only", action="store_true", help="only byte-identical files (no backbone, fast)")
    parser.add_argument("--out", required=True, help="folder to write the results to")
    parser.add_argument("--overwrite", action="store_true", help="replace earlier results in --out")
    parser.add_argument("--no-plot", action="store_true", help="skip duplicates.png")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or log")
    return parser


def embed_source(checkpoint: str | Path, source, batch_size: int, device: str, progress: bool):
    """Embeddings of every readable image with the checkpoint's backbone and eval transform."""
    check_readable(source)  # all unreadable: one line now, not a warning and then an error
    backbone, info = load_backbone(checkpoint)
    transform = build_eval_transform(info.input_size, info.mean, info.std)
    size = common_small_size(source)
    if size is not None and len(source) * size[0] * size[1] * 3 <= 2 << 30:
        source = DecodedSource(source, size, workers=decode_workers())  # decode small images once
    try:
        return extract_embeddings(backbone.to(device), source, transform, batch_size=batch_size, device=device,
                                  progress=progress)
    except EvaluationError as error:  # nothing readable
        raise DuplicateError(str(error)) from None


def find_duplicates(data: str, checkpoint: str | Path | None = None, threshold: float = DEFAULT_THRESHOLD,
                    exact_only: bool = False, batch_size: int = 256, device: str = "cpu",
                    progress: bool = True) -> DedupResult:
    """Exact and near-duplicate groups of the images of ``data`` (anything ``open_source`` reads).

    Raises:
        DuplicateError, DataError, CheckpointError: bad input, nothing readable (one line).
    """
    start = time.perf_counter()
    if not exact_only:  # fail fast, before a large folder is read
        check_threshold(threshold)
        if checkpoint is None:
            raise DuplicateError("a --checkpoint is needed for near duplicates (or pass --exact-only)")
        resolve_backbone_path(checkpoint)
    source = open_source(str(data))
    exact, exact_skipped = exact_groups_of(source)
    if exact_only:
        names = [source.name(index) for index in range(len(source))]
        skipped_names = {name for name, _ in exact_skipped}
        if len(skipped_names) == len(source):
            raise DuplicateError(f"none of the {len(source)} files could be read (first: {exact_skipped[0][1]})")
        return DedupResult(names, describe_groups(None, exact, exact), exact_skipped, len(source), None,
                           time.perf_counter() - start, list(range(len(source))), source)
    embeddings = embed_source(checkpoint, source, batch_size, device, progress)
    rows = {int(position): row for row, position in enumerate(embeddings.indices)}
    groups = find_near_duplicates(embeddings.features, threshold, rows_of(exact, rows))
    return DedupResult(list(embeddings.names), groups, list(embeddings.skipped), len(source), float(threshold),
                       time.perf_counter() - start, embeddings.indices.tolist(), source)


def dedup(checkpoint: str | None, data: str, out: str, threshold: float = DEFAULT_THRESHOLD,
          exact_only: bool = False, overwrite: bool = False, no_plot: bool = False, batch_size: int = 256,
          device: str = "cpu", quiet: bool = False) -> int:
    """What ``ssl-dedup`` does, callable from Python; returns the exit status."""
    if not exact_only:
        check_threshold(threshold)
    out_dir = Path(out)
    check_out_dir(out_dir, overwrite)
    result = find_duplicates(data, checkpoint, threshold, exact_only, batch_size, device, progress=not quiet)
    png = None if no_plot else plot_groups(result)
    write_results(out_dir, result, png, data, checkpoint if not exact_only else None)
    print(result.summary())
    written = ["duplicates.csv", "duplicates.json"] + ([] if png is None else ["duplicates.png"])
    print(f"  written: {', '.join(str(out_dir / name) for name in written)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which CPU build it loaded: noise here
    try:
        return dedup(**vars(args))
    except SSLError as error:
        print(f"{PROG}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
