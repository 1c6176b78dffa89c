"""The data pipeline a pretraining run reads: which images (``open_training_source``) and how they
become batches of views (``build_loader``): every image decoded once - small images of one size
as they are, anything else at the training size into a cache file (``pixel_cache``) - and augmented
in whole batches on the training device; a PIL ``DataLoader`` where asked (``data.pipeline=pil``) or
where the images fit neither in memory nor on the disk.

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
from ssl_pretrain.data.pixel_cache import storage_side, store_source
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
    """The native image size when every image is small (up to 64 px), of one size, and all of them
    fit in memory: decoded as they are, with no resampling. None otherwise (``store_source``)."""
    if cfg.data.pipeline == "pil":
        return None
    size = common_small_size(source)
    decoded = len(source) * size[0] * size[1] * 3 if size is not None else None
    limit = TENSOR_PIPELINE_MAX_BYTES if cfg.data.pipeline == "tensor" else TENSOR_PIPELINE_AUTO_BYTES
    return size if decoded is not None and decoded < limit else None


def build_loader(cfg, source, device: torch.device, progress: bool = True, dist_info: DistInfo = DistInfo()):
    """Batches of view pairs: ``TensorBatches`` from images decoded once (at their own size when
    small and of one size, else at the training size, ``pixel_cache``), else a DataLoader.

    In a distributed run each rank gets its slice of every global batch (``EpochBatchSampler``).
    Multi-crop (``augment.local_views``) needs the batch pipeline; on the per-image one it is
    turned off with a warning (``cfg.augment.local_views`` set to 0, so the run's config says so).

    Returns:
        ``(batches, sampler)``; iterating ``batches`` yields ``{"views", "skipped"}`` records.
    """
    if cfg.data.pipeline != "pil":
        decoded = decode_for_batches(cfg, source, progress, dist_info)
        if decoded is not None:
            return _tensor_batches(cfg, *decoded, device, dist_info)
        if cfg.data.pipeline == "tensor":
            raise ConfigError("data.pipeline=tensor: these images fit neither in memory nor in a cache file "
                              "(see the warning above); use data.pipeline=auto or pil")
    if cfg.augment.local_views:
        log.warning("augment.local_views (multi-crop) is made by the batch pipeline, and this run reads its "
                    "images one by one (data.pipeline=%s): trained without the %d local views",
                    cfg.data.pipeline, cfg.augment.local_views)
        cfg.augment.local_views = 0
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


def decode_for_batches(cfg, source, progress: bool, dist_info: DistInfo):
    """Every image of ``source`` decoded once: ``(images (N_ok, H, W, 3) uint8, skipped (name, reason),
    grey, how)``, or None where they can be neither held in memory nor cached (logged).

    Small images of one size stay as they are; anything else is decoded at the training size
    into a cache file that later epochs and runs reuse (``pixel_cache.store_source``). Rank 0
    writes the cache file, the other ranks then read it.
    """
    # Nothing else runs yet: this rank's share of the machine's cores decodes (torchrun sets
    # LOCAL_WORLD_SIZE, the ranks on this machine).
    workers = decode_workers(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    size = resolve_pipeline(cfg, source)
    if size is not None:
        images, _, skipped = decode_all(source, size, progress=progress, workers=workers)
        return images, skipped, is_grey(images), "decoded into memory"
    side = storage_side(cfg.augment.input_size)
    limit = TENSOR_PIPELINE_MAX_BYTES if cfg.data.pipeline == "tensor" else TENSOR_PIPELINE_AUTO_BYTES

    def store():
        return store_source(source, side, workers, progress, memory_limit=limit)

    stored = main_first(dist_info, store)
    stored = store() if not dist_info.is_main else stored
    if stored is None:
        return None
    if stored.reused:
        how = f"read from the cache file {stored.cache_file} (no image opened)"
    elif stored.cache_file is not None:
        how = (f"(shorter side resized, centre-cropped) decoded in {stored.seconds:.1f} s into the cache file "
               f"{stored.cache_file} ({stored.images.nbytes / 2**20:.0f} MB; later runs reuse it)")
    else:
        how = f"(shorter side resized, centre-cropped) decoded in {stored.seconds:.1f} s into memory"
    return stored.images, stored.skipped, stored.grey, how


def _tensor_batches(cfg, images, skipped, grey: bool, how: str, device: torch.device, dist_info: DistInfo):
    """``build_loader``'s batch pipeline over decoded images: augmented by batches on ``device``."""
    if len(images) < cfg.train.batch_size:
        raise DataError(f"only {len(images)} readable images, fewer than one batch of {cfg.train.batch_size}")
    sampler = EpochBatchSampler(len(images), cfg.train.batch_size, cfg.train.seed, dist_info.rank,
                                dist_info.world_size)
    # grey images (scans, X-rays, digits): skip the colour steps that cannot change them
    augment = build_batch_augment(cfg.augment, grey=grey).to(device)
    local_augment = (build_batch_augment(cfg.augment, local=True, grey=grey).to(device)
                     if cfg.augment.local_views else None)
    pixels = torch.from_numpy(images)
    # on the training device when it fits there; else each batch is gathered on the CPU and moved
    if device.type == "cpu" or images.nbytes <= TENSOR_PIPELINE_MAX_BYTES:
        pixels = pixels.to(device)
    batches = TensorBatches(pixels, augment, sampler, cfg.train.seed, skipped, local_augment,
                            cfg.augment.local_views, device=device)
    local = (f" (+ {cfg.augment.local_views} local views of {cfg.augment.local_size} px)"
             if cfg.augment.local_views else "") + ("; grey images: no saturation, hue or grey-scale steps" if grey else "")
    log.info("data: %d images of %dx%d px %s, batch %d%s, %d steps/epoch, augmented in batches on %s%s",
             len(images), images.shape[2], images.shape[1], how, cfg.train.batch_size, per_rank(sampler),
             len(sampler), device, local)
    return batches, sampler


def per_rank(sampler: EpochBatchSampler) -> str:
    """How a global batch is shared out, for the log (empty in one process)."""
    if sampler.world_size == 1:
        return ""
    return f" ({sampler.local_batch_size} on each of {sampler.world_size} ranks)"
