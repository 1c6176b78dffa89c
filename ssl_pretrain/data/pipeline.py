"""The data pipeline a pretraining run reads: which images (``open_training_source``) and how they
become batches of views (``build_loader``): small images of one size decoded once into memory and
augmented in whole batches on the training device, anything else through a PIL ``DataLoader``.

``cfg`` here is the run's ``ssl_pretrain.config.Config`` (its ``data``, ``augment`` and ``train``
sections are read).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import DataLoader

from ssl_pretrain.augment.batch_transforms import build_batch_augment, is_grey
from ssl_pretrain.augment.transforms import build_view_transform
from ssl_pretrain.data.dataset import EpochBatchSampler, TensorBatches, TwoViewDataset, collate_views, worker_count
from ssl_pretrain.data.decoding import (TENSOR_PIPELINE_AUTO_BYTES, TENSOR_PIPELINE_MAX_BYTES, common_small_size,
                                        decode_all, decode_workers)
from ssl_pretrain.data.images import DataError
from ssl_pretrain.data.sources import check_readable, open_source, random_subset
from ssl_pretrain.engine.distributed import DistInfo, main_first
from ssl_pretrain.settings import ConfigError

log = logging.getLogger("ssl_pretrain")

FILE_INDEX = "file_index.txt"
"""The run folder's cached file list (or shard member offsets) of ``data.source``."""


def open_training_source(cfg, run_path: Path, dist_info: DistInfo = DistInfo()):
    """``data.source`` opened, cut to ``data.max_images`` and checked: at least one readable
    image and one batch's worth of files.

    The file list (or the shards' member offsets) is kept in the run folder: a resumed or repeated
    run over a million files stats its folders instead of walking them. Rank 0 writes it, the
    other ranks read it.

    Raises:
        DataError: nothing readable, or fewer images than one batch.
    """
    def open_data():
        return open_source(cfg.data.source, download=cfg.data.download, max_pixels=cfg.data.max_image_pixels,
                           index_cache=run_path / FILE_INDEX)

    source = main_first(dist_info, open_data)
    source = open_data() if source is None else source
    source = random_subset(source, cfg.data.max_images)
    check_readable(source)
    if len(source) < cfg.train.batch_size:
        raise DataError(f"{cfg.data.source} has {len(source)} images, fewer than one batch of "
                        f"{cfg.train.batch_size}: lower --batch-size")
    return source


def resolve_pipeline(cfg, source) -> Optional[tuple[int, int]]:
    """The image size for the in-memory tensor pipeline, or None for the PIL pipeline."""
    if cfg.data.pipeline == "pil":
        return None
    size = common_small_size(source)
    decoded = len(source) * size[0] * size[1] * 3 if size is not None else None
    if cfg.data.pipeline == "tensor":
        if decoded is None or decoded >= TENSOR_PIPELINE_MAX_BYTES:
            raise ConfigError("data.pipeline=tensor needs images of one size, up to 64 px, that fit in "
                              "8 GB of memory; use data.pipeline=pil for these images")
        return size
    # auto: a large corpus streams from disk instead of being held in memory as images
    return size if decoded is not None and decoded < TENSOR_PIPELINE_AUTO_BYTES else None


def build_loader(cfg, source, device: torch.device, progress: bool = True, dist_info: DistInfo = DistInfo()):
    """Batches of view pairs: ``TensorBatches`` for small images in memory, else a DataLoader.

    In a distributed run each rank gets its slice of every global batch (``EpochBatchSampler``).

    Returns:
        ``(batches, sampler)``; iterating ``batches`` yields ``{"views", "skipped"}`` records.
    """
    size = resolve_pipeline(cfg, source)
    if size is not None:
        return _tensor_batches(cfg, source, size, device, progress, dist_info)
    if cfg.augment.local_views:
        raise ConfigError("augment.local_views (multi-crop) needs the in-memory pipeline: images of one size up "
                          "to 64 px that fit in memory (data.pipeline=tensor)")
    transform = build_view_transform(cfg.augment)
    dataset = TwoViewDataset(source, transform, cfg.train.seed)
    sampler = EpochBatchSampler(len(dataset), cfg.train.batch_size, cfg.train.seed, dist_info.rank,
                                dist_info.world_size)
    workers = worker_count(cfg.data.num_workers, len(dataset))
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate_views,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )
    log.info("data: %d images, batch %d%s, %d steps/epoch, %d loader workers",
             len(dataset), cfg.train.batch_size, per_rank(sampler), len(sampler), workers)
    return loader, sampler


def _tensor_batches(cfg, source, size: tuple[int, int], device: torch.device, progress: bool,
                    dist_info: DistInfo):
    """``build_loader``'s in-memory pipeline: every image decoded once, augmented by batches."""
    # Nothing else runs yet: this rank's share of the machine's cores decodes (torchrun sets
    # LOCAL_WORLD_SIZE, the ranks on this machine).
    workers = decode_workers(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    images, _, skipped = decode_all(source, size, progress=progress, workers=workers)
    if len(images) < cfg.train.batch_size:
        raise DataError(f"only {len(images)} readable images, fewer than one batch of {cfg.train.batch_size}")
    sampler = EpochBatchSampler(len(images), cfg.train.batch_size, cfg.train.seed, dist_info.rank,
                                dist_info.world_size)
    # grey images (scans, X-rays, digits): skip the colour steps that cannot change them
    grey = is_grey(images)
    augment = build_batch_augment(cfg.augment, grey=grey).to(device)
    local_augment = (build_batch_augment(cfg.augment, local=True, grey=grey).to(device)
                     if cfg.augment.local_views else None)
    batches = TensorBatches(torch.from_numpy(images).to(device), augment, sampler, cfg.train.seed, skipped,
                            local_augment, cfg.augment.local_views)
    local = (f" (+ {cfg.augment.local_views} local views of {cfg.augment.local_size} px)"
             if cfg.augment.local_views else "") + ("; grey images: no saturation, hue or grey-scale steps" if grey else "")
    log.info("data: %d images decoded into memory (%dx%d), batch %d%s, %d steps/epoch, "
             "augmented in batches on %s%s", len(images), size[0], size[1], cfg.train.batch_size,
             per_rank(sampler), len(sampler), device, local)
    return batches, sampler


def per_rank(sampler: EpochBatchSampler) -> str:
    """How a global batch is shared out, for the log (empty in one process)."""
    if sampler.world_size == 1:
        return ""
    return f" ({sampler.local_batch_size} on each of {sampler.world_size} ranks)"
