"""Tar shards in WebDataset layout as a map-style image source: random access by byte offset.

A shard is an uncompressed ``.tar`` whose members are grouped into samples by key, the member path
up to the first dot of its file name (``images/n01440764_10026.jpg`` and
``images/n01440764_10026.cls`` are one sample). Each sample needs one image member (``.jpg``,
``.png``, ``.webp``...) and may carry a ``.cls`` member, its integer label as text.

Each shard is indexed once, by reading its tar headers only (``TarInfo.offset_data``, ``size``;
``.cls`` members are read too, they are a few bytes), and that index can be kept in an index file
keyed by each shard's size and modification time. ``load(i)`` is then one ``os.pread`` of the
image bytes, from a file opened lazily in the process that reads, so the source works in
``DataLoader`` worker processes: nothing open is inherited or pickled.

Compressed shards (``.tar.gz``...) cannot be read by offset and are refused in one line.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import re
from collections import OrderedDict
from pathlib import Path

import numpy as np
from PIL import Image

from ssl_pretrain.data.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    DataError,
    UnreadableImage,
    decode_image_bytes,
)
from ssl_pretrain.data.shard_index import (
    COMPRESSED_SUFFIXES,
    SHARD_IMAGE_EXTENSIONS,
    ShardIndex,
    index_shards,
    refuse_compressed,
)

log = logging.getLogger(__name__)

MAX_OPEN_SHARDS = 64  # per process: a thousand shards must not exhaust the file-descriptor limit


# ---------------------------------------------------------------------------------------------
# Which files


def expand_braces(pattern: str) -> list[str]:
    """``train-{000..002}.tar`` -> ``train-000.tar, train-001.tar, train-002.tar``; also
    ``{a,b}`` lists, several groups, zero padding as written (the ``braceexpand`` rules)."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    head, body, tail = pattern[: match.start()], match.group(1), pattern[match.end():]
    numeric = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if numeric:
        first, last = numeric.groups()
        width = max(len(first), len(last)) if (first.startswith("0") or last.startswith("0")) else 0
        step = 1 if int(last) >= int(first) else -1
        choices = [str(n).zfill(width) for n in range(int(first), int(last) + step, step)]
    else:
        choices = body.split(",")
    return [expanded for choice in choices for expanded in expand_braces(head + choice + tail)]


def _looks_like_shard_folder(folder: Path) -> bool:
    """A folder whose top level holds ``.tar`` files and neither images nor subfolders (stops at
    the first image or subfolder, so a million-image folder costs one directory entry)."""
    tars = 0
    compressed = ""
    with os.scandir(folder) as entries:
        for entry in entries:
            name = entry.name.lower()
            if name.endswith(IMAGE_EXTENSIONS) or entry.is_dir():
                return False
            if name.endswith(".tar"):
                tars += 1
            elif name.endswith(COMPRESSED_SUFFIXES):
                compressed = entry.name
    if not tars and compressed:
        refuse_compressed(str(folder / compressed))
    return tars > 0


def find_shards(spec: str) -> list[str] | None:
    """The shard files ``spec`` names, in order, or None when ``spec`` is not about shards.

    ``spec`` is a ``.tar`` file, a brace pattern (``shards/train-{000000..000009}.tar``), a glob
    (``shards/*.tar``, sorted) or a folder holding only ``*.tar`` files (sorted).

    Raises:
        DataError: a named shard is missing, or the shards are compressed.
    """
    lowered = spec.lower()
    if lowered.endswith(COMPRESSED_SUFFIXES):
        refuse_compressed(spec)
    if lowered.endswith(".tar"):
        if "{" in spec and "}" in spec:
            shards = expand_braces(spec)
        elif glob.has_magic(spec):
            shards = sorted(glob.glob(spec))
            if not shards:
                raise DataError(f"no shard matches {spec}")
        else:
            shards = [spec]
        missing = [shard for shard in shards if not os.path.isfile(shard)]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise DataError(f"shard not found: {missing[0]}{more}")
        return shards
    folder = Path(spec)
    if folder.is_dir() and _looks_like_shard_folder(folder):
        return sorted(str(path) for path in folder.iterdir() if path.name.lower().endswith(".tar"))
    return None


# ---------------------------------------------------------------------------------------------
# Indexing one shard


class TarShardSource:
    """Images inside uncompressed tar shards (WebDataset layout), read by offset.

    Attributes:
        shard_paths: the shards, in order.
        labels: ``(N,)`` int64 ``.cls`` values when every sample has one, else None.
        classes: ``["0", "1", ..., str(max label)]`` when labelled (shards carry no class names).
    """

    def __init__(self, indexes: list[ShardIndex], max_pixels: int = DEFAULT_MAX_PIXELS):
        self.shard_paths = [index.path for index in indexes]
        self.max_pixels = max_pixels
        counts = [len(index.names) for index in indexes]
        self.shard_of = np.repeat(np.arange(len(indexes), dtype=np.int32), counts)
        self.offsets = np.asarray([o for index in indexes for o in index.offsets], dtype=np.int64)
        self.sizes = np.asarray([s for index in indexes for s in index.sizes], dtype=np.int64)
        # Names as one byte string plus offsets: a million str objects would each be copied into
        # every DataLoader worker the first time its reference count is touched.
        encoded = [os.path.basename(index.path).encode("utf-8", "surrogateescape") + b"/"
                   + name.encode("utf-8", "surrogateescape") for index in indexes for name in index.names]
        self._names = b"".join(encoded)
        self._name_starts = np.concatenate([[0], np.cumsum([len(name) for name in encoded])]).astype(np.int64)
        all_labels = np.asarray([label for index in indexes for label in index.labels], dtype=np.int64)
        self.missing_labels = int((all_labels < 0).sum())
        self.labels = all_labels if len(all_labels) and not self.missing_labels else None
        self.classes = [str(c) for c in range(int(all_labels.max()) + 1)] if self.labels is not None else []
        self._identity = [(index.path, index.size, index.mtime_ns) for index in indexes]
        self._handles: OrderedDict[int, int] = OrderedDict()
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.offsets)

    def name(self, index: int) -> str:
        """``<shard file name>/<key>.<ext>``."""
        start, end = self._name_starts[index], self._name_starts[index + 1]
        return self._names[start:end].decode("utf-8", "surrogateescape")

    def load(self, index: int, min_side: int | None = None) -> Image.Image:
        """The image of sample ``index`` as RGB, checked like a file (``load_image``); ``min_side``:
        a JPEG may decode at reduced size while both sides stay this long.

        Raises:
            UnreadableImage: the member is not a decodable image, or the shard changed or vanished.
        """
        shard, offset, size = int(self.shard_of[index]), int(self.offsets[index]), int(self.sizes[index])
        try:
            data = os.pread(self._descriptor(shard), size, offset)
        except OSError as error:
            raise UnreadableImage(f"cannot read shard: {error.strerror or error}") from None
        if len(data) != size:
            raise UnreadableImage(f"shard shorter than indexed ({len(data)} of {size} bytes): changed since?")
        return decode_image_bytes(data, self.max_pixels, min_side)

    def fingerprint(self) -> str:
        """SHA-256 of the shards' paths, sizes and modification times, and of the labels."""
        digest = hashlib.sha256(repr(self._identity).encode())
        if self.labels is not None:
            digest.update(self.labels.tobytes())
        return digest.hexdigest()

    def _descriptor(self, shard: int) -> int:
        """An open descriptor of ``shard`` owned by this process (opened on first use)."""
        if self._pid != os.getpid():  # a forked worker: the parent's descriptors are not ours
            for inherited in self._handles.values():
                os.close(inherited)  # closes this process's copy only
            self._handles, self._pid = OrderedDict(), os.getpid()
        descriptor = self._handles.get(shard)
        if descriptor is not None:
            self._handles.move_to_end(shard)
            return descriptor
        descriptor = os.open(self.shard_paths[shard], os.O_RDONLY)
        self._handles[shard] = descriptor
        if len(self._handles) > MAX_OPEN_SHARDS:
            os.close(self._handles.popitem(last=False)[1])
        return descriptor

    def close(self) -> None:
        """Close the shards this process opened."""
        if self._pid == os.getpid():
            for descriptor in self._handles.values():
                os.close(descriptor)
        self._handles = OrderedDict()

    def __del__(self) -> None:
        try:
            self.close()
        except (OSError, AttributeError):
            pass

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handles"], state["_pid"] = OrderedDict(), None  # descriptors do not travel
        return state


def open_shards(
    shards: list[str], *, labelled: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS,
    index_cache: str | Path | None = None,
) -> TarShardSource:
    """A ``TarShardSource`` over ``shards`` (see ``open_source``).

    Raises:
        DataError: a shard is unusable, the shards hold no image, or ``labelled`` and some sample
            has no ``.cls`` (one line).
    """
    source = TarShardSource(index_shards(shards, index_cache), max_pixels)
    where = shards[0] if len(shards) == 1 else f"{len(shards)} shards ({shards[0]} ...)"
    if not len(source):
        raise DataError(f"no image members in {where} (looked for {', '.join(SHARD_IMAGE_EXTENSIONS)})")
    if labelled and source.labels is None:
        raise DataError(f"{where}: {source.missing_labels} of {len(source)} samples have no valid .cls label "
                        "(labelled use needs an integer .cls member per sample)")
    return source
