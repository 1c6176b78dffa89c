"""The pretraining loop: one function, ``pretrain(cfg, out_dir)``, read top to bottom.

images (``data``) -> two views (``augment``) -> the method (``methods``: backbone + heads ->
loss) -> SGD/LARS step (``engine.optim``) -> momentum/teacher update, a checkpoint after every
epoch, the student backbone exported at the end.
"""

from __future__ import annotations

import logging
import math
import os
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

import ssl_pretrain
from ssl_pretrain.engine.allocator import keep_freed_memory
from ssl_pretrain.models.backbones import BACKBONES, resolve_small_stem
from ssl_pretrain.checkpoint import (
    BackboneInfo,
    atomic_write,
    export_backbone,
    load_checkpoint,
    load_state_dict_strict,
    save_checkpoint,
)
from ssl_pretrain.config import VARIANT_CONDITIONS, Config, ConfigError
from ssl_pretrain.models.warm_start import load_init_weights
from ssl_pretrain.augment.batch_transforms import build_batch_augment, is_grey
from ssl_pretrain.data import (
    DataError,
    check_readable,
    common_small_size,
    decode_all,
    decode_workers,
    open_source,
    random_subset,
    usable_cores,
)
from ssl_pretrain.engine.distributed import (
    DistInfo,
    barrier,
    convert_sync_batchnorm,
    gather_skipped,
    init_distributed,
    main_first,
    max_over_ranks,
    mean_over_ranks,
    min_over_ranks,
    shutdown,
    unwrap,
)
from ssl_pretrain.data.dataset import (
    EpochBatchSampler,
    TensorBatches,
    TwoViewDataset,
    collate_views,
    seed_everything,
    worker_count,
)
from ssl_pretrain.engine.hardware import bf16_native, resolve_precision
from ssl_pretrain.methods import METHODS, Method, build_model
from ssl_pretrain.engine.optim import (BudgetClock, build_optimizer, build_scheduler, scaled_lr, set_weight_decay,
                                       weight_decay_at)
from ssl_pretrain.engine.run_folder import RunFolder
from ssl_pretrain.augment.transforms import build_view_transform

log = logging.getLogger("ssl_pretrain")

FILE_INDEX = "file_index.txt"
# data.pipeline=auto decodes small images into memory up to 2 GiB (CIFAR-10: 150 MB; a million
# 32 px images, 3 GB, stream); data.pipeline=tensor forces it up to 8 GiB.
TENSOR_PIPELINE_AUTO_BYTES = 2 * 2**30
TENSOR_PIPELINE_MAX_BYTES = 8 * 2**30

# Keys that may change when a run is resumed; anything else must match the saved config.
RESUMABLE_CHANGES = {
    "train.epochs", "train.device", "train.threads", "train.keep_freed_memory", "train.log_every_steps", "train.tensorboard",
    "train.checkpoint_every_steps", "train.keep_every_epochs", "data.num_workers", "data.source",
    "monitor.train", "monitor.val", "monitor.every_epochs",
}
# The number of ranks may change too: the global batch order does not depend on it.


class DivergenceError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class RunState:
    """Where the run stands: the next epoch and step to run, and what was skipped so far."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    skipped: dict[str, str] = field(default_factory=dict)


def resolve_device(setting: str) -> torch.device:
    """``auto`` -> CUDA, then MPS, then CPU; anything else must be a usable torch device.

    Raises:
        ConfigError: not a device name, or a GPU this torch cannot see (one line).
    """
    if setting == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    try:
        device = torch.device(setting)
    except RuntimeError:
        raise ConfigError(f"'{setting}' is not a torch device (try auto, cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{setting}' asked for, but this torch sees no CUDA GPU")
    return device


def backbone_info(cfg: Config, feature_dim: int, epoch: int = 0) -> BackboneInfo:
    return BackboneInfo(
        architecture=cfg.model.backbone,
        small_stem=resolve_small_stem(cfg.model.small_stem, cfg.augment.input_size),
        feature_dim=feature_dim,
        input_size=cfg.augment.input_size,
        mean=tuple(cfg.augment.mean),
        std=tuple(cfg.augment.std),
        epoch=epoch,
    )


def check_resume_compatible(saved: dict[str, Any], new: dict[str, Any], prefix: str = "") -> None:
    """A resumed run must train the same model the same way; only a few keys may change."""
    for key, saved_value in saved.items():
        path = f"{prefix}{key}"
        new_value = new.get(key)
        if isinstance(saved_value, dict) and isinstance(new_value, dict):
            check_resume_compatible(saved_value, new_value, path + ".")
        elif saved_value != new_value and path not in RESUMABLE_CHANGES:
            raise ConfigError(
                f"cannot resume: '{path}' is {new_value!r} now but the run was started with "
                f"{saved_value!r} (use another --out folder for a different setting)"
            )


def method_relevant(config: dict[str, Any]) -> dict[str, Any]:
    """A config without the sections of the methods it does not train (they may change on resume)."""
    return {key: value for key, value in config.items() if key not in METHODS or key == config.get("method")}


def resolve_pipeline(cfg: Config, source) -> Optional[tuple[int, int]]:
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


def build_loader(cfg: Config, source, device: torch.device, progress: bool = True, dist_info: DistInfo = DistInfo()):
    """Batches of view pairs: ``TensorBatches`` for small images in memory, else a DataLoader.

    In a distributed run each rank gets its slice of every global batch (``EpochBatchSampler``).

    Returns:
        ``(batches, sampler)``; iterating ``batches`` yields ``{"views", "skipped"}`` records.
    """
    size = resolve_pipeline(cfg, source)
    if size is not None:
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


def per_rank(sampler: EpochBatchSampler) -> str:
    if sampler.world_size == 1:
        return ""
    return f" ({sampler.local_batch_size} on each of {sampler.world_size} ranks)"


def restore(run: RunFolder, cfg: Config, model, optimizer, scheduler,
            clock: Optional[BudgetClock] = None) -> RunState:
    """Load ``last.pt`` into the model, optimiser, scheduler and budget clock; return where to
    continue."""
    state = load_checkpoint(run.last_checkpoint)
    check_resume_compatible(method_relevant(state["config"]), method_relevant(cfg.to_dict()))
    load_state_dict_strict(model, state["model"], str(run.last_checkpoint))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if clock is not None and state.get("clock"):
        clock.resume(state["clock"])
    torch.set_rng_state(state["rng"]["torch"])
    np.random.set_state(("MT19937", state["rng"]["numpy"].numpy().astype(np.uint32), *state["rng"]["numpy_pos"]))
    import random

    random.setstate((state["rng"]["python"][0], tuple(state["rng"]["python"][1]), state["rng"]["python"][2]))
    run.trim_metrics(after_step=state["global_step"])
    log.info("resumed from %s at epoch %d, step %d", run.last_checkpoint, state["epoch"] + 1,
             state["step_in_epoch"])
    return RunState(state["epoch"], state["step_in_epoch"], state["global_step"], dict(state["skipped"]))


def rng_states() -> dict[str, Any]:
    import random

    numpy_state = np.random.get_state()
    python_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(numpy_state[1].astype(np.int64)),
        "numpy_pos": [int(numpy_state[2]), int(numpy_state[3]), float(numpy_state[4])],
        "python": [python_state[0], list(python_state[1]), python_state[2]],
    }


def write_checkpoint(run: RunFolder, cfg: Config, model: Method, optimizer, scheduler, state: RunState,
                     clock: Optional[BudgetClock] = None) -> None:
    if not run.writer:
        return  # rank 0 writes for everyone
    model = unwrap(model)  # torch.compile, DistributedDataParallel
    model_state = model.state_dict()
    save_checkpoint(run.last_checkpoint, {
        "config": cfg.to_dict(),
        "epoch": state.epoch,
        "step_in_epoch": state.step_in_epoch,
        "global_step": state.global_step,
        "model": {key: value.detach().cpu() for key, value in model_state.items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_states(),
        "skipped": dict(state.skipped),
        "clock": clock.state() if clock is not None else None,
        "backbone_info": backbone_info(cfg, model.feature_dim, state.epoch).__dict__,
        "versions": {"ssl_pretrain": ssl_pretrain.__version__, "torch": str(torch.__version__)},
    })


@dataclass
class Step:
    """What one optimisation step needs, resolved once per run."""

    model: Method
    optimizer: torch.optim.Optimizer
    scheduler: Any
    device: torch.device
    autocast: Any
    channels_last: bool
    grad_clip: Optional[float]
    total_steps: int = 0  # epochs x steps per epoch: momentum schedules run over these
    dist: DistInfo = field(default_factory=DistInfo)
    clock: Optional[BudgetClock] = None  # train.time_budget_minutes
    forecast_done: bool = False  # the time budget's epoch forecast is logged once per process
    weight_decay: Optional[Callable[[float], float]] = None  # progress -> weight decay (optim.weight_decay_end)
    collapse_warned: bool = False  # the collapse warning is logged once per process


def training_progress(step: Step) -> float:
    """The fraction of training done, 0 -> 1: steps over the planned steps or, with a time
    budget, the budget's fraction if larger (the learning rate's cosine uses the same)."""
    done = step.scheduler.last_epoch / max(step.total_steps, 1)  # the scheduler counts the steps taken
    if step.clock is not None:
        done = max(done, step.clock.progress())
    return min(done, 1.0)


def train_step(step: Step, views: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """One SGD/LARS step on a batch of views, then the method's momentum update; returns the
    (detached) loss."""
    memory_format = torch.channels_last if step.channels_last else torch.contiguous_format
    views = [view.to(step.device, non_blocking=True, memory_format=memory_format) for view in views]
    with step.autocast():
        loss = step.model(views)
    step.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if step.grad_clip:
        torch.nn.utils.clip_grad_norm_(step.model.parameters(), step.grad_clip)
    progress = training_progress(step)
    unwrap(step.model).before_optimizer_step(progress)
    if step.weight_decay is not None:
        set_weight_decay(step.optimizer, step.weight_decay(progress))
    step.optimizer.step()
    step.scheduler.step()
    unwrap(step.model).after_step(training_progress(step))
    return mean_over_ranks(loss.detach(), step.dist)  # the global batch's loss, the same on every rank


def diverged(loss: float, state: RunState, run: RunFolder, lr: float) -> DivergenceError:
    return DivergenceError(
        f"loss became {loss} at epoch {state.epoch + 1}, step {state.step_in_epoch} (lr {lr:.3g}): "
        f"training stopped, the last good checkpoint is kept in {run.last_checkpoint.parent}; "
        "lower optim.lr, raise optim.warmup_epochs or set optim.grad_clip"
    )


def check_finite_state(model: torch.nn.Module, state: RunState, run: RunFolder) -> None:
    """A finite loss can hide a blown-up model (e.g. BatchNorm running variance at inf under
    gradient clipping); never checkpoint or export one."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise DivergenceError(
                f"'{name}' became non-finite in epoch {state.epoch + 1} although the loss stayed finite: "
                f"training stopped, the last good checkpoint is kept in {run.last_checkpoint.parent}; "
                "lower optim.lr or raise optim.warmup_epochs"
            )


FORECAST_AFTER_STEPS = 20
"""Steps timed before a time-budgeted run forecasts its epochs (the first ones include warm-up:
allocator, oneDNN kernel selection, loader start)."""
FEW_EPOCHS = 2.0
"""A budget that gives fewer epochs than this trains a network that has hardly seen its data."""


def forecast_budget(cfg: Config, step: Step, state: RunState, rate: float, steps_per_epoch: int) -> float:
    """Log the measured images/s and the epochs the time budget will give; warn when few.

    Returns:
        The forecast number of epochs in the whole budget.
    """
    remaining = max(step.clock.budget - step.clock.now, 0.0)
    epoch_images = max(steps_per_epoch, 1) * cfg.train.batch_size
    done = state.epoch + state.step_in_epoch / max(steps_per_epoch, 1)
    epochs = min(done + rate * remaining / epoch_images, float(cfg.train.epochs))
    log.info("measured %.0f images/s: the %g-minute budget gives about %.1f epochs", rate,
             cfg.train.time_budget_minutes, epochs)
    if epochs < FEW_EPOCHS:
        causes = [f"{torch.get_num_threads()} compute threads on {usable_cores()} usable cores"]
        if step.device.type == "cpu" and cfg.train.precision == "bf16" and not bf16_native(step.device):
            causes.insert(0, "bf16 forced on a CPU that emulates it (set train.precision=auto)")
        log.warning("only about %.1f epochs fit in the time budget at %.0f images/s: likely causes: %s; a slow "
                    "disk or decoding (data.pipeline=tensor decodes once into memory); a backbone too large for "
                    "this device (configs/cifar10_cpu.yaml is the CPU preset). Raise the budget or fix the cause.",
                    epochs, rate, "; ".join(causes))
    return epochs


def run_epoch(cfg: Config, run: RunFolder, step: Step, loader, sampler, state: RunState, progress: bool) -> dict:
    """Train one epoch (from ``state.step_in_epoch`` on); returns the epoch's summary record."""
    sampler.set_epoch(state.epoch, state.step_in_epoch)
    step.model.train()
    started, images_seen, loss_sum, steps_done = time.perf_counter(), 0, 0.0, 0
    budget_reached = False
    bar = tqdm(loader, total=len(sampler), desc=f"epoch {state.epoch + 1}/{cfg.train.epochs}",
               unit="step", disable=not (progress and step.dist.is_main), dynamic_ncols=True, leave=False)
    for batch in bar:
        if step.clock is not None:
            step.clock.tick(lambda seconds: max_over_ranks(seconds, step.dist, step.device))
            if step.clock.out_of_time():
                budget_reached = True
                break
        for name, reason in batch["skipped"]:
            if name not in state.skipped:
                state.skipped[name] = reason
                log.warning("skipped unreadable image %s: %s", name, reason)
        state.step_in_epoch += 1
        state.global_step += 1
        views = batch["views"]
        count = 0 if views is None else len(views[0])
        if step.dist.enabled:
            # Unreadable files can leave the ranks with unequal shares; gathering the negatives
            # needs equal ones, so every rank trains on the smallest share of this step.
            count = min_over_ranks(count, step.dist, step.device)
            views = None if count == 0 else tuple(view[:count] for view in views)
        if count < 2:
            continue  # every image of this batch was unreadable
        loss = train_step(step, views).item()
        lr = step.optimizer.param_groups[0]["lr"]
        if not math.isfinite(loss):
            raise diverged(loss, state, run, lr)
        images_seen, loss_sum, steps_done = images_seen + count * step.dist.world_size, loss_sum + loss, steps_done + 1
        rate = images_seen / (time.perf_counter() - started)
        if step.clock is not None and not step.forecast_done and steps_done == FORECAST_AFTER_STEPS:
            step.forecast_done = True
            forecast_budget(cfg, step, state, rate, len(sampler))
        if state.global_step % cfg.train.log_every_steps == 0:
            run.append_metrics({"step": state.global_step, "epoch": state.epoch + 1, "loss": loss,
                                "lr": lr, "images_per_s": rate})
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.3g}", img_s=f"{rate:.0f}")
        if cfg.train.checkpoint_every_steps and state.global_step % cfg.train.checkpoint_every_steps == 0:
            write_checkpoint(run, cfg, step.model, step.optimizer, step.scheduler, state, step.clock)
    bar.close()
    state.skipped = gather_skipped(state.skipped, step.dist)
    if steps_done == 0 and len(sampler) > 0 and not budget_reached:
        raise DataError(f"no batch could be formed in epoch {state.epoch + 1}: "
                        f"{len(state.skipped)} unreadable files (see {run.log_file})")
    # len(sampler) == 0: killed after the epoch's last step checkpoint, before the epoch's own.
    seconds = max(time.perf_counter() - started, 1e-9)
    return {"step": state.global_step, "epoch": state.epoch + 1,
            "loss_mean": loss_sum / steps_done if steps_done else None,
            "seconds": round(seconds, 3), "images_per_s": images_seen / seconds,
            "skipped_files": len(state.skipped), "budget_reached": budget_reached}


PROBE_STEPS = 3
"""Timed forward+backward passes per precision in the start-up probe (after one untimed)."""


def probe_workload(cfg: Config, channels_last: bool) -> str:
    """What the precision probe's answer depends on besides the machine."""
    return (f"{cfg.method} {cfg.model.backbone} {cfg.augment.input_size}px batch {cfg.train.batch_size}"
            f"{' channels-last' if channels_last else ''}")


def probe_precisions(cfg: Config, device: torch.device, channels_last: bool) -> dict[str, float]:
    """Images/s of forward+backward of the configured method and network (a fresh one: weights do
    not change the speed) in fp32 and under bf16 autocast, on random views of the run's size (a
    batch of at most 64 images, so a large network still takes seconds). The random state is left
    as it was."""
    images = min(cfg.train.batch_size, 64)
    size, memory_format = cfg.augment.input_size, torch.channels_last if channels_last else torch.contiguous_format
    rates = {}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        network = build_model(cfg).to(device).train()
        if channels_last:
            network.to(memory_format=torch.channels_last)
        views = torch.randn(2 * images, 3, size, size, device=device).contiguous(memory_format=memory_format)
        for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
            context = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()
            for index in range(PROBE_STEPS + 1):
                if index == 1:
                    started = time.perf_counter()
                with context:
                    loss = network(list(views.chunk(2)))
                loss.backward()
                network.zero_grad(set_to_none=True)
            rates[name] = PROBE_STEPS * images / (time.perf_counter() - started)
    return rates


def make_step(cfg: Config, model: Method, optimizer, scheduler, device: torch.device,
              dist_info: DistInfo = DistInfo(), total_steps: int = 0) -> Step:
    """Resolve precision, memory format, ``DistributedDataParallel`` and ``torch.compile`` once."""
    # channels-last: tensor cores on GPUs; oneDNN's faster convolutions on CPUs
    # (BENCHMARKS.md, "Pretraining throughput")
    channels_last = device.type in ("cuda", "cpu") if cfg.train.channels_last is None else cfg.train.channels_last
    # bf16 only where the hardware runs it natively and faster (a probe decides where unclear)
    probe = None if dist_info.enabled else lambda: probe_precisions(cfg, device, channels_last)
    use_bf16 = resolve_precision(cfg.train.precision, device, probe, workload=probe_workload(cfg, channels_last))
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 else nullcontext
    if channels_last:
        model.to(memory_format=torch.channels_last)
    forward_model: torch.nn.Module = model
    if dist_info.enabled:
        forward_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.train.compile:
        forward_model = torch.compile(forward_model)
    weight_decay = None
    if cfg.optim.weight_decay_end is not None:
        weight_decay = lambda progress: weight_decay_at(cfg.optim, progress)  # noqa: E731
    return Step(forward_model, optimizer, scheduler, device, autocast, channels_last, cfg.optim.grad_clip,
                total_steps, dist_info, weight_decay=weight_decay)


def pretrain(cfg: Config, out_dir: str | Path, resume: bool = False, overwrite: bool = False,
             progress: bool = True, monitor: Optional[Callable[[torch.nn.Module], float]] = None) -> Path:
    """Pretrain a backbone with ``cfg.method`` on ``cfg.data.source`` and write the run into ``out_dir``.

    Args:
        resume: continue from ``out_dir/checkpoints/last.pt``; starts fresh when there is none.
        overwrite: delete a run already in ``out_dir`` instead of refusing.
        progress: show a progress bar.
        monitor: called with the backbone every ``monitor.every_epochs`` epochs; its number is
            logged as ``knn_top1`` (``linear_probe.monitor.KnnMonitor(cfg)``, which the
            ``ssl-pretrain`` command passes when ``monitor.train`` and ``monitor.val`` are set).

    Returns:
        The path of the exported ``backbone.safetensors``.

    Raises:
        ConfigError, DataError, CheckpointError, RunFolderError, DivergenceError: one-line errors.
    """
    if not cfg.data.source:
        raise ConfigError("no data given: pass --data PATH (or set data.source in the config)")
    dist_info, rank_device = init_distributed(cfg.train.device)
    try:
        with quiet_unless_main(dist_info):
            return _pretrain(cfg, out_dir, resume, overwrite, progress, dist_info, rank_device, monitor)
    finally:
        shutdown(dist_info)


def _pretrain(cfg: Config, out_dir: str | Path, resume: bool, overwrite: bool, progress: bool,
              dist_info: DistInfo, rank_device: Optional[torch.device], monitor) -> Path:
    if cfg.train.batch_size % dist_info.world_size:
        raise ConfigError(f"train.batch_size {cfg.train.batch_size} is the global batch and must be divisible "
                          f"by the {dist_info.world_size} ranks")
    progress = progress and dist_info.is_main
    # A time budget counts from here: preparing and decoding the data included.
    clock = BudgetClock(60 * cfg.train.time_budget_minutes) if cfg.train.time_budget_minutes else None
    with RunFolder(out_dir, writer=dist_info.is_main) as run, torch_threads(cfg.train.threads):
        main_first(dist_info, lambda: run.prepare(resume=resume, overwrite=overwrite))
        device = rank_device or resolve_device(cfg.train.device)
        if device.type == "cpu" and cfg.train.keep_freed_memory:
            keep_freed_memory()

        def open_data():
            # The file list (or the shards' member offsets) is kept in the run folder: a resumed
            # or repeated run over a million files stats its folders instead of walking them.
            return open_source(cfg.data.source, download=cfg.data.download, max_pixels=cfg.data.max_image_pixels,
                               index_cache=run.path / FILE_INDEX)

        source = main_first(dist_info, open_data)  # rank 0 writes the index, the others read it
        source = open_data() if source is None else source
        source = random_subset(source, cfg.data.max_images)
        check_readable(source)
        if len(source) < cfg.train.batch_size:
            raise DataError(f"{cfg.data.source} has {len(source)} images, fewer than one batch of "
                            f"{cfg.train.batch_size}: lower --batch-size")
        warn_large_backbone_on_cpu(cfg, device)
        loader, sampler = build_loader(cfg, source, device, progress, dist_info)

        seed_everything(cfg.train.seed)
        model = build_model(cfg, gather_distributed=dist_info.enabled)
        if cfg.model.init and not (resume and run.last_checkpoint.exists()):  # a resumed run has its own weights
            log.info(load_init_weights(model.backbone, cfg.model.init).summary())
        if cfg.train.sync_batchnorm and dist_info.enabled:
            model = convert_sync_batchnorm(model, device)
        model = model.to(device)
        optimizer = build_optimizer(model, cfg.optim, cfg.train.batch_size)
        scheduler = build_scheduler(optimizer, cfg.optim, len(sampler), cfg.train.epochs, clock)
        state = RunState()
        if resume and run.last_checkpoint.exists():
            state = restore(run, cfg, model, optimizer, scheduler, clock)
        else:
            run.trim_metrics(after_step=0)  # records of an attempt killed before its first checkpoint
            if resume:
                log.info("no checkpoint in %s yet: starting fresh", run.path)
        run.write_config(cfg.to_dict())
        budget = f" (at most; time budget {cfg.train.time_budget_minutes:g} min)" if clock else ""
        log.info("run %s on %s%s: %s on %s, %d epochs%s, peak lr %.4g", run.path, device,
                 f" x {dist_info.world_size} ranks" if dist_info.enabled else "", cfg.method, cfg.model.backbone,
                 cfg.train.epochs, budget, scaled_lr(cfg.optim, cfg.train.batch_size))
        if cfg.variant:
            log.info("preset variant '%s' applied (%s): the settings under variants.%s of the preset, "
                     "before --set", cfg.variant, VARIANT_CONDITIONS[cfg.variant], cfg.variant)
        if cfg.recipe:
            log.info("preset recipe for %s applied: the settings under %s of the preset, before --set",
                     cfg.recipe, " then ".join(cfg.recipe_sections) or f"recipes.{cfg.recipe}")
        step = make_step(cfg, model, optimizer, scheduler, device, dist_info, len(sampler) * cfg.train.epochs)
        step.clock = clock
        if monitor is None and cfg.monitor.train and cfg.monitor.val:
            log.warning("monitor.train/val are set but no monitor was given: pass "
                        "monitor=linear_probe.monitor.KnnMonitor(cfg) to pretrain() (ssl-pretrain does)")
        train_epochs(cfg, run, step, loader, sampler, state, progress, monitor if run.writer else None)
        if run.writer:
            export_backbone(run.backbone_file, model.backbone, backbone_info(cfg, model.feature_dim, state.epoch))
            log.info("done: backbone written to %s; %d unreadable files skipped", run.backbone_file,
                     len(state.skipped))
        barrier(dist_info)  # the others return once the backbone is on disk
        return run.backbone_file


def warn_large_backbone_on_cpu(cfg: Config, device: torch.device) -> bool:
    """Without ``--config`` the defaults are the ResNet-18 GPU recipe (lightly's CIFAR-10
    benchmark), slow on a CPU; there the log says so and names the CPU preset, whose network trains
    many times faster (BENCHMARKS.md, "Pretraining throughput"). The default stays the same on
    every device, so that one command means one recipe everywhere. Returns whether it warned."""
    if device.type != "cpu" or BACKBONES[cfg.model.backbone].cpu_sized:
        return False
    if BACKBONES[cfg.model.backbone].patched:
        log.warning("training %s on a CPU: the ViTs run several times slower than smallconv there; "
                    "--config configs/cifar10_cpu.yaml trains a CPU-sized CNN", cfg.model.backbone)
        return True
    log.warning("training %s on a CPU: a GPU-sized network (the default recipe is a GPU one), slow here; "
                "--config configs/cifar10_cpu.yaml trains a CPU-sized network many times faster", cfg.model.backbone)
    return True


@contextmanager
def quiet_unless_main(dist_info: DistInfo):
    """Only rank 0 logs progress; the other ranks still report warnings and errors."""
    logger = logging.getLogger("ssl_pretrain")
    previous = logger.level
    if not dist_info.is_main:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(previous)


@contextmanager
def torch_threads(count: Optional[int]):
    """Use ``count`` intra-op threads for the run, then give the caller back its own setting."""
    previous = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def train_epochs(cfg: Config, run: RunFolder, step: Step, loader, sampler, state: RunState, progress: bool,
                 monitor: Optional[Callable[[torch.nn.Module], float]] = None) -> None:
    writer = tensorboard_writer(cfg, run) if run.writer else None
    run_started, start_epoch = time.perf_counter(), state.epoch
    while state.epoch < cfg.train.epochs:
        record = run_epoch(cfg, run, step, loader, sampler, state, progress)
        check_finite_state(step.model, state, run)
        if record.pop("budget_reached"):
            stop_at_budget(cfg, run, step, state, record)
            break
        state.epoch, state.step_in_epoch = state.epoch + 1, 0
        if monitor and state.epoch % cfg.monitor.every_epochs == 0:
            record["knn_top1"] = monitor(unwrap(step.model).backbone)
        warn_if_collapsed(cfg, step, record)
        write_checkpoint(run, cfg, step.model, step.optimizer, step.scheduler, state, step.clock)
        if run.writer and cfg.train.keep_every_epochs and state.epoch % cfg.train.keep_every_epochs == 0:
            payload = run.last_checkpoint.read_bytes()
            atomic_write(run.last_checkpoint.with_name(f"epoch-{state.epoch:04d}.pt"), lambda f: f.write(payload))
        run.append_metrics(record)
        if writer:
            for key in ("loss_mean", "images_per_s", "knn_top1"):
                if record.get(key) is not None:
                    writer.add_scalar(f"pretrain/{key}", record[key], state.epoch)
        elapsed = time.perf_counter() - run_started
        eta = elapsed / (state.epoch - start_epoch) * (cfg.train.epochs - state.epoch)
        if step.clock is not None:
            eta = min(eta, max(step.clock.budget - step.clock.now, 0.0))
        knn = f", kNN top-1 {record['knn_top1']:.2%}" if "knn_top1" in record else ""
        loss = "n/a" if record["loss_mean"] is None else f"{record['loss_mean']:.4f}"
        log.info("epoch %d/%d: loss %s, %.0f images/s, %d skipped files%s, ETA %.0f s", state.epoch,
                 cfg.train.epochs, loss, record["images_per_s"], record["skipped_files"], knn, eta)
    if writer:
        writer.close()


def warn_if_collapsed(cfg: Config, step: Step, record: dict) -> None:
    """After an epoch, ask the method whether its loss shows the known collapse (all images mapped
    alike: DINO's uniform output, BYOL's and SimSiam's constant prediction); mark every such epoch
    ``collapsed`` in the metrics and warn once, naming the likely fix. The run goes on: a collapse
    can be left again, and the user decides."""
    if record["loss_mean"] is None or record["epoch"] < 2:  # the first epoch starts near there
        return
    message = unwrap(step.model).collapse_message(record["loss_mean"])
    if message:
        record["collapsed"] = True
    if message and not step.collapse_warned:
        step.collapse_warned = True
        log.warning("epoch %d: %s. The features stop learning while this lasts; the recipes: section of "
                    "configs/cifar10_cpu.yaml holds measured settings per method", record["epoch"], message)


def stop_at_budget(cfg: Config, run: RunFolder, step: Step, state: RunState, record: dict) -> None:
    """The time budget ran out (mid-epoch, or before an epoch's first step): checkpoint where the
    run stands, so that the export and a resume see the same state."""
    write_checkpoint(run, cfg, step.model, step.optimizer, step.scheduler, state, step.clock)
    if record["loss_mean"] is not None:
        run.append_metrics(record)
    log.info("time budget of %g min reached after %d epochs and %d steps (%d steps in all): stopping",
             cfg.train.time_budget_minutes, state.epoch, state.step_in_epoch, state.global_step)


def tensorboard_writer(cfg: Config, run: RunFolder):
    if not cfg.train.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("train.tensorboard=true needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(str(run.path / "tensorboard"))
