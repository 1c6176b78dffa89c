"""Test images that are copies of training images: counted, warned about and recorded in
``results.json["leaks"]``, because each one inflates every figure measured on the test set.

Two kinds of copy are counted as leaks:

- **exact**: a test file with the same bytes as a training file (SHA-256; only files whose size a
  test file shares are read), or, for in-memory sources such as the built-in digits, the same
  pixel array;
- **near**: a test image whose most similar training image has cosine similarity >= 0.99 in the
  pretrained (ssl) features *and* whose pixels, both images at 32 x 32 with each image's mean
  removed, correlate >= 0.95 with it: the same picture re-encoded, resized or slightly retouched.

Why both conditions. With a well-trained backbone, test images at >= 0.99 in ssl features are,
looked at side by side, nearly all the same photograph. But a weak backbone (the README's short
digits demo) puts most test images that close to some training image, distinct handwritten
digits among them, and a pixel check alone cannot tell either: distinct 8 x 8 digits can
correlate almost perfectly. Requiring both keeps the warning for copies, and the count at
ssl >= 0.99 alone is recorded as ``similar_in_features`` for a closer look with ``ssl-dedup``
(the counts: BENCHMARKS.md, "Selection and duplicates"). Mirrored or cropped copies are
therefore not counted: the figure is a lower bound.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from linear_probe.embeddings import Embeddings
from ssl_curate.duplicates import DEFAULT_THRESHOLD, file_digest, find_leaks
from ssl_pretrain.data import ArraySource, FileSource, SubsetSource, UnreadableImage

PIXEL_CORRELATION = 0.95
"""Centred pixel correlation (32 x 32) a feature-space neighbour must also reach to count."""
PIXEL_SIZE = 32
RECORDED_PAIRS = 100
"""Leaked pairs listed in results.json at most (the counts cover all of them)."""


@dataclass
class LeakCheck:
    """What ``check_leaks`` found; ``to_dict`` is ``results.json["leaks"]``."""

    n_test: int
    n_train: int
    exact: int = 0
    near: int = 0
    similar_in_features: int = 0
    pairs: list[dict[str, Any]] = field(default_factory=list)
    threshold: float = DEFAULT_THRESHOLD
    pixel_correlation: float = PIXEL_CORRELATION

    @property
    def leaked(self) -> int:
        """Test images with an exact or near copy among the training images."""
        return self.exact + self.near

    def to_dict(self) -> dict[str, Any]:
        return {"checked": True, "leaked": self.leaked, "fraction": self.leaked / max(self.n_test, 1),
                "exact": self.exact, "near": self.near, "similar_in_features": self.similar_in_features,
                "n_test": self.n_test, "n_train": self.n_train, "features": "ssl",
                "threshold": self.threshold, "pixel_correlation": self.pixel_correlation,
                "pairs": self.pairs[:RECORDED_PAIRS]}

    def warning(self) -> str | None:
        """One line for the log when some test images leak, else None."""
        if not self.leaked:
            return None
        return (f"{self.leaked} of {self.n_test} test images ({100 * self.leaked / max(self.n_test, 1):.1f}%) are "
                f"copies of training images ({self.exact} exact, {self.near} near: ssl cosine >= {self.threshold} "
                f"and pixel correlation >= {self.pixel_correlation}); they inflate every test figure - "
                f"the pairs are in results.json['leaks'], and ssl-dedup shows them")


def _content_key(images: SubsetSource, position: int, sizes: set[int] | None) -> tuple[str | None, int | None]:
    """``(digest, file size)`` of one image: SHA-256 of the file's bytes, or of the pixel array for
    an in-memory source; no digest for a file whose size is not in ``sizes`` (when given), an
    empty or unreadable file, or a source of another kind."""
    source, row = images.source, int(images.indices[position])
    if isinstance(source, ArraySource):
        image = np.ascontiguousarray(source.images[row])
        return hashlib.sha256(str(image.shape).encode() + image.tobytes()).hexdigest(), None
    if not isinstance(source, FileSource):
        return None, None
    try:
        size = os.stat(source.paths[row]).st_size
        if size == 0 or (sizes is not None and size not in sizes):
            return None, size
        return file_digest(source.paths[row]), size
    except OSError:
        return None, None


def exact_copies(train: list[SubsetSource], test: SubsetSource) -> dict[int, tuple[int, int]]:
    """``test position -> (training set number, position in it)`` of the test images whose file
    bytes (or pixel array, for in-memory sources) equal a training image's. Training files are
    hashed only when a test file has their size; unreadable files are left out (their error is
    reported where the images are embedded)."""
    test_by_digest: dict[str, list[int]] = {}
    sizes: set[int] = set()
    for position in range(len(test)):
        digest, size = _content_key(test, position, None)
        if digest is not None:
            test_by_digest.setdefault(digest, []).append(position)
            if size is not None:
                sizes.add(size)
    found: dict[int, tuple[int, int]] = {}
    for set_number, images in enumerate(train):
        if not test_by_digest:
            break
        for position in range(len(images)):
            digest, _ = _content_key(images, position, sizes)
            for test_position in test_by_digest.get(digest, []) if digest is not None else []:
                found.setdefault(test_position, (set_number, position))
    return found


def pixel_correlation(a: Image.Image, b: Image.Image, size: int = PIXEL_SIZE) -> float:
    """Pearson correlation of two images' RGB pixels (each image's mean removed), both resized to
    ``size`` px or to the smaller image's size if that is less: upsampling would smooth away the
    differences (distinct 8 x 8 digits correlate far higher once blown up to 32 x 32)."""
    side = min(size, *a.size, *b.size)

    def vector(image: Image.Image) -> np.ndarray:
        image = image.convert("RGB")
        if image.size != (side, side):
            image = image.resize((side, side), Image.BILINEAR)
        values = np.asarray(image, dtype=np.float64).ravel()
        return values - values.mean()

    x, y = vector(a), vector(b)
    norm = np.linalg.norm(x) * np.linalg.norm(y)
    return float(x @ y / norm) if norm > 0 else float(np.array_equal(x, y))


def check_leaks(train: list[tuple[SubsetSource, Embeddings]], test: tuple[SubsetSource, Embeddings],
                threshold: float = DEFAULT_THRESHOLD, min_pixel_correlation: float = PIXEL_CORRELATION) -> LeakCheck:
    """Count the test images that are exact or near copies of training images.

    Args:
        train: the training images (the labelled pool, the validation images) with their ssl
            embeddings (rows of readable images; ``Embeddings.indices`` are positions in the
            source of the subset).
        test: the test images and their ssl embeddings.
        threshold: cosine similarity in ssl features a near copy must reach.
        min_pixel_correlation: and its centred pixel correlation.
    """
    test_images, test_embeddings = test
    train_features = [embeddings.features for _, embeddings in train]
    n_train = sum(len(features) for features in train_features)
    check = LeakCheck(len(test_embeddings), n_train, threshold=threshold, pixel_correlation=min_pixel_correlation)
    if n_train == 0 or len(test_embeddings) == 0:
        return check
    # Rows of the embeddings -> (training set, position in it), to load the images and name them.
    test_position = _positions(test_images, test_embeddings)
    train_rows = [(images, int(position)) for images, embeddings in train
                  for position in _positions(images, embeddings)]
    stacked = np.concatenate([np.asarray(features, dtype=np.float32) for features in train_features])

    exact = exact_copies([images for images, _ in train], test_images)
    recorded: set[int] = set()
    for position, (set_number, train_position) in sorted(exact.items()):
        images = train[set_number][0]
        check.pairs.append({"test": test_images.name(position), "train": images.name(train_position),
                            "exact": True, "similarity": None, "pixel_correlation": 1.0})
        recorded.add(position)
    check.exact = len(exact)

    report = find_leaks(stacked, test_embeddings.features, threshold)
    check.similar_in_features = report.count
    for test_row, train_row, similarity in report.pairs:
        position = int(test_position[test_row])
        if position in recorded:
            continue
        images, train_position = train_rows[train_row]
        try:
            correlation = pixel_correlation(test_images.load(position), images.load(train_position))
        except UnreadableImage:
            continue
        if correlation >= min_pixel_correlation:
            check.near += 1
            recorded.add(position)
            check.pairs.append({"test": test_images.name(position), "train": images.name(train_position),
                                "exact": False, "similarity": round(float(similarity), 6),
                                "pixel_correlation": round(correlation, 6)})
    return check


def _positions(images: SubsetSource, embeddings: Embeddings) -> np.ndarray:
    """Position in ``images`` of each embeddings row (rows carry positions in the base source)."""
    where = {int(index): position for position, index in enumerate(images.indices)}
    return np.array([where[int(index)] for index in embeddings.indices], dtype=np.int64)
