"""Sources -> batches of two views, reproducibly and without crashing on bad files.

Every sample is augmented under its own seed, derived from ``(run seed, epoch, index)``. That
makes a batch the same whatever the number of data-loader workers, and lets a resumed run pick
up mid-epoch with bit-identical data: nothing depends on hidden RNG state in worker processes.
"""

from __future__ import annotations

import random
from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ssl_pretrain.augment.batch_transforms import batch_views
from ssl_pretrain.data.images import ImageSource, UnreadableImage
from ssl_pretrain.engine.devices import usable_cores


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample in one epoch (SplitMix-style mixing of the three)."""
    value = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB)
    value &= (1 << 64) - 1
    value ^= value >> 31
    return value & ((1 << 63) - 1)


def seed_everything(seed: int) -> None:
    """Seed torch, NumPy and Python ``random`` (lightly's blur draws from NumPy)."""
    torch.manual_seed(seed)
    np.random.seed(seed % (1 << 32))
    random.seed(seed)


class TwoViewDataset(Dataset):
    """Yields ``(view_a, view_b)`` for ``(epoch, index)`` keys, or a skip record for bad files."""

    def __init__(self, source: ImageSource, transform, seed: int):
        self.source = source
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        try:
            image = self.source.load(index)
        except UnreadableImage as error:
            return {"skipped": self.source.name(index), "reason": str(error)}
        seed_everything(sample_seed(self.seed, epoch, index))
        view_a, view_b = self.transform(image)
        return view_a, view_b


def collate_views(samples: list) -> dict:
    """Stack the good samples; pass bad ones through as ``skipped`` ``(name, reason)`` pairs.

    Returns:
        ``{"views": (Tensor (B, 3, H, W), Tensor (B, 3, H, W)) or None, "skipped": [...]}``
    """
    good = [sample for sample in samples if not isinstance(sample, dict)]
    skipped = [(s["skipped"], s["reason"]) for s in samples if isinstance(s, dict)]
    views = None
    if good:
        views = (torch.stack([a for a, _ in good]), torch.stack([b for _, b in good]))
    return {"views": views, "skipped": skipped}


def epoch_batches(num_samples: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The shuffled full batches of one epoch (last partial batch dropped), fixed by seed+epoch."""
    generator = torch.Generator().manual_seed(sample_seed(seed, epoch, -1))
    order = torch.randperm(num_samples, generator=generator).tolist()
    count = num_samples // batch_size
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(count)]


class EpochBatchSampler(Sampler):
    """Batches of ``(epoch, index)`` keys for one epoch, optionally starting at a given step.

    ``batch_size`` is the global batch. In a distributed run each rank yields its own slice of
    every global batch (``batch_size / world_size`` keys), so the ranks together see exactly the
    batches of a single-process run, and a resumed run - with any number of ranks - continues
    with the same ones.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} is not divisible by the {world_size} ranks")
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start_step = 0, 0

    @property
    def local_batch_size(self) -> int:
        return self.batch_size // self.world_size

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        return self.num_samples // self.batch_size - self.start_step

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        batches = epoch_batches(self.num_samples, self.batch_size, self.seed, self.epoch)
        local = self.local_batch_size
        for batch in batches[self.start_step :]:
            yield [(self.epoch, index) for index in batch[self.rank * local : (self.rank + 1) * local]]


def worker_count(setting, num_samples: Optional[int] = None) -> int:
    """``auto``: one worker per core beyond the one that trains, at most 8; none for tiny data."""
    if setting != "auto":
        return int(setting)
    cores = usable_cores()
    if num_samples is not None and num_samples < 4096:
        return 0  # worker start-up costs more than augmenting a few thousand small images
    return max(0, min(8, cores - 1))


class TensorBatches:
    """Batches of two views (and any multi-crop local views) cut from images held in memory as one
    uint8 tensor ``(N, H, W, 3)``.

    Yields the same ``{"views", "skipped"}`` records as the data loader of ``TwoViewDataset``,
    with the views on ``device`` (default: the images' device; images too large for a GPU stay
    on the CPU, memory-mapped, and each batch is gathered there and moved). The batch order comes
    from the same ``EpochBatchSampler``; the augmentation is seeded per (seed, epoch, step).
    """

    def __init__(self, images: torch.Tensor, augment, sampler: EpochBatchSampler, seed: int,
                 skipped: Optional[list] = None, local_augment=None, local_views: int = 0,
                 device: Optional[torch.device] = None):
        self.images, self.augment, self.sampler, self.seed = images, augment, sampler, seed
        self.skipped = list(skipped or [])
        self.local_augment, self.local_views = local_augment, local_views  # multi-crop
        self.device = images.device if device is None else torch.device(device)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        for offset, keys in enumerate(self.sampler):
            step = self.sampler.start_step + offset
            indices = torch.tensor([index for _, index in keys], device=self.images.device)
            seed = sample_seed(self.seed, self.sampler.epoch, -2 - step)
            if self.sampler.rank:  # each rank augments its own slice of the global batch
                seed = sample_seed(seed, self.sampler.rank, -1)
            batch = self.images[indices]
            if batch.device != self.device:
                batch = batch.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" \
                    else batch.to(self.device)
            views = batch_views(batch, self.augment, seed, self.local_augment, self.local_views)
            yield {"views": views, "skipped": self.skipped if offset == 0 else []}
