"""The evaluation geometry, shared by every path that turns an image into a network input
(evaluation's ``EvalTransform``, the classifier's ``predict``, ``predict_frame`` and folder
predictions, int8 calibration), so that all of them see the same pixels.

Short side to ``size`` with antialiased bicubic resampling, then the centre ``size x size`` crop:
torchvision's ``Resize(size)`` + ``CenterCrop(size)`` geometry and rounding. The resampling is
torch's uint8 antialiased bicubic kernel, the one ``torchvision.transforms.v2.Resize`` runs on
uint8 tensors: it was written to match Pillow's and does to within 2 of 255 levels on under 1% of
the pixels (a test holds it to that), at a fraction of Pillow's time. It runs on the calling
thread only (no intra-op pool), so decoding threads can call it side by side.

``resize_pixels`` is that kernel alone, for the pixel cache's own framing (``fit_square``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def resized_shape(width: int, height: int, size: int) -> tuple[int, int]:
    """``(width, height)`` after the short side goes to ``size`` (torchvision's rounding)."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def resize_pixels(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """``(H, W, C)`` uint8 -> ``(height, width, C)`` uint8 with the antialiased bicubic uint8 kernel.

    The uint8 kernel is ``F.interpolate`` on a uint8 tensor; torchvision's functional ``resize``
    on a ``(C, H, W)`` uint8 tensor takes another route that lands up to ~20 levels off Pillow on
    fine detail (a test compares both to Pillow).
    """
    if pixels.shape[:2] == (height, width):
        return pixels
    # (1, C, H, W) over the (H, W, C) bytes: channels-last, the layout the uint8 kernel wants;
    # a writable copy, since torch refuses to wrap NumPy's read-only view of a PIL image
    tensor = torch.from_numpy(np.array(pixels, copy=not pixels.flags.writeable)).permute(2, 0, 1)[None]
    resized = F.interpolate(tensor, size=(height, width), mode="bicubic", antialias=True)
    return resized[0].permute(1, 2, 0).numpy()


def resize_and_crop(image: Image.Image | np.ndarray, size: int) -> np.ndarray:
    """A PIL image or uint8 array -> its ``(size, size[, C])`` uint8 centre crop after the short
    side goes to ``size``.

    Shape: ``(H, W, C)`` -> ``(size, size, C)``; ``(H, W)`` -> ``(size, size)``.
    """
    pixels = np.asarray(image, dtype=np.uint8)
    if pixels.ndim == 2:
        return resize_and_crop(pixels[:, :, None], size)[:, :, 0]
    height, width = pixels.shape[:2]
    new_width, new_height = resized_shape(width, height, size)
    pixels = resize_pixels(pixels, new_height, new_width)
    top = int(round((new_height - size) / 2.0))
    left = int(round((new_width - size) / 2.0))
    return pixels[top:top + size, left:left + size]
