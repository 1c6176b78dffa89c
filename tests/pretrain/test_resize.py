"""The shared evaluation geometry (``resize_and_crop``): torchvision's geometry, and pixels within
2 levels of Pillow's bicubic resampling (what ``torchvision.transforms.Resize`` does on a PIL image)."""

import numpy as np
import pytest
import torchvision.transforms as T
from PIL import Image
from sklearn.datasets import load_digits

from ssl_pretrain.data.pixel_cache import fit_square
from ssl_pretrain.data.resize import resize_and_crop


def pillow_reference(image: Image.Image, size: int) -> np.ndarray:
    geometry = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size)])
    return np.asarray(geometry(image), dtype=np.int16)


def photo_like(width: int, height: int) -> Image.Image:
    """Smooth colour fields with edges: upsampled noise, the texture of a photo more than noise is."""
    noise = np.random.default_rng(width * 7919 + height).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    return Image.fromarray(noise).resize((width, height), Image.NEAREST).resize((width, height), Image.BOX)


@pytest.mark.parametrize("width, height", [(640, 480), (320, 240), (1600, 1200), (224, 500), (300, 225),
                                           (64, 64), (32, 32), (8, 8), (37, 100), (223, 223), (1, 40)])
def test_within_two_levels_of_pillow_on_under_one_percent_of_pixels(width, height):
    image = photo_like(width, height)
    ours, reference = resize_and_crop(image, 224).astype(np.int16), pillow_reference(image, 224)
    assert ours.shape == reference.shape == (224, 224, 3)
    assert np.abs(ours - reference).max() <= 2
    assert (ours != reference).mean() < 0.01


def test_real_digits_upscaled_like_pillow():
    digits = load_digits().images[:50]
    for digit in digits:
        image = Image.fromarray((digit * 255 / 16).astype(np.uint8)).convert("RGB")
        ours, reference = resize_and_crop(image, 32).astype(np.int16), pillow_reference(image, 32)
        assert np.abs(ours - reference).max() <= 2 and (ours != reference).mean() < 0.01


def test_geometry_follows_torchvision_rounding_and_modes():
    # 31 x 57 -> short side 24: 24 x 44 (int(24 * 57 / 31)), crop rows 10..34 (round((44 - 24) / 2))
    image = Image.fromarray(np.tile(np.arange(57, dtype=np.uint8)[:, None, None] * 4, (1, 31, 3)))
    ours = resize_and_crop(image, 24)
    reference = pillow_reference(image, 24)
    assert np.abs(ours.astype(np.int16) - reference).max() <= 2
    assert resize_and_crop(Image.new("L", (40, 30), 128), 24).shape == (24, 24)
    assert resize_and_crop(Image.new("RGBA", (40, 30)), 24).shape == (24, 24, 4)
    same = np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    np.testing.assert_array_equal(resize_and_crop(same, 24), same)  # the input size: untouched


@pytest.mark.parametrize("width, height, side", [(240, 240, 224), (100, 100, 256), (500, 380, 256), (64, 80, 73)])
def test_the_pixel_cache_resizes_with_the_same_kernel(width, height, side):
    """``fit_square`` (the pixel cache's centre square) on fine detail: noise, where torchvision's
    functional resize of a (C, H, W) uint8 tensor strays ~20 levels from Pillow."""
    noise = np.random.default_rng(width + height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    short = min(width, height)
    top, left = (height - short) // 2, (width - short) // 2
    square = Image.fromarray(noise[top:top + short, left:left + short])
    reference = np.asarray(square.resize((side, side), Image.BICUBIC), dtype=np.int16)
    ours = fit_square(Image.fromarray(noise), side)
    assert ours.shape == (side, side, 3) and ours.dtype == np.uint8 and ours.flags.c_contiguous
    assert np.abs(ours.astype(np.int16) - reference).max() <= 2
