"""Fine-tuning's in-memory route: images decoded once, augmented a whole batch at a time."""

from __future__ import annotations

import numpy as np
import torch

from linear_probe.images import BalancedBatchSampler, augmented_batches, balanced_batches, load_pixels
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
    # 65 in batches of at most 32: three of 22, 22, 21, not 32 + 32 + a last batch of one
    # (BatchNorm in training mode), every image once
    assert [len(labels) for _, labels in first] == [22, 22, 21]
    assert sorted(torch.cat([labels for _, labels in first]).tolist()) == sorted(source.labels.tolist())
    for (images, labels), (images2, labels2) in zip(first, again):
        assert torch.equal(images, images2) and torch.equal(labels, labels2)
    assert not torch.equal(first[0][1], other[0][1])  # another epoch, another order
    assert first[0][0].shape == (22, 3, 16, 16)
    seen = torch.cat([labels for _, labels in first])
    assert sorted(seen.tolist()) != [] and set(seen.tolist()) <= set(source.labels.tolist())


def test_balanced_batches_cut_near_equal_parts_and_the_loader_uses_them():
    for n, size, expected in [(450, 64, [57, 57, 56, 56, 56, 56, 56, 56]), (128, 64, [64, 64]), (1, 64, [1]),
                              (65, 64, [33, 32]), (0, 64, [])]:
        parts = balanced_batches(torch.arange(n), size)
        assert [len(part) for part in parts] == expected
        assert torch.equal(torch.cat(parts) if parts else torch.arange(0), torch.arange(n))
    sampler = BalancedBatchSampler(450, 64, seed=0)
    epoch1, epoch2 = list(sampler), list(sampler)
    assert len(sampler) == 8 and [len(part) for part in epoch1] == [57, 57, 56, 56, 56, 56, 56, 56]
    assert sorted(sum(epoch1, [])) == list(range(450)) and epoch1 != epoch2  # reshuffled each epoch
    assert list(BalancedBatchSampler(450, 64, seed=0)) == epoch1  # fixed by the seed
