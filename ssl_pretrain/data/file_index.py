"""Finding image files once: a walk of a folder tree, and an index file that lets later runs skip it.

Walking a million files costs tens of seconds on a local disk and minutes on a network one, every
run. The index written after a walk holds the relative paths it found and, for every folder it
entered, ``(relative folder, st_mtime_ns)``. Adding, removing or renaming a file changes the
modification time of its folder, so a later open stats only the folders (a thousand, not a
million files) and walks again when any differs or is gone.

What the folder times cannot see, and so the index cannot either: a file replaced in place (same
name; harmless, the index holds names only), a folder made readable by ``chmod`` (scans that
skipped an unreadable folder are therefore never cached), and clocks far apart on a network file
system (a folder changed within ``RACY_MARGIN_NS`` of the scan is not trusted, after git's
"racy index" rule).

Index file layout (UTF-8 text, undecodable name bytes kept through ``surrogateescape``): one JSON
header line (format, version, root, count, SHA-256 of the rest...), then one line per folder
``<mtime_ns> <relative folder>``, then one relative path per line. A name holding a line break,
or starting with ``"``, is written as a JSON string.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

FILE_INDEX_FORMAT = "ssl-pretrain-file-index"
INDEX_VERSION = 1
# Folder times are as coarse as 1 s (ext3) or 2 s (FAT): a folder changed this close to the scan
# may change again without its time moving, so it is not trusted.
RACY_MARGIN_NS = 2_000_000_000


@dataclass
class TreeScan:
    """What a walk found.

    Attributes:
        paths: sorted full paths, each ``os.path.join(root, relative)`` as the walk built it.
        directories: ``(relative folder, st_mtime_ns)`` of every folder entered, ``"."`` for the root.
        complete: False when some folder could not be read (such a scan is not cached).
        classes: class folder names, for the class-folder layout.
        class_counts: number of images of each class; ``paths`` holds them class after class.
        scanned_at_ns: wall-clock time when the walk began.
    """

    paths: list[str]
    directories: list[tuple[str, int]]
    complete: bool = True
    classes: list[str] = field(default_factory=list)
    class_counts: list[int] = field(default_factory=list)
    scanned_at_ns: int = 0


# ---------------------------------------------------------------------------------------------
# Walking


def _root_prefix(root: str) -> str:
    """The string every path found under ``root`` starts with (``os.scandir`` joins like this)."""
    return os.path.join(root, "")


def walk_tree(
    root: str | Path, extensions: Sequence[str], skip_dirs: Sequence[str | Path] = (), relative_to: str | None = None
) -> TreeScan:
    """All files under ``root`` whose name ends with one of ``extensions``, recursively, sorted.

    Follows symlinks, never loops: a folder reached twice (by ``(st_dev, st_ino)``) is entered
    once, and ``skip_dirs`` are never entered. Folder times are recorded relative to
    ``relative_to`` (default ``root``).
    """
    started = time.time_ns()
    extensions = tuple(ext.lower() for ext in extensions)
    root = os.fspath(root)
    prefix = _root_prefix(relative_to if relative_to is not None else root)
    found: list[str] = []
    directories: list[tuple[str, int]] = []
    complete = True
    seen_dirs: set[tuple[int, int]] = set()
    for directory in skip_dirs:
        try:
            status = os.stat(directory)
            seen_dirs.add((status.st_dev, status.st_ino))
        except OSError:
            pass
    stack = [root]
    while stack:
        directory = stack.pop()
        try:
            status = os.stat(directory)
            if (status.st_dev, status.st_ino) in seen_dirs:
                continue  # a symlink loop or a folder reached twice
            seen_dirs.add((status.st_dev, status.st_ino))
            entries = list(os.scandir(directory))
        except OSError as error:
            log.warning("skipped folder %s: %s", directory, error.strerror or error)
            complete = False
            continue
        relative = directory[len(prefix):] if directory.startswith(prefix) else "."
        directories.append((relative or ".", status.st_mtime_ns))
        for entry in entries:
            try:
                if entry.is_dir():
                    stack.append(entry.path)
                elif entry.name.lower().endswith(extensions) and entry.is_file():
                    found.append(entry.path)
            except OSError:
                continue  # a dangling or looping link
    found.sort()
    return TreeScan(found, directories, complete, scanned_at_ns=started)


def walk_class_folders(root: str | Path, extensions: Sequence[str]) -> TreeScan:
    """Image-folder layout ``root/<class>/**/<file>``: one walk per class folder, classes sorted.

    Each class walk skips the top folder and the other classes, even through a link, so that
    ``cats/loop -> ..`` cannot file every dog under cats too. Files directly in ``root`` are not
    images of any class and are left out.
    """
    started = time.time_ns()
    root_str = os.fspath(root)
    classes = sorted(entry.name for entry in os.scandir(root_str) if entry.is_dir())
    scan = TreeScan([], [(".", os.stat(root_str).st_mtime_ns)], classes=classes, scanned_at_ns=started)
    for class_name in classes:
        others = [root_str] + [os.path.join(root_str, other) for other in classes if other != class_name]
        part = walk_tree(os.path.join(root_str, class_name), extensions, skip_dirs=others, relative_to=root_str)
        scan.paths += part.paths
        scan.directories += part.directories
        scan.class_counts.append(len(part.paths))
        scan.complete = scan.complete and part.complete
    return scan


# ---------------------------------------------------------------------------------------------
# The index file


def quote_name(name: str) -> str:
    """A name as one line of an index file: itself, or a JSON string when it could be misread."""
    return json.dumps(name) if ("\n" in name or "\r" in name or name.startswith('"')) else name


def unquote_name(line: str) -> str:
    return json.loads(line) if line.startswith('"') else line


def write_index_file(path: str | Path, header: dict, lines: list[str]) -> bool:
    """Write a header and body lines atomically: a temporary file in the same folder, then
    ``os.replace``, so a reader never sees half a file. Returns False (with a warning) on failure."""
    path = Path(path)
    body = ("\n".join(lines) + "\n" if lines else "").encode("utf-8", "surrogateescape")
    header = dict(header, sha256=hashlib.sha256(body).hexdigest())
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        with os.fdopen(handle, "wb") as out:
            out.write(json.dumps(header).encode() + b"\n")
            out.write(body)
        os.replace(temporary, path)
        return True
    except OSError as error:
        log.warning("could not write index %s: %s", path, error.strerror or error)
        if temporary is not None:
            try:
                os.unlink(temporary)
            except OSError:
                pass
        return False


def read_index_file(path: str | Path, file_format: str) -> tuple[dict, list[str]] | None:
    """Header and body lines of an index file, or None (with a warning) when it is missing,
    unreadable, of another format or version, or does not match its own checksum."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as error:
        log.warning("ignoring unreadable index %s (%s); rebuilding it", path, error.strerror or error)
        return None
    try:
        newline = data.index(b"\n")
        header = json.loads(data[:newline])
        body = data[newline + 1:]
        if not isinstance(header, dict) or header.get("format") != file_format:
            raise ValueError(f"not a {file_format}")
        if header.get("version") != INDEX_VERSION:
            raise ValueError(f"version {header.get('version')}, expected {INDEX_VERSION}")
        if hashlib.sha256(body).hexdigest() != header.get("sha256"):
            raise ValueError("checksum mismatch (truncated or edited)")
        lines = body.decode("utf-8", "surrogateescape").split("\n")
    except (ValueError, UnicodeDecodeError) as error:
        log.warning("ignoring corrupt index %s (%s); rebuilding it", path, str(error).splitlines()[0])
        return None
    return header, lines[:-1]


def _index_header(root: str, layout: str, extensions: Sequence[str], scan: TreeScan) -> dict:
    return {
        "format": FILE_INDEX_FORMAT, "version": INDEX_VERSION, "root": os.path.abspath(root),
        "layout": layout, "extensions": sorted(ext.lower() for ext in extensions),
        "scanned_at_ns": scan.scanned_at_ns, "directories": len(scan.directories), "count": len(scan.paths),
        "classes": scan.classes, "class_counts": scan.class_counts,
    }


def save_scan(index_file: str | Path, root: str, layout: str, extensions: Sequence[str], scan: TreeScan) -> bool:
    """Write ``scan`` of ``root`` as an index file; False if it could not be written."""
    prefix_length = len(_root_prefix(root))
    lines = [f"{mtime} {quote_name(relative)}" for relative, mtime in scan.directories]
    lines += [quote_name(path[prefix_length:]) for path in scan.paths]
    return write_index_file(index_file, _index_header(root, layout, extensions, scan), lines)


def _stale_reason(root: str, scanned_at_ns: int, directories: list[tuple[str, int]]) -> str | None:
    """Why a recorded folder list no longer describes the tree (None: it still does)."""
    for relative, mtime in directories:
        try:
            now = os.stat(os.path.join(root, relative)).st_mtime_ns
        except OSError:
            return f"folder {relative} is gone"
        if now != mtime:
            return f"folder {relative} changed"
        if mtime >= scanned_at_ns - RACY_MARGIN_NS:
            return f"folder {relative} changed during the scan"
    return None


def load_scan(index_file: str | Path, root: str, layout: str, extensions: Sequence[str]) -> TreeScan | None:
    """The scan stored in ``index_file`` if it is of ``root`` (same layout and extensions) and no
    folder has changed since; else None. Stats every recorded folder, reads no other entry."""
    loaded = read_index_file(index_file, FILE_INDEX_FORMAT)
    if loaded is None:
        return None
    header, lines = loaded
    expected = _index_header(root, layout, extensions, TreeScan([], []))
    for key in ("root", "layout", "extensions"):
        if header.get(key) != expected[key]:
            log.info("index %s is of another %s (%s); rescanning", index_file, key, header.get(key))
            return None
    try:
        n_dirs, count = int(header["directories"]), int(header["count"])
        if len(lines) != n_dirs + count or sum(header["class_counts"]) != (count if header["classes"] else 0):
            raise ValueError("counts do not match")
        directories = []
        for line in lines[:n_dirs]:
            mtime, _, relative = line.partition(" ")
            directories.append((unquote_name(relative), int(mtime)))
        scanned_at = int(header["scanned_at_ns"])
        prefix = _root_prefix(root)
        paths = [prefix + unquote_name(line) for line in lines[n_dirs:]]
    except (KeyError, TypeError, ValueError) as error:
        log.warning("ignoring corrupt index %s (%s); rebuilding it", index_file, str(error).splitlines()[0])
        return None
    reason = _stale_reason(root, scanned_at, directories)
    if reason is not None:
        log.info("index %s is out of date (%s); rescanning %s", index_file, reason, root)
        return None
    return TreeScan(paths, directories, True, list(header["classes"]), list(header["class_counts"]), scanned_at)


def cached_scan(
    root: str | Path, layout: str, extensions: Sequence[str], index_file: str | Path | None,
    scan: Callable[[], TreeScan],
) -> TreeScan:
    """``scan()``, or its result stored in ``index_file`` while that is still valid.

    Args:
        root: the folder scanned.
        layout: ``"flat"`` (every image under root) or ``"classes"`` (one folder per class); an
            index of one layout is never used for the other.
        index_file: where the index lives; None scans every time.
        scan: the walk to run when there is no valid index.
    """
    root = os.fspath(root)
    if index_file is not None:
        stored = load_scan(index_file, root, layout, extensions)
        if stored is not None:
            log.debug("file index %s: %d files, %d folders unchanged", index_file, len(stored.paths),
                      len(stored.directories))
            return stored
    result = scan()
    if index_file is not None:
        if result.complete:
            save_scan(index_file, root, layout, extensions, result)
        else:
            log.info("not caching the file index of %s: some folders could not be read", root)
    return result
