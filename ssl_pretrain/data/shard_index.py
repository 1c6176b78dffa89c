"""The index of a tar shard: where each sample's image bytes lie (``TarInfo.offset_data``, ``size``)
and its label (a ``.cls`` member), read from the tar headers only, and an index file that keeps
the indexes of many shards, keyed by each shard's size and modification time, for later runs.
``ssl_pretrain.data.shards`` reads images through it.
"""

from __future__ import annotations

import logging
import os
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path


from ssl_pretrain.data.file_index import (
    INDEX_VERSION,
    RACY_MARGIN_NS,
    quote_name,
    read_index_file,
    unquote_name,
    write_index_file,
)
from ssl_pretrain.data.images import IMAGE_EXTENSIONS, DataError

log = logging.getLogger(__name__)

SHARD_INDEX_FORMAT = "ssl-pretrain-shard-index"
COMPRESSED_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar.zst", ".tar.lz4")
# Sample image extensions (without the dot) in order of preference when a sample has several.
SHARD_IMAGE_EXTENSIONS = tuple(ext[1:] for ext in IMAGE_EXTENSIONS)
MAX_CLS_BYTES = 64


def refuse_compressed(name: str) -> None:
    raise DataError(f"{name} is compressed: random access needs uncompressed .tar shards "
                    f"(decompress them, e.g. gunzip, or re-write them with tarfile mode 'w')")


@dataclass
class ShardIndex:
    """The samples of one shard, in the order their first member appears.

    Attributes:
        path: the shard file; ``size`` and ``mtime_ns`` identify the version indexed.
        names: ``key.ext`` of each sample's image member.
        offsets, sizes: where the image bytes start in the shard, and how many.
        labels: the ``.cls`` value, or -1 when the sample has none (or an invalid one).
    """

    path: str
    size: int
    mtime_ns: int
    names: list[str] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)


def _split_key(member_name: str) -> tuple[str, str]:
    """``dir/sample.seg.png`` -> ``('dir/sample', 'seg.png')`` (WebDataset's rule: first dot of
    the file name)."""
    folder, _, base = member_name.rpartition("/")
    stem, dot, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (extension.lower() if dot else "")


def _parse_label(data: bytes) -> int:
    try:
        label = int(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        return -1
    return label if label >= 0 else -1


def _check_tail(handle, end_of_members: int, size: int, shard: str) -> None:
    """After the last member only zero blocks may follow; anything else is a cut-off header."""
    handle.seek(end_of_members)
    tail = handle.read(min(size - end_of_members, 1 << 20))
    if tail.strip(b"\0"):
        raise DataError(f"shard {shard} is truncated or corrupt (unreadable data after byte {end_of_members})")


def index_shard(path: str) -> ShardIndex:
    """Read the headers of one uncompressed tar and group its members into samples.

    Raises:
        DataError: the shard is compressed, truncated or not a tar (one line, naming the shard).
    """
    try:
        status = os.stat(path)
        with open(path, "rb") as handle:
            magic = handle.read(6)
            if magic[:2] == b"\x1f\x8b" or magic[:3] == b"BZh" or magic == b"\xfd7zXZ\x00" or magic[:4] == b"(\xb5/\xfd":
                refuse_compressed(path)
            handle.seek(0)
            samples: dict[str, dict[str, tarfile.TarInfo]] = {}
            with tarfile.open(fileobj=handle, mode="r:") as archive:
                for info in archive:
                    if info.isreg():
                        if info.offset_data + info.size > status.st_size:
                            raise tarfile.ReadError(f"member {info.name} runs past the end of the file")
                        key, extension = _split_key(info.name)
                        samples.setdefault(key, {})[extension] = info
                end_of_members = archive.offset
                labels_data = {key: archive.extractfile(members["cls"]).read(MAX_CLS_BYTES)
                               for key, members in samples.items()
                               if "cls" in members and members["cls"].size <= MAX_CLS_BYTES}
            _check_tail(handle, end_of_members, status.st_size, path)
    except (tarfile.TarError, EOFError) as error:
        raise DataError(f"shard {path} is truncated or corrupt ({error})") from None
    except OSError as error:
        raise DataError(f"cannot read shard {path}: {error.strerror or error}") from None
    index = ShardIndex(path, status.st_size, status.st_mtime_ns)
    without_image = 0
    for key, members in samples.items():
        extension = next((ext for ext in SHARD_IMAGE_EXTENSIONS if ext in members), None)
        if extension is None:
            without_image += 1
            continue
        info = members[extension]
        index.names.append(f"{key}.{extension}")
        index.offsets.append(info.offset_data)
        index.sizes.append(info.size)
        index.labels.append(_parse_label(labels_data[key]) if key in labels_data else -1)
    if without_image:
        log.warning("shard %s: %d sample(s) without an image member left out", path, without_image)
    return index


# ---------------------------------------------------------------------------------------------
# The index file of many shards


def _shard_identity(path: str) -> tuple[int, int]:
    status = os.stat(path)
    return status.st_size, status.st_mtime_ns


def load_shard_indexes(index_file: str | Path) -> dict[str, ShardIndex]:
    """The shard indexes stored in ``index_file`` by absolute path ({} when missing or corrupt)."""
    loaded = read_index_file(index_file, SHARD_INDEX_FORMAT)
    if loaded is None:
        return {}
    header, lines = loaded
    stored: dict[str, ShardIndex] = {}
    try:
        position = 0
        for entry in header["shards"]:
            index = ShardIndex(entry["path"], int(entry["size"]), int(entry["mtime_ns"]))
            for line in lines[position: position + int(entry["samples"])]:
                offset, size, label, name = line.split(" ", 3)
                index.offsets.append(int(offset))
                index.sizes.append(int(size))
                index.labels.append(int(label))
                index.names.append(unquote_name(name))
            position += int(entry["samples"])
            stored[index.path] = index
        if position != len(lines):
            raise ValueError("sample count does not match")
    except (KeyError, TypeError, ValueError) as error:
        log.warning("ignoring corrupt index %s (%s); rebuilding it", index_file, str(error).splitlines()[0])
        return {}
    return stored


def save_shard_indexes(index_file: str | Path, indexes: list[ShardIndex]) -> bool:
    """Write ``indexes`` to ``index_file`` atomically; False if it could not be written."""
    header = {
        "format": SHARD_INDEX_FORMAT, "version": INDEX_VERSION, "indexed_at_ns": time.time_ns(),
        "count": sum(len(index.names) for index in indexes),
        "shards": [{"path": index.path, "size": index.size, "mtime_ns": index.mtime_ns,
                    "samples": len(index.names)} for index in indexes],
    }
    lines = [f"{offset} {size} {label} {quote_name(name)}"
             for index in indexes
             for offset, size, label, name in zip(index.offsets, index.sizes, index.labels, index.names)]
    return write_index_file(index_file, header, lines)


def index_shards(shards: list[str], index_file: str | Path | None = None) -> list[ShardIndex]:
    """Index every shard, reusing those stored in ``index_file`` whose size and modification time
    are unchanged (and not too recent to trust); rewrites ``index_file`` when any was re-read."""
    stored = load_shard_indexes(index_file) if index_file is not None else {}
    started = time.time_ns()
    indexes, reread = [], 0
    for shard in shards:
        absolute = os.path.abspath(shard)
        try:
            size, mtime_ns = _shard_identity(shard)
        except OSError as error:
            raise DataError(f"cannot read shard {shard}: {error.strerror or error}") from None
        known = stored.get(absolute)
        if known is not None and (known.size, known.mtime_ns) == (size, mtime_ns) \
                and mtime_ns < started - RACY_MARGIN_NS:
            indexes.append(known)
            continue
        index = index_shard(shard)
        index.path = absolute
        indexes.append(index)
        reread += 1
    if index_file is not None and (reread or len(stored) != len(indexes)):
        save_shard_indexes(index_file, indexes)
    if reread:
        log.info("indexed %d of %d shard(s)", reread, len(shards))
    return indexes


# ---------------------------------------------------------------------------------------------
# The source
