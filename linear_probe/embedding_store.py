"""An embeddings set in memory (``Embeddings``) and on disk (``save_embeddings`` / ``load_embeddings``).

On disk an embeddings set ``NAME.npy`` is the ``(N, D)`` float32 features alone (``np.save``), so
that a million 512-d features (2 GB) are memory-mapped when loaded (``mmap_mode="r"``), not read;
beside it ``NAME.labels.npy`` and ``NAME.indices.npy`` (int64) and ``NAME.json`` (names, skipped
images, classes, the features' shape). Every file is written atomically, the JSON last, so a set
without its JSON is incomplete and a cache miss. Nothing is read with pickle, so loading runs no
code. A single ``.npz`` (the format of earlier versions, and handy for bringing your own
embeddings) is still read and written, but is loaded into memory.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from linear_probe.errors import EvaluationError
from ssl_pretrain.checkpoint import atomic_write

STORE_FORMAT = "linear_probe/embeddings-v1"
"""``format`` of the JSON beside a ``.npy`` embeddings set."""


@dataclass
class Embeddings:
    """Features of some images of a source, one row per readable image.

    Attributes:
        features: ``(N, D)`` float32 backbone outputs; may be a read-only ``np.memmap`` (from
            ``load_embeddings``), so code downstream must not write into it.
        labels: ``(N,)`` int64 classes, or None for an unlabelled source.
        names: ``N`` image names (relative paths for folders).
        skipped: ``(name, reason)`` of every image that could not be read.
        indices: ``(N,)`` position of each row in its source (default ``0..N-1``).
        classes: class names, when known.
    """

    features: np.ndarray
    labels: np.ndarray | None
    names: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    indices: np.ndarray | None = None
    classes: list[str] = field(default_factory=list)

    def __post_init__(self):
        features = self.features
        if not (isinstance(features, np.ndarray) and features.dtype == np.float32 and features.flags.c_contiguous):
            features = np.ascontiguousarray(features, dtype=np.float32)
        self.features = features  # a float32 memory map stays one: nothing is read here
        if self.features.ndim != 2:
            raise EvaluationError(f"features must be a 2-D array (images x dims), got shape {self.features.shape}")
        count = len(self.features)
        if self.indices is None:
            self.indices = np.arange(count, dtype=np.int64)
        self.indices = np.asarray(self.indices, dtype=np.int64)
        if self.labels is not None:
            self.labels = np.asarray(self.labels).astype(np.int64)
        lengths = {"features": count, "names": len(self.names), "indices": len(self.indices)}
        if self.labels is not None:
            lengths["labels"] = len(self.labels)
        if len(set(lengths.values())) > 1:
            raise EvaluationError(
                "mismatched lengths: " + ", ".join(f"{len_} {key}" for key, len_ in lengths.items())
            )

    def __len__(self) -> int:
        return len(self.features)

    def take(self, source_indices: np.ndarray) -> Embeddings:
        """The rows of the given source positions, in that order; unreadable images drop out."""
        wanted = np.asarray(source_indices, dtype=np.int64)
        if len(self) == 0:
            return Embeddings(self.features[:0], None if self.labels is None else self.labels[:0], [],
                              indices=self.indices[:0], classes=self.classes)
        order = np.argsort(self.indices, kind="stable")  # already sorted when extracted here
        positions = np.searchsorted(self.indices[order], wanted).clip(max=len(self) - 1)
        present = self.indices[order][positions] == wanted
        rows = order[positions[present]]
        return Embeddings(
            _rows(self.features, rows), None if self.labels is None else self.labels[rows],
            [self.names[row] for row in rows], [], self.indices[rows], self.classes,
        )


def _rows(features: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``features[rows]``, as a view (of a memory map: nothing read) when the rows are one run."""
    if len(rows) and rows[-1] - rows[0] == len(rows) - 1 and (np.diff(rows) == 1).all():
        return features[rows[0] : rows[-1] + 1]
    return features[rows]


# ---------------------------------------------------------------------------------------------
# Extraction


def side_paths(path: Path) -> dict[str, Path]:
    """The files of the ``.npy`` embeddings set whose features are ``path``."""
    stem = path.with_suffix("")
    return {"labels": stem.with_name(stem.name + ".labels.npy"),
            "indices": stem.with_name(stem.name + ".indices.npy"), "meta": path.with_suffix(".json")}


def save_embeddings(path: str | Path, embeddings: Embeddings) -> None:
    """Write embeddings atomically, without pickle: ``.npy`` (features; labels, indices and a
    JSON beside it, the JSON last) or one ``.npz`` (loaded into memory when read back).

    Raises:
        EvaluationError: a file name that ends neither in ``.npy`` nor in ``.npz``.
        CheckpointError: the disk refused; a ``.npz`` stays as it was, a ``.npy`` set reads as
            incomplete (an error, a cache miss) until it is saved again.
    """
    path = Path(path)
    if path.suffix == ".npz":
        _save_npz(path, embeddings)
        return
    if path.suffix != ".npy":
        raise EvaluationError(f"embeddings file must end in .npy or .npz, got {path.name}")
    sides = side_paths(path)
    # Until the new JSON is in place the set reads as incomplete, never as old and new files mixed.
    sides["meta"].unlink(missing_ok=True)
    atomic_write(path, lambda file: np.save(file, embeddings.features, allow_pickle=False))
    if embeddings.labels is not None:
        atomic_write(sides["labels"], lambda file: np.save(file, embeddings.labels, allow_pickle=False))
    else:
        sides["labels"].unlink(missing_ok=True)
    atomic_write(sides["indices"], lambda file: np.save(file, embeddings.indices, allow_pickle=False))
    meta = {
        "format": STORE_FORMAT,
        "shape": list(embeddings.features.shape),
        "labels": embeddings.labels is not None,
        "names": embeddings.names,
        "skipped": [list(pair) for pair in embeddings.skipped],
        "classes": embeddings.classes,
    }
    # ensure_ascii: a file name that is not UTF-8 (a lone surrogate here) is written escaped.
    atomic_write(sides["meta"], lambda file: file.write(json.dumps(meta).encode("ascii")))


def _save_npz(path: Path, embeddings: Embeddings) -> None:
    arrays = {
        "features": embeddings.features,
        "names": np.asarray(embeddings.names, dtype=str),
        "indices": embeddings.indices,
        "skipped_names": np.asarray([name for name, _ in embeddings.skipped], dtype=str),
        "skipped_reasons": np.asarray([reason for _, reason in embeddings.skipped], dtype=str),
        "classes": np.asarray(embeddings.classes, dtype=str),
    }
    if embeddings.labels is not None:
        arrays["labels"] = embeddings.labels
    atomic_write(path, lambda file: np.savez(file, **arrays))


def load_embeddings(path: str | Path) -> Embeddings:
    """Read embeddings: a ``.npy`` set (features memory-mapped read-only, with labels, indices,
    names... from the files beside it when they exist; a lone ``.npy`` holds features only), its
    ``.json``, or a ``.npz`` holding ``features`` (or ``embeddings``) and optionally ``labels``,
    ``names``, ``indices``, ``classes``.

    Raises:
        EvaluationError: missing or unreadable file, no features, or arrays of different lengths.
    """
    path = Path(path)
    if path.suffix == ".json":
        path = path.with_suffix(".npy")
    if not path.is_file():
        raise EvaluationError(f"embeddings file not found: {path}")
    try:
        arrays = _read_npz(path) if path.suffix == ".npz" else _read_npy_set(path)
    except (ValueError, OSError, EOFError, KeyError, TypeError, AttributeError, zipfile.BadZipFile) as error:
        detail = (str(error).splitlines() or [type(error).__name__])[0]
        raise EvaluationError(f"{path} is not a readable .npy/.npz embeddings file: {detail}") from None
    features = arrays.get("features", arrays.get("embeddings"))
    if features is None:
        raise EvaluationError(f"{path} has no 'features' array (found: {', '.join(arrays) or 'nothing'})")
    names = arrays.get("names")
    try:
        return Embeddings(
            features=features,
            labels=arrays.get("labels"),
            names=[str(name) for name in names] if names is not None else [str(i) for i in range(len(features))],
            skipped=[(str(name), str(reason)) for name, reason in
                     zip(arrays.get("skipped_names", []), arrays.get("skipped_reasons", []))],
            indices=arrays.get("indices"),
            classes=[str(name) for name in arrays.get("classes", [])],
        )
    except EvaluationError as error:
        raise EvaluationError(f"{path}: {error}") from None


def _read_npz(path: Path) -> dict:
    loaded = np.load(path, allow_pickle=False)
    if isinstance(loaded, np.ndarray):  # a .npy under another name
        return {"features": loaded}
    with loaded:
        return dict(loaded.items())


def _read_npy_set(path: Path) -> dict:
    """The arrays of a ``.npy`` set, features memory-mapped (``np.load`` cannot map a 0-row file).

    Raises:
        ValueError: a set without its JSON, or a JSON that does not describe the features.
    """
    try:
        features = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError:
        features = np.load(path, allow_pickle=False)  # still refuses pickled objects
    if not isinstance(features, np.ndarray):  # a .npz under another name
        features.close()
        return _read_npz(path)
    sides = side_paths(path)
    if not sides["meta"].is_file():
        if sides["indices"].is_file():
            raise ValueError(f"incomplete set: no {sides['meta'].name} (an interrupted save?)")
        return {"features": features}
    meta = json.loads(sides["meta"].read_text(encoding="ascii"))
    if meta.get("format") != STORE_FORMAT:
        raise ValueError(f"{sides['meta'].name} is not an embeddings description (format {meta.get('format')!r})")
    if list(features.shape) != meta["shape"]:
        raise ValueError(f"features of shape {list(features.shape)}, but {sides['meta'].name} says {meta['shape']}")
    arrays = {"features": features, "names": meta["names"], "classes": meta["classes"],
              "indices": np.load(sides["indices"], allow_pickle=False),
              "skipped_names": [name for name, _ in meta["skipped"]],
              "skipped_reasons": [reason for _, reason in meta["skipped"]]}
    if meta["labels"]:
        arrays["labels"] = np.load(sides["labels"], allow_pickle=False)
    return arrays


# ---------------------------------------------------------------------------------------------
# Fingerprints and the cache
