"""``ssl-dedup``: a thin command line over ``dedup.find_duplicates`` and ``dedup.write_results``.

Bad input ends in one line on stderr (``ssl-dedup: error: ...``) and exit status 2, never a
traceback, and nothing is written.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ssl_curate.duplicates import DEFAULT_THRESHOLD, DuplicateError, check_threshold
from ssl_pretrain.checkpoint import CheckpointError
from ssl_pretrain.data import DataError

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


def dedup(checkpoint: str | None, data: str, out: str, threshold: float = DEFAULT_THRESHOLD,
          exact_only: bool = False, overwrite: bool = False, no_plot: bool = False, batch_size: int = 256,
          device: str = "cpu", quiet: bool = False) -> int:
    """What ``ssl-dedup`` does, callable from Python; returns the exit status."""
    from ssl_curate.dedup import check_out_dir, find_duplicates, plot_groups, write_results

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
    except (DuplicateError, DataError, CheckpointError) as error:
        print(f"{PROG}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
