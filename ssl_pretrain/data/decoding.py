"""Decoding a whole source into memory once: small images of one size become one uint8 array
that batch pipelines (the training loop's tensor pipeline, evaluation's feature extraction) read
without touching the files again.
"""

from __future__ import annotations

import logging

import numpy as np
from PIL import Image
from torch.utils.data import DataLoader
from tqdm import tqdm

from ssl_pretrain.data.images import ImageSource, UnreadableImage
from ssl_pretrain.data.sources import ArraySource
from ssl_pretrain.engine.devices import usable_cores

log = logging.getLogger(__name__)

TENSOR_PIPELINE_AUTO_BYTES = 2 * 2**30
"""``data.pipeline=auto`` decodes small images into memory up to this size (CIFAR-10: 150 MB; a
million 32 px images, 3 GB, stream from disk instead); evaluation holds its images up to it too."""
TENSOR_PIPELINE_MAX_BYTES = 8 * 2**30
"""``data.pipeline=tensor`` decodes into memory up to this size."""
IN_MEMORY_BYTES = TENSOR_PIPELINE_AUTO_BYTES
"""Small images of one size are decoded once into memory for feature extraction (evaluation, the
classifier, selection) up to this many bytes (CIFAR-10's 60,000 images: 184 MB): the limit of
``data.pipeline=auto`` in pretraining."""


def _decode_one(args: tuple[ImageSource, int, tuple[int, int], bool]):
    """``(index, pixels or None, reason or None)``; ``pixels`` is ``"size"`` when the image has
    another size and ``resize`` is off."""
    source, index, size, resize = args
    try:
        image = source.load(index)
    except UnreadableImage as error:
        return index, None, str(error)
    if image.size != size:
        if not resize:
            return index, "size", f"{image.size[0]}x{image.size[1]}"
        image = image.resize(size, Image.BICUBIC)
    return index, np.asarray(image, dtype=np.uint8), None


class _Decoder:
    """``index -> _decode_one(...)``, a map-style dataset for decoding in loader workers."""

    def __init__(self, source: ImageSource, size: tuple[int, int], resize: bool):
        self.source, self.size, self.resize = source, size, resize

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        return _decode_one((self.source, index, self.size, self.resize))


def _as_list(batch):
    return batch


PARALLEL_DECODE_FROM = 4096
"""Fewer images than this are decoded in the calling process (starting workers costs more)."""


def decode_workers(ranks_per_machine: int = 1) -> int:
    """Processes for decoding before training starts: this process's share of the cores it may
    use (nothing else runs yet), at most 8."""
    return max(1, min(8, usable_cores() // max(1, ranks_per_machine)))


def decode_all(source: ImageSource, size: tuple[int, int], progress: bool = True, workers: int = 0,
               resize: bool = True):
    """Decode every image of ``source`` into one uint8 array ``(N_ok, H, W, 3)``.

    Images of another size are resized to ``size`` (width, height); unreadable ones are left
    out. Done once a run (Pillow's open + load is most of the cost; BENCHMARKS.md, "Evaluation");
    ``workers`` > 1 spreads it over loader processes (in source order).

    Args:
        resize: off: an image of another size stops the decoding and the result is ``None``.

    Returns:
        ``(images, kept_indices, skipped)`` with ``skipped`` a list of ``(name, reason)``, or
        ``None`` (only with ``resize=False``).
    """
    if isinstance(source, ArraySource) and source.images.ndim == 4 and source.images.shape[1:3] == size[::-1]:
        return source.images, np.arange(len(source)), []
    images = np.empty((len(source), size[1], size[0], 3), dtype=np.uint8)
    ok = np.zeros(len(source), dtype=bool)
    skipped = []
    decoder = _Decoder(source, size, resize)
    if workers > 1 and len(source) >= PARALLEL_DECODE_FROM:
        loader = DataLoader(decoder, batch_size=256, num_workers=workers, collate_fn=_as_list)
        batches = iter(loader)
    else:
        batches = (decoder[index] for index in range(len(source)))
        batches = ([item] for item in batches)
    bar = tqdm(total=len(source), desc="decoding", unit="img", disable=not progress, leave=False)
    try:
        for batch in batches:
            for index, pixels, reason in batch:
                if isinstance(pixels, str):
                    log.info("%s is %s, not %dx%d like the others", source.name(index), reason, *size)
                    return None
                if pixels is None:
                    skipped.append((source.name(index), reason))
                else:
                    images[index], ok[index] = pixels, True
            bar.update(len(batch))
    finally:
        bar.close()
        del batches  # stops the loader's workers at once when decoding ended early
    kept = np.flatnonzero(ok)
    return (images[kept] if len(kept) < len(source) else images), kept, skipped


def common_small_size(source: ImageSource, limit: int = 64, probe: int = 32) -> tuple[int, int] | None:
    """The shared (width, height) of the first decodable images, if all agree and are <= ``limit``."""
    sizes = set()
    for index in range(min(probe, len(source))):
        try:
            sizes.add(source.load(index).size)
        except UnreadableImage:
            continue
    if len(sizes) != 1:
        return None
    size = sizes.pop()
    return size if max(size) <= limit else None


class DecodedSource:
    """Another source decoded once into memory, on first use: ``load`` then serves PIL images
    from a uint8 array and ``decoded()`` hands batch pipelines the array itself.

    For evaluations that embed the same images several times (the pretrained backbone, a random
    one, raw pixels) or that are limited by JPEG decoding: each file is read and decoded once.
    Only images that all share one size are held (``decoded()`` is ``None`` otherwise, and every
    call goes to the wrapped source); unreadable files keep their reason and raise it on ``load``.

    Args:
        source: any image source (``len``, ``load``, ``name``, optional ``labels``/``classes``).
        size: ``(width, height)`` the images are expected to have (``common_small_size``).
        workers: decoding processes (``decode_all``).
    """

    def __init__(self, source: ImageSource, size: tuple[int, int], workers: int = 0):
        self.source, self.size, self.workers = source, tuple(size), workers
        self.labels = getattr(source, "labels", None)
        self.classes = list(getattr(source, "classes", []))
        self._decoded: tuple[np.ndarray, np.ndarray, list[tuple[str, str]]] | None = None
        self._rows: np.ndarray | None = None  # index -> row of the array, -1 when unreadable
        self._reasons: dict[int, str] = {}
        self._tried = False

    def __len__(self) -> int:
        return len(self.source)

    def name(self, index: int) -> str:
        return self.source.name(index)

    def decoded(self) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]] | None:
        """``decode_all``'s ``(images (N_ok, H, W, 3) uint8, kept indices, skipped (name, reason))``,
        decoding on the first call; ``None`` when the images do not all have ``size``."""
        if not self._tried:
            self._tried = True
            self._decoded = decode_all(self.source, self.size, progress=False, workers=self.workers, resize=False)
            if self._decoded is None:
                log.info("images of several sizes: decoded as they are needed, not held in memory")
            else:
                _, kept, skipped = self._decoded
                self._rows = np.full(len(self.source), -1, dtype=np.int64)
                self._rows[kept] = np.arange(len(kept))
                # skipped is in source order, as are the indices that were not kept
                missing = np.flatnonzero(self._rows < 0)
                self._reasons = {int(index): reason for index, (_, reason) in zip(missing, skipped)}
        return self._decoded

    def load(self, index: int) -> Image.Image:
        if self.decoded() is None:
            return self.source.load(index)
        if self._rows[index] < 0:
            raise UnreadableImage(self._reasons[index])
        return Image.fromarray(self._decoded[0][self._rows[index]])


def decoded_in_memory(source):
    """``source`` as a ``DecodedSource`` when its images are small (up to 64 px) and of one size,
    and all of them fit in ``IN_MEMORY_BYTES``; else ``source`` itself."""
    size = common_small_size(source)
    if size is None or len(source) * size[0] * size[1] * 3 > IN_MEMORY_BYTES:
        return source
    return DecodedSource(source, size, workers=decode_workers())
