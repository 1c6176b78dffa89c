"""Any image -> the classifier's input.

Decoding (reduced-size JPEG decoding for camera frames) is Pillow's; the geometry is
``ssl_pretrain.data.resize.resize_and_crop``, the one evaluation's ``EvalTransform`` uses, so a
prediction sees the pixels evaluation saw (a test checks that both give the same input).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ssl_pretrain.data import DEFAULT_MAX_PIXELS, UnreadableImage, load_image, to_rgb
from ssl_pretrain.data.images import decode_image_bytes
from ssl_pretrain.data.resize import resize_and_crop


def to_input(image: Image.Image, size: int) -> np.ndarray:
    """An RGB PIL image -> ``(3, size, size)`` float32 in [0, 1]."""
    pixels = resize_and_crop(image, size)
    return pixels.transpose(2, 0, 1).astype(np.float32) * np.float32(1.0 / 255.0)


def as_pil(item: Any, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int | None = None) -> Image.Image:
    """A path, encoded image bytes (a JPEG from a camera), a PIL image, a NumPy array
    ``(H, W[, C])`` or a tensor ``(C, H, W)`` -> RGB PIL.

    Arrays and tensors of integers are read as 0-255, of floats as 0-1. ``min_side``: a JPEG
    (file or bytes) is decoded at reduced size (DCT scaling) while both sides stay at least this long.

    Raises:
        UnreadableImage: a file or bytes that cannot be decoded, or an array of an unusable shape.
    """
    if isinstance(item, (str, Path)):
        return load_image(str(item), max_pixels, min_side)
    if isinstance(item, (bytes, bytearray, memoryview)):
        return decode_image_bytes(bytes(item), max_pixels, min_side)
    if isinstance(item, Image.Image):
        return to_rgb(item)
    if hasattr(item, "detach"):  # a torch tensor, channels first
        item = item.detach().cpu().numpy()
        if item.ndim == 3 and item.shape[0] in (1, 3, 4):
            item = item.transpose(1, 2, 0)
    array = np.asarray(item)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise UnreadableImage(f"an array of shape {array.shape} is not an image (H, W[, 3]) or (3, H, W)")
    if array.dtype.kind == "f":
        array = np.clip(array * 255.0, 0, 255).round()
    return to_rgb(Image.fromarray(array.astype(np.uint8)))
