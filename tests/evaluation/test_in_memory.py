"""Fine-tuning's in-memory route: images decoded once, augmented a whole batch at a time."""

from __future__ import annotations

import numpy as np
import torch

from linear_probe.images import augmented_batches, load_pixels
from ssl_pretrain.data import SubsetSource, digits_source
from ssl_pretrain.augment.transforms import build_eval_transform

MEAN, STD = (0.25, 0.25, 0.25), (0.35, 0.35, 0.35)


def test_pixels_are_the_eval_transform_of_each_readable_image():
    source = SubsetSource(digits_source("train"), np.arange(40))
    transform = build_eval_transform(16, MEAN, STD)
    pixels = load_pixels(source, transform)
    assert pixels.pixels.shape == (40, 16, 16, 3) and pixels.pixels.dtype == torch.uint8
    assert torch.equal(pixels.labels, torch.as_tensor(source.labels))
    expected = torch.stack([transform(source.load(index)) for index in range(40)])
    torch.testing.assert_close(transform.normalise(pixels.pixels), expected, atol=1e-5, rtol=1e-5)
    assert load_pixels(source, transform, max_bytes=100) is None  # too large: the caller streams


def test_augmented_batches_are_seeded_labelled_and_cover_every_image_once():
    source = SubsetSource(digits_source("train"), np.arange(65))
    pixels = load_pixels(source, build_eval_transform(16, MEAN, STD))
    batches = augmented_batches(pixels, 16, MEAN, STD, batch_size=32, seed=3, hflip=False)
    first, again, other = list(batches(1)), list(batches(1)), list(batches(2))
    # 65 = 32 + 32 + 1: the last batch of one image is dropped (BatchNorm in training mode)
    assert [len(labels) for _, labels in first] == [32, 32]
    for (images, labels), (images2, labels2) in zip(first, again):
        assert torch.equal(images, images2) and torch.equal(labels, labels2)
    assert not torch.equal(first[0][1], other[0][1])  # another epoch, another order
    assert first[0][0].shape == (32, 3, 16, 16)
    seen = torch.cat([labels for _, labels in first])
    assert sorted(seen.tolist()) != [] and set(seen.tolist()) <= set(source.labels.tolist())
