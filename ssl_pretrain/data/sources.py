"""Images on disk -> a list of sources that each yield RGB PIL images, skipping what is unreadable.

A *source* is anything with ``__len__``, ``load(index) -> PIL.Image (RGB)``, ``name(index)`` and,
when labelled, ``labels`` (int array) and ``classes`` (names). ``open_source`` turns the strings
users type (a folder, a text file of paths, tar shards, ``builtin:digits``, ``cifar10:ROOT``...)
into one.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ssl_pretrain.data.file_index import cached_scan, walk_class_folders, walk_tree
from ssl_pretrain.data.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    DataError,
    ImageSource,
    UnreadableImage,
    load_image,
    to_rgb,
)
from ssl_pretrain.data.shards import find_shards, open_shards

log = logging.getLogger(__name__)
# ---------------------------------------------------------------------------------------------
# Finding files


def scan_images(
    root: str | Path, extensions: Sequence[str] = IMAGE_EXTENSIONS, skip_dirs: Sequence[str | Path] = ()
) -> list[str]:
    """All image files under ``root``, recursively, sorted. Follows symlinks, never loops.

    ``skip_dirs`` are folders never entered, even through a link. ``os.scandir`` reuses the
    directory entries' types, so 100,000 files take about a second; ``open_source(...,
    index_cache=...)`` keeps the result for the next run (see ``ssl_pretrain.data.file_index``).
    """
    return walk_tree(root, extensions, skip_dirs).paths


def read_path_list(list_file: str | Path) -> list[str]:
    """A text file with one image path per line (relative paths are relative to the file)."""
    base = Path(list_file).parent
    paths = []
    for line in Path(list_file).read_text(errors="replace").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            path = Path(line)
            paths.append(str(path if path.is_absolute() else base / path))
    return paths


LABEL_LIST_HEADERS = {("path", "label"), ("file", "label"), ("filename", "label"), ("image", "label")}


def _class_order(names: set[str]) -> list[str]:
    """Class names in a stable order: numerically when every name is an integer (``2`` before
    ``10``), else alphabetically, as image folders are."""
    if all(re.fullmatch(r"-?\d+", name) for name in names):
        return sorted(names, key=int)
    return sorted(names)


def read_labelled_list(list_file: str | Path) -> tuple[list[str], list[str]]:
    """``path,label`` lines of a CSV or text file -> ``(paths, label names)``.

    Paths are relative to the file; a header line (``path,label``), blank lines and ``#``
    comments are skipped. The last comma separates the label, so paths may contain commas.

    Raises:
        DataError: a line without a label, or no lines at all.
    """
    import csv

    base, paths, names = Path(list_file).parent, [], []
    with open(list_file, newline="", errors="replace") as file:
        for number, row in enumerate(csv.reader(file), start=1):
            if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
                continue
            cells = [cell.strip() for cell in row]
            if number == 1 and tuple(cell.lower() for cell in cells[:2]) in LABEL_LIST_HEADERS:
                continue
            if len(cells) < 2 or not cells[-1]:
                raise DataError(f"{list_file}, line {number}: expected 'path,label', got '{','.join(row)[:80]}'")
            path = Path(",".join(cells[:-1]))
            paths.append(str(path if path.is_absolute() else base / path))
            names.append(cells[-1])
    if not paths:
        raise DataError(f"{list_file} lists no labelled images (expected lines of 'path,label')")
    return paths, names


def labelled_list_source(list_file: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> "FileSource":
    """Labelled images named in a ``path,label`` file (CSV or text).

    Raises:
        DataError: a listed image that does not exist (the count and the first one are named),
            or a malformed line.
    """
    paths, names = read_labelled_list(list_file)
    missing = [path for path in paths if not os.path.exists(path)]
    if missing:
        raise DataError(f"{list_file} names {len(missing)} image(s) that do not exist (first: {missing[0]})")
    classes = _class_order(set(names))
    index = {name: position for position, name in enumerate(classes)}
    labels = np.array([index[name] for name in names], dtype=np.int64)
    return FileSource(paths, labels, classes, str(Path(list_file).parent), max_pixels)


# ---------------------------------------------------------------------------------------------
# Sources


@dataclass
class FileSource:
    """Image files on disk, optionally labelled by their class folder."""

    paths: list[str]
    labels: np.ndarray | None = None
    classes: list[str] = field(default_factory=list)
    root: str = ""
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int, min_side: int | None = None) -> Image.Image:
        """``min_side``: a JPEG may decode at reduced size while both sides stay this long (``load_image``)."""
        return load_image(self.paths[index], self.max_pixels, min_side)

    def name(self, index: int) -> str:
        path = self.paths[index]
        return os.path.relpath(path, self.root) if self.root else path


@dataclass
class ArraySource:
    """Images held in memory as a uint8 array (N, H, W[, C]), e.g. the built-in digits."""

    images: np.ndarray
    labels: np.ndarray | None = None
    classes: list[str] = field(default_factory=list)
    prefix: str = "array"

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int, min_side: int | None = None) -> Image.Image:
        return to_rgb(Image.fromarray(self.images[index]))  # in memory already: min_side saves nothing

    def name(self, index: int) -> str:
        return f"{self.prefix}/{index:06d}"


class SubsetSource:
    """Some images of another source, usable wherever a source is (``len``, ``load``, ``name``,
    ``labels``, ``classes``).

    Args:
        source: any image source.
        indices: ``(n,)`` positions of the chosen images in ``source``.
    """

    def __init__(self, source: ImageSource, indices: np.ndarray):
        self.source = source
        self.indices = np.asarray(indices, dtype=np.int64)
        labels = getattr(source, "labels", None)
        self.labels = None if labels is None else np.asarray(labels)[self.indices]
        self.classes = list(getattr(source, "classes", []))

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, index: int, min_side: int | None = None) -> Image.Image:
        if min_side is None:  # a wrapped source whose load takes no min_side still works
            return self.source.load(int(self.indices[index]))
        return self.source.load(int(self.indices[index]), min_side=min_side)

    def name(self, index: int) -> str:
        return self.source.name(int(self.indices[index]))

    def subset(self, positions: np.ndarray) -> SubsetSource:
        """The images at ``positions`` of this subset, as a subset of the same source."""
        return SubsetSource(self.source, self.indices[np.asarray(positions, dtype=np.int64)])



def takes_min_side(source) -> bool:
    """Does ``source.load`` accept ``min_side`` (a JPEG decoded at reduced size)?"""
    if isinstance(source, SubsetSource):
        return takes_min_side(source.source)
    try:
        return "min_side" in inspect.signature(source.load).parameters
    except (TypeError, ValueError):
        return False


class ReducedLoader:
    """``index -> image`` decoded at reduced size where the source and format allow (JPEG DCT
    scaling while both sides stay at least ``min_side``): what every consumer that resizes to a
    known input size (pixel cache, embeddings, fine-tuning) reads through. Picklable, for loader
    workers."""

    def __init__(self, source, min_side: int):
        self.source, self.min_side, self.reduced = source, min_side, takes_min_side(source)

    def __call__(self, index: int) -> Image.Image:
        if self.reduced:
            return self.source.load(index, min_side=self.min_side)
        return self.source.load(index)


def random_subset(source: ImageSource, count: int | None, seed: int = 0) -> ImageSource:
    """``count`` images drawn without replacement with a fixed seed, in their original order."""
    if count is None or count >= len(source):
        return source
    indices = np.sort(np.random.default_rng(seed).choice(len(source), size=count, replace=False))
    return SubsetSource(source, indices)


def digits_source(split: str = "all") -> ArraySource:
    """scikit-learn's bundled 1,797 real 8x8 handwritten digits (no download).

    ``split`` is ``all``, ``train`` (75%) or ``test`` (25%): a stratified split with a fixed seed,
    so pretraining on ``train`` never sees the ``test`` images. The files are parsed once per
    process; each call gets its own copy of the arrays.
    """
    if split not in ("all", "train", "test"):
        raise DataError(f"builtin:digits has splits train, test and all, not '{split}'")
    images, labels = _digits_arrays(split)
    return ArraySource(images.copy(), labels.copy(), [str(i) for i in range(10)], prefix=f"digits-{split}")


@functools.lru_cache(maxsize=None)
def _digits_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images, labels)`` of one split of the digits: uint8 (N, 8, 8) and int64 (N,)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    if split != "all":
        train_idx, test_idx = train_test_split(
            np.arange(len(labels)), test_size=0.25, stratify=labels, random_state=0
        )
        chosen = np.sort(train_idx if split == "train" else test_idx)
        images, labels = images[chosen], labels[chosen]
    return images, labels


def _torchvision_source(kind: str, root: str, split: str, download: bool) -> ArraySource:
    import torchvision.datasets as tvd

    try:
        if kind in ("cifar10", "cifar100"):
            cls = tvd.CIFAR10 if kind == "cifar10" else tvd.CIFAR100
            dataset = cls(root, train=(split != "test"), download=download)
            images, labels = np.asarray(dataset.data), np.asarray(dataset.targets)
        else:  # stl10: pretraining uses the unlabelled 100k together with the labelled train
            stl_split = {"train": "train", "test": "test", "unlabeled": "unlabeled"}.get(split, "train+unlabeled")
            dataset = tvd.STL10(root, split=stl_split, download=download)
            images, labels = dataset.data.transpose(0, 2, 3, 1), np.asarray(dataset.labels)
    except RuntimeError as error:
        hint = "" if download else " (pass data.download=true to let torchvision fetch it)"
        raise DataError(f"{kind} not found under {root}: {str(error).splitlines()[0]}{hint}") from None
    classes = list(getattr(dataset, "classes", []))
    has_labels = bool((labels >= 0).all())
    return ArraySource(np.ascontiguousarray(images), labels if has_labels else None, classes, prefix=kind)


def image_folder_source(
    root: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, *, index_cache: str | Path | None = None
) -> FileSource:
    """Labelled images in image-folder layout: ``root/<class>/**/<image>``.

    Args:
        index_cache: an index file that keeps the scan for later runs (see ``open_source``).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"labelled folder not found: {root}")
    scan = cached_scan(root, "classes", IMAGE_EXTENSIONS, index_cache,
                       lambda: walk_class_folders(root, IMAGE_EXTENSIONS))
    if not scan.classes:
        raise DataError(f"{root} has no class subfolders (expected {root}/<class>/<image>)")
    empty = [name for name, count in zip(scan.classes, scan.class_counts) if count == 0]
    if empty:
        raise DataError(f"{root}: class folder(s) with no images: {', '.join(empty)}")
    labels = np.repeat(np.arange(len(scan.classes), dtype=np.int64), scan.class_counts)
    return FileSource(scan.paths, labels, scan.classes, str(root), max_pixels)


def _parse_spec(spec: str) -> tuple[str, str, str]:
    """``'cifar10:/data:test'`` -> ``('cifar10', '/data', 'test')``."""
    kind, _, rest = spec.partition(":")
    split = "train"
    for candidate in ("train", "test", "unlabeled", "all"):
        if rest.endswith(":" + candidate):
            rest, split = rest[: -len(candidate) - 1], candidate
    return kind, rest, split


def open_source(
    spec: str, *, labelled: bool = False, download: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS,
    index_cache: str | Path | None = None,
) -> ImageSource:
    """Turn what a user typed into an image source.

    Args:
        spec: a folder, a ``.txt`` list of paths, ``builtin:digits[:train|:test|:all]``,
            ``cifar10:ROOT[:train|:test]``, ``cifar100:ROOT[...]``, ``stl10:ROOT[...]``, or tar
            shards in WebDataset layout: ``x.tar``, ``shards/train-{000000..000009}.tar``, or a
            folder holding only ``*.tar`` files.
        labelled: folders are read in image-folder layout (one subfolder per class), a file as
            ``path,label`` lines (CSV or text); shards need a ``.cls`` member for every sample.
        download: allow torchvision to download a named dataset.
        index_cache: an index file (e.g. ``<run folder>/file_index.txt``) that keeps the scan of a
            folder, or the member offsets of tar shards, for later runs; reused while the folders'
            (or shards') modification times are unchanged, rebuilt when stale or corrupt. None:
            scan every time. Never written inside the data folder, which may be shared or
            read-only, and whose own time would change.

    Raises:
        DataError: the source does not exist, or holds no image files (one line).
    """
    if spec.startswith("builtin:"):
        name, _, split = spec[len("builtin:"):].partition(":")
        if name != "digits":
            raise DataError(f"unknown built-in dataset '{name}' (available: digits)")
        return digits_source(split or "all")
    kind, root, split = _parse_spec(spec)
    if kind in ("cifar10", "cifar100", "stl10") and root and not Path(spec).exists():
        return _torchvision_source(kind, root, split, download)
    shards = find_shards(spec)
    if shards is not None:
        return open_shards(shards, labelled=labelled, max_pixels=max_pixels, index_cache=index_cache)
    path = Path(spec)
    if labelled and path.is_file():
        return labelled_list_source(path, max_pixels)
    if labelled:
        return image_folder_source(path, max_pixels, index_cache=index_cache)
    if path.is_file():
        paths = read_path_list(path)
        if not paths:
            raise DataError(f"{path} lists no image paths")
        return FileSource(paths, root="", max_pixels=max_pixels)
    if not path.is_dir():
        raise DataError(f"data not found: {spec} (a folder, a .txt list of paths, tar shards, or builtin:digits)")
    paths = cached_scan(path, "flat", IMAGE_EXTENSIONS, index_cache, lambda: walk_tree(path, IMAGE_EXTENSIONS)).paths
    if not paths:
        raise DataError(f"no image files under {path} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return FileSource(paths, root=str(path), max_pixels=max_pixels)


def check_same_classes(train, other, train_spec: str, other_spec: str, role: str) -> None:
    """Train and test (or val) must name the same classes, or label ``3`` would mean two things.

    Raises:
        DataError: the class names differ (which are missing where, in one line).
    """
    if list(train.classes) == list(other.classes):
        return
    only_other = sorted(set(other.classes) - set(train.classes))
    only_train = sorted(set(train.classes) - set(other.classes))
    problems = [f"{role} classes missing from train: {', '.join(only_other[:8])}" if only_other else "",
                f"train classes missing from {role}: {', '.join(only_train[:8])}" if only_train else ""]
    detail = "; ".join(problem for problem in problems if problem) or "the same names in another order"
    raise DataError(f"{other_spec} and {train_spec} have different classes ({detail})")


def check_readable(source: ImageSource, probe: int = 64) -> None:
    """Fail early, in one line, when none of the first ``probe`` images can be decoded."""
    reasons = []
    for index in range(min(probe, len(source))):
        try:
            source.load(index)
            return
        except UnreadableImage as error:
            reasons.append(f"{source.name(index)}: {error}")
    if len(source) <= probe:
        raise DataError(f"none of the {len(source)} files could be read as an image (first: {reasons[0]})")
    log.warning("the first %d files are all unreadable (first: %s)", probe, reasons[0])
