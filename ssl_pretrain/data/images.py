"""One image file (or in-memory image) -> an RGB PIL image, or ``UnreadableImage`` with the reason.

The decoding every source shares: Pillow's modes normalised to 8-bit RGB, EXIF rotation applied,
decompression bombs, truncated and empty files refused one file at a time.
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from typing import Protocol

import numpy as np
from PIL import Image, ImageFile, ImageOps

from ssl_pretrain.errors import SSLError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb threshold

# A truncated file must be reported, not silently padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class DataError(SSLError, ValueError):
    """A data source that cannot be used at all (missing, empty, nothing readable)."""


class UnreadableImage(Exception):
    """One file that cannot be decoded into an image; the message is the reason."""


class ImageSource(Protocol):
    def __len__(self) -> int: ...
    def load(self, index: int) -> Image.Image: ...
    def name(self, index: int) -> str: ...


# ---------------------------------------------------------------------------------------------
# Decoding one file


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB. 16-bit and float images are rescaled by their range."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        scaled = (array - low) * (255.0 / (high - low)) if high > low else np.zeros_like(array)
        image = Image.fromarray(scaled.round().astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")  # keeps palette transparency explicit before dropping it
    return image.convert("RGB")


def _decode(opened, max_pixels: int, min_side: int | None = None) -> Image.Image:
    """Decode an open image file (path or binary file object); errors are turned into
    ``UnreadableImage`` by the caller. ``min_side``: a JPEG may be decoded at 1/2, 1/4 or 1/8 of
    its size (DCT scaling, ``Image.draft``) as long as both sides stay at least this long."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow's bomb *warning*; we enforce our own limit
        with Image.open(opened) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise UnreadableImage(f"{width}x{height} exceeds {max_pixels} pixels")
            if width < 1 or height < 1:
                raise UnreadableImage(f"degenerate size {width}x{height}")
            if min_side and image.format == "JPEG":
                image.draft(image.mode, (min_side, min_side))
            image.load()
            image = ImageOps.exif_transpose(image)
            return to_rgb(image)


def _decode_or_explain(opened, max_pixels: int, min_side: int | None = None) -> Image.Image:
    try:
        return _decode(opened, max_pixels, min_side)
    except UnreadableImage:
        raise
    except Image.DecompressionBombError as error:
        raise UnreadableImage(f"decompression bomb: {error}") from None
    except Image.UnidentifiedImageError:
        raise UnreadableImage("not an image Pillow can identify") from None
    except Exception as error:  # noqa: BLE001 - any decoder failure on a malformed file
        # Pillow's plugins raise OSError, SyntaxError, ValueError, EOFError - and, on mutated
        # headers, TypeError, IndexError, struct.error... (a TIFF whose strip offsets are typed
        # RATIONAL: TypeError, found by the deep fuzz test). A file is unreadable, not fatal.
        raise UnreadableImage(f"{type(error).__name__}: {error}") from None


def load_image(path: str, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int | None = None) -> Image.Image:
    """Decode ``path`` into an RGB image, honouring EXIF rotation; ``min_side``: a JPEG may be
    decoded at reduced size while both sides stay at least this long (``_decode``).

    Raises:
        UnreadableImage: not a regular file, zero bytes, not an image, truncated, or more than
            ``max_pixels``.
    """
    try:
        status = os.stat(path)
    except OSError as error:
        raise UnreadableImage(f"{type(error).__name__}: {error}") from None
    if not stat.S_ISREG(status.st_mode):  # a FIFO would block the reader, /dev/zero never ends
        raise UnreadableImage("not a regular file (a FIFO, device or folder)")
    if status.st_size == 0:
        raise UnreadableImage("empty file (0 bytes)")
    return _decode_or_explain(path, max_pixels, min_side)


def decode_image_bytes(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int | None = None) -> Image.Image:
    """``load_image`` for an image held in memory (a tar member, a camera's JPEG): same checks,
    same RGB result; ``min_side`` lets a JPEG decode at reduced size (``_decode``).

    Raises:
        UnreadableImage: zero bytes, not an image, truncated, or more than ``max_pixels``.
    """
    if not data:
        raise UnreadableImage("empty member (0 bytes)")
    return _decode_or_explain(io.BytesIO(data), max_pixels, min_side)
