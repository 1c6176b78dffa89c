"""``ssl-select``: which unlabelled images to label first, from a pretrained backbone's embeddings.

    ssl-select --checkpoint RUN --data INBOX --budget 100 --strategy typiclust --out to_label.txt

Writes ``to_label.txt`` (one image path per line), ``to_label.csv`` beside it (path, cluster,
score) and ``to_label.png`` (a grid of the chosen images), each atomically. Bad input ends in one
line on stderr (``ssl-select: error: ...``) and exit status 2, with nothing written.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import math
import sys
from pathlib import Path

import numpy as np

from linear_probe.embeddings import extract_embeddings
from ssl_curate.selection import STRATEGIES, Selection, SelectionError, check_request, select
from ssl_pretrain.augment.transforms import build_eval_transform
from ssl_pretrain.checkpoint import atomic_write, load_backbone
from ssl_pretrain.data import open_source
from ssl_pretrain.errors import SSLError

PROG = "ssl-select"
GRID_COLUMNS = 10
GRID_CELL = 64
log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Choose which unlabelled images to label first (cold start), from a pretrained "
        "backbone's embeddings; no labels are read.")
    parser.add_argument("--checkpoint", required=True, help="run folder, backbone.safetensors or checkpoints/last.pt")
    parser.add_argument("--data", required=True, help="unlabelled images: a folder, a text file of paths, "
                        "builtin:digits:train")
    parser.add_argument("--budget", type=int, required=True, help="how many images to label")
    parser.add_argument("--strategy", default="typiclust", help=f"one of {', '.join(STRATEGIES)}: typiclust for "
                        "a few labels (Hacohen et al. 2022); kcenter covers the data (Sener & Savarese 2018)")
    parser.add_argument("--seed", type=int, default=0, help="seeds k-means, k-center's first pick, random")
    parser.add_argument("--out", required=True, help="list of chosen paths to write (a .csv and .png go beside it)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG grid of the chosen images")
    parser.add_argument("--batch-size", type=int, default=256, help="images per batch when embedding")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1...")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or log")
    return parser


def output_paths(out: Path) -> dict[str, Path]:
    """The list, the CSV and the PNG that ``--out`` names."""
    return {"list": out, "csv": out.with_suffix(".csv"), "png": out.with_suffix(".png")}


def embed_unlabelled(checkpoint: str, data: str, batch_size: int = 256, device: str = "cpu",
                     progress: bool = True):
    """``(source, embeddings)``: L2-normalised features of every readable image of ``data``."""
    backbone, info = load_backbone(checkpoint)
    source = open_source(data)
    transform = build_eval_transform(info.input_size, info.mean, info.std)
    embeddings = extract_embeddings(backbone.to(device), source, transform, batch_size=batch_size,
                                    device=device, progress=progress)
    norms = np.linalg.norm(embeddings.features, axis=1, keepdims=True).clip(min=1e-12)
    embeddings.features = (embeddings.features / norms).astype(np.float32)
    return source, embeddings


def image_path(source, index: int) -> str:
    """The file of image ``index`` when the source has one, else its name."""
    paths = getattr(source, "paths", None)
    return str(paths[index]) if paths is not None else source.name(index)


def write_outputs(out: Path, paths: list[str], selection: Selection, images: list | None) -> list[Path]:
    """Write the list, the CSV and (when ``images``) the PNG grid, each atomically."""
    files = output_paths(out)
    table = io.StringIO()
    writer = csv.writer(table)
    writer.writerow(["rank", "path", "cluster", selection.score_name])
    for rank, (path, cluster, score) in enumerate(zip(paths, selection.clusters, selection.scores)):
        writer.writerow([rank, path, int(cluster), "" if np.isnan(score) else f"{score:.6g}"])
    atomic_write(files["csv"], lambda file: file.write(table.getvalue().encode()))
    written = [files["csv"]]
    if images:
        atomic_write(files["png"], lambda file: image_grid(images).save(file, format="PNG"))
        written.append(files["png"])
    # The list last: its presence says the selection is complete.
    atomic_write(files["list"], lambda file: file.write("".join(f"{path}\n" for path in paths).encode()))
    return [files["list"]] + written


def image_grid(images: list):
    """The images, ``GRID_COLUMNS`` to a row, each resized to ``GRID_CELL`` px."""
    from PIL import Image

    rows = math.ceil(len(images) / GRID_COLUMNS)
    columns = min(len(images), GRID_COLUMNS)
    grid = Image.new("RGB", (columns * GRID_CELL, rows * GRID_CELL), "white")
    for position, image in enumerate(images):
        cell = image.convert("RGB").resize((GRID_CELL, GRID_CELL))
        grid.paste(cell, ((position % GRID_COLUMNS) * GRID_CELL, (position // GRID_COLUMNS) * GRID_CELL))
    return grid


def select_images(checkpoint: str, data: str, budget: int, strategy: str, out: str | Path, *, seed: int = 0,
                  overwrite: bool = False, plot: bool = True, batch_size: int = 256, device: str = "cpu",
                  progress: bool = True) -> tuple[list[str], list[Path]]:
    """Embed ``data``, select ``budget`` images with ``strategy``, write the outputs.

    Returns:
        The chosen paths (in pick order) and the files written.

    Raises:
        CheckpointError, DataError, SelectionError: unusable input, before anything is written.
    """
    out = Path(out)
    check_request(None, budget, strategy)  # the strategy and budget >= 1, before any work
    existing = [path for path in output_paths(out).values() if path.exists()]
    if existing and not overwrite:
        raise SelectionError(f"{existing[0]} already exists (pass --overwrite to replace it)")
    source, embeddings = embed_unlabelled(checkpoint, data, batch_size, device, progress)
    if budget > len(embeddings):
        raise SelectionError(f"budget {budget} is more than the {len(embeddings)} readable images of {data}"
                             + (f" ({len(embeddings.skipped)} unreadable skipped)" if embeddings.skipped else ""))
    selection = select(embeddings.features, budget, strategy, seed)
    rows = embeddings.indices[selection.indices]
    paths = [image_path(source, int(row)) for row in rows]
    images = [source.load(int(row)) for row in rows] if plot else None
    log.info("selected %d of %d readable images with %s (%d unreadable skipped)", budget, len(embeddings),
             strategy, len(embeddings.skipped))
    return paths, write_outputs(out, paths, selection, images)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0, or 2 for unusable input)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(message)s")
    try:
        paths, files = select_images(args.checkpoint, args.data, args.budget, args.strategy, args.out,
                                     seed=args.seed, overwrite=args.overwrite, plot=not args.no_plot,
                                     batch_size=args.batch_size, device=args.device, progress=not args.quiet)
    except SSLError as error:
        print(f"{PROG}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    if not args.quiet:
        print(f"{len(paths)} images to label: {', '.join(str(path) for path in files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
