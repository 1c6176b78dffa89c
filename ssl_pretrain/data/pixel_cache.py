"""A source decoded once at the size it trains at, for the batch pipeline: images of any size and
mode (photos, scans, 16-bit, palette) become one uint8 array ``(N, S, S, 3)`` that every epoch -
and every later run on the same files - reads instead of opening a JPEG again.

Each image is decoded by Pillow (every format and mode, ``images.load_image``), at reduced size
where the format allows (JPEG DCT scaling, ``Image.draft``: 1/2, 1/4 or 1/8 of the size while the
shorter side stays at least ``S``), centre-cropped square and resized to ``S x S``
(``fit_square``): the framing of the evaluation transform (``augment.transforms.EvalTransform``),
so pretraining and embedding see the same part of an image and nothing is stretched; the batch
augmentation then crops and resizes from there. ``S`` is a little above the training input (``storage_side``).

The pixels go into a cache file under ``pixel_cache_dir()``, named after the files' paths, sizes
and modification times and ``S``: a changed, added or removed file makes a new one. The training
loop memory-maps it (the page cache keeps it in memory when it fits) or copies it to the GPU.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from tqdm import tqdm

from ssl_pretrain.data.images import ImageSource, UnreadableImage
from ssl_pretrain.data.resize import resize_pixels
from ssl_pretrain.data.sources import FileSource, ReducedLoader, SubsetSource

log = logging.getLogger("ssl_pretrain")

CACHE_FORMAT = 2
"""Bumped when what a cache file holds changes (resampling, framing): old files are then unused.
2: the resize is the uint8 kernel evaluation uses (``data.resize``), within 2 levels of Pillow."""
MIN_STORAGE_SIDE = 64
"""Small inputs (CIFAR's 32 px) are stored at this side at least: a 0.08-area crop of a 37 px
image would be a 10 px patch blown up to 32, of a 64 px one an 18 px patch, for 12 KB an image."""
FREE_DISK_MARGIN = 2**30
"""A cache file is written only where the disk keeps this much free beside it."""
PARALLEL_FIT_FROM = 256
"""Fewer images are decoded in the calling process (worker start-up costs more than it saves)."""


def storage_side(input_size: int) -> int:
    """The side images are stored at for an ``input_size`` training crop: 8/7 of it (ImageNet's
    256 for 224, the usual resize before a 224 crop), at least ``MIN_STORAGE_SIDE``."""
    return max(MIN_STORAGE_SIDE, math.ceil(input_size * 8 / 7))


def pixel_cache_dir() -> Path:
    """``$SSL_PRETRAIN_CACHE/pixels``, else ``$XDG_CACHE_HOME/ssl-pretrain/pixels``, else
    ``~/.cache/ssl-pretrain/pixels`` (the root the precision probe's answers share)."""
    root = os.environ.get("SSL_PRETRAIN_CACHE")
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ssl-pretrain"
    return Path(root) / "pixels"


def fit_square(image: Image.Image, side: int) -> np.ndarray:
    """An RGB image -> ``(side, side, 3)`` uint8: its centre square (the shorter side's length)
    resized to ``side`` - antialiased bicubic, with the uint8 kernel evaluation's resize uses
    (``data.resize.resize_pixels``: Pillow's filter to within 2 levels, faster than Pillow's;
    scripts/bench_decode.py times it)."""
    pixels = np.array(image, dtype=np.uint8)  # a writable copy: torch takes no read-only arrays
    height, width = pixels.shape[:2]
    short = min(height, width)
    top, left = (height - short) // 2, (width - short) // 2
    square = np.ascontiguousarray(pixels[top : top + short, left : left + short])  # channels-last for the kernel
    return np.ascontiguousarray(resize_pixels(square, side, side))  # the kernel may hand back planes


class _FitDecoder:
    """``index -> (index, pixels (side, side, 3) or None, reason or None)``: a map-style dataset
    for decoding in loader workers."""

    def __init__(self, source: ImageSource, side: int):
        self.source, self.side, self.load = source, side, ReducedLoader(source, side)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        try:
            image = self.load(index)
        except UnreadableImage as error:
            return index, None, str(error)
        return index, fit_square(image, self.side), None


def _as_list(batch):
    return batch


def source_key(source) -> Optional[str]:
    """SHA-256 of what the source's files are (paths, sizes, modification times; shards'
    fingerprints), or None for sources with no cheap identity (arrays in memory): those are
    decoded into memory, not cached."""
    digest = hashlib.sha256()
    if isinstance(source, SubsetSource):
        inner = source_key(source.source)
        if inner is None:
            return None
        digest.update(inner.encode() + np.ascontiguousarray(source.indices, dtype=np.int64).tobytes())
    elif isinstance(source, FileSource):
        digest.update(f"files {source.max_pixels}\n".encode())
        for path in source.paths:
            try:
                status = os.stat(path)
                details = f"\0{status.st_size}\0{status.st_mtime_ns}\n"
            except OSError:
                details = "\0missing\n"
            digest.update(os.fsencode(os.path.abspath(path)) + details.encode())
    elif hasattr(source, "fingerprint"):  # tar shards: their paths, sizes and modification times
        digest.update(f"shards {getattr(source, 'max_pixels', '')}\n{source.fingerprint()}".encode())
    else:
        return None
    return digest.hexdigest()


@dataclass
class StoredImages:
    """What ``store_source`` made: ``images`` ``(N_ok, S, S, 3)`` uint8 (memory-mapped when from a
    cache file), unreadable files as ``(name, reason)``, whether all images are grey."""

    images: np.ndarray
    skipped: list = field(default_factory=list)
    grey: bool = False
    cache_file: Optional[Path] = None
    reused: bool = False
    seconds: float = 0.0


def _cache_paths(directory: Path, key: str, side: int) -> tuple[Path, Path]:
    name = hashlib.sha256(f"{CACHE_FORMAT} {side} {key}".encode()).hexdigest()[:32]
    return directory / f"{name}-{side}px.u8", directory / f"{name}-{side}px.json"


def _read_cache(pixels: Path, meta: Path, key: str, side: int) -> Optional[StoredImages]:
    """The cache file memory-mapped, if it is there, whole and made for ``key``."""
    try:
        info = json.loads(meta.read_text())
        count = int(info["count"])
        if info.get("key") != key or info.get("format") != CACHE_FORMAT or info.get("side") != side:
            return None
        if pixels.stat().st_size != count * side * side * 3:
            return None
        shape = (count, side, side, 3)
        # copy-on-write: a writable array for torch.from_numpy; nothing ever writes to it
        images = np.memmap(pixels, np.uint8, mode="c", shape=shape) if count else np.empty(shape, np.uint8)
        return StoredImages(images, [tuple(pair) for pair in info["skipped"]], bool(info["grey"]), pixels, True)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _decode_rows(source: ImageSource, side: int, out: np.ndarray, workers: int, progress: bool):
    """Decode every image of ``source`` into the first rows of ``out``, in source order, leaving
    out unreadable ones. Returns ``(rows written, skipped (name, reason), all grey)``."""
    decoder = _FitDecoder(source, side)
    if workers > 1 and len(source) >= PARALLEL_FIT_FROM:
        batches = iter(DataLoader(decoder, batch_size=64, num_workers=workers, collate_fn=_as_list))
    else:
        batches = ([decoder[index]] for index in range(len(source)))
    rows, skipped, grey = 0, [], True
    bar = tqdm(total=len(source), desc=f"decoding at {side} px", unit="img", disable=not progress, leave=False)
    try:
        for batch in batches:
            for index, pixels, reason in batch:
                if pixels is None:
                    skipped.append((source.name(index), reason))
                    continue
                out[rows] = pixels
                grey = grey and bool((pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all())
                rows += 1
            bar.update(len(batch))
    finally:
        bar.close()
        del batches  # stops the loader's workers
    return rows, skipped, grey and rows > 0


def _write_cache(source, side: int, key: str, pixels: Path, meta: Path, workers: int,
                 progress: bool) -> StoredImages:
    """Decode into a new cache file (written aside, then renamed: a killed run leaves no half
    file under the real name) and memory-map it. Raises OSError where it cannot be written."""
    pixels.parent.mkdir(parents=True, exist_ok=True)
    temporary = pixels.with_name(f"{pixels.name}.tmp{os.getpid()}")
    row = side * side * 3
    try:
        out = np.memmap(temporary, np.uint8, mode="w+", shape=(max(len(source), 1), side, side, 3))
        rows, skipped, grey = _decode_rows(source, side, out, workers, progress)
        out.flush()
        del out
        os.truncate(temporary, rows * row)
        os.replace(temporary, pixels)
    finally:
        if temporary.exists():
            temporary.unlink()
    info = {"format": CACHE_FORMAT, "key": key, "side": side, "count": rows, "grey": grey,
            "skipped": [list(pair) for pair in skipped]}
    meta_temporary = meta.with_name(f"{meta.name}.tmp{os.getpid()}")
    meta_temporary.write_text(json.dumps(info))
    os.replace(meta_temporary, meta)
    stored = _read_cache(pixels, meta, key, side)
    if stored is None:
        raise OSError(f"{pixels} could not be read back")
    stored.reused = False
    return stored


def store_source(source: ImageSource, side: int, workers: int = 0, progress: bool = True,
                 memory_limit: int = 2 * 2**30, cache_dir: Optional[Path] = None) -> Optional[StoredImages]:
    """Every image of ``source`` at ``side x side`` (``fit_square``): from its cache file when one
    was made for these files, else decoded (``workers`` processes) into a new cache file.

    Where no cache file can be used (a source with no identity on disk, a full or read-only
    disk) the images are decoded into memory, if they take at most ``memory_limit`` bytes; else
    the answer is None (the caller streams the files instead) and the reason is logged.

    Returns:
        ``StoredImages``, or None.
    """
    started = time.perf_counter()
    needed = len(source) * side * side * 3
    key = source_key(source)
    reason = "an in-memory source"
    if key is not None:
        directory = Path(cache_dir) if cache_dir is not None else pixel_cache_dir()
        pixels, meta = _cache_paths(directory, key, side)
        stored = _read_cache(pixels, meta, key, side)
        if stored is not None:
            return stored
        try:
            directory.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(directory).free
            if free < needed + FREE_DISK_MARGIN:
                raise OSError(f"{free / 2**30:.1f} GB free, {needed / 2**30:.1f} GB needed")
            stored = _write_cache(source, side, key, pixels, meta, workers, progress)
            stored.seconds = time.perf_counter() - started
            return stored
        except OSError as error:
            reason = f"no cache file in {directory} ({type(error).__name__}: {error})"
    if needed > memory_limit:
        log.warning("data: %d images at %d px take %.1f GB, more than the %.1f GB held in memory, and %s: "
                    "streaming the files through per-image loaders instead", len(source), side, needed / 2**30,
                    memory_limit / 2**30, reason)
        return None
    if key is not None:
        log.warning("data: %s: decoding into memory for this run only", reason)
    images = np.empty((len(source), side, side, 3), dtype=np.uint8)
    rows, skipped, grey = _decode_rows(source, side, images, workers, progress)
    return StoredImages(images[:rows], skipped, grey, seconds=time.perf_counter() - started)
