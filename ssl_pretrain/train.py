"""The pretraining loop: one function, ``pretrain(cfg, out_dir)``, read top to bottom.

images (``data.pipeline``) -> views (``augment``) -> the method (``methods``: backbone + heads ->
loss) -> SGD/LARS/AdamW step (``engine.optim``) -> momentum/teacher update, a checkpoint after every
epoch (``resume``), the student backbone exported at the end. What the loop checks and warns about
is in ``diagnostics``; the precision it trains in, in ``precision``.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from tqdm import tqdm

from ssl_pretrain.checkpoint import atomic_write, export_backbone
from ssl_pretrain.config import Config
from ssl_pretrain.data.dataset import seed_everything
from ssl_pretrain.data.images import DataError
from ssl_pretrain.data.pipeline import build_loader, open_training_source
from ssl_pretrain.diagnostics import (FORECAST_AFTER_STEPS, check_finite_state, diverged, forecast_budget,
                                      warn_if_collapsed, warn_large_backbone_on_cpu)
from ssl_pretrain.engine.allocator import keep_freed_memory
from ssl_pretrain.engine.devices import resolve_device
from ssl_pretrain.engine.distributed import (DistInfo, barrier, convert_sync_batchnorm, gather_skipped,
                                             init_distributed, main_first, max_over_ranks, mean_over_ranks,
                                             min_over_ranks, shutdown, unwrap)
from ssl_pretrain.engine.optim import (BudgetClock, build_optimizer, build_scheduler, scaled_lr, set_weight_decay,
                                       weight_decay_at)
from ssl_pretrain.engine.run_folder import RunFolder
from ssl_pretrain.methods import Method, build_model
from ssl_pretrain.models.warm_start import load_init_weights
from ssl_pretrain.precision import default_channels_last, training_autocast
from ssl_pretrain.presets import VARIANT_CONDITIONS
from ssl_pretrain.recipe import log_recipe
from ssl_pretrain.resume import RunState, backbone_info, restore, write_checkpoint
from ssl_pretrain.settings import ConfigError

log = logging.getLogger("ssl_pretrain")


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


def make_step(cfg: Config, model: Method, optimizer, scheduler, device: torch.device,
              dist_info: DistInfo = DistInfo(), total_steps: int = 0) -> Step:
    """Resolve precision, memory format, ``DistributedDataParallel`` and ``torch.compile`` once."""
    channels_last = default_channels_last(cfg, device)
    # bf16 only where the hardware runs it natively and faster (a probe decides where unclear)
    autocast = training_autocast(cfg, device, channels_last, probe=not dist_info.enabled)
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
        if cfg.survey:  # ssl-pretrain without --config: the recipe chosen from the data, into train.log
            log_recipe(cfg.to_dict())
        device = rank_device or resolve_device(cfg.train.device)
        if device.type == "cpu" and cfg.train.keep_freed_memory:
            keep_freed_memory()
        source = open_training_source(cfg, run.path, dist_info)
        warn_large_backbone_on_cpu(cfg, device)
        loader, sampler = build_loader(cfg, source, device, progress, dist_info)

        resuming = resume and run.last_checkpoint.exists()
        model = build_network(cfg, device, dist_info, warm_start=not resuming)  # a resumed run has its own weights
        optimizer = build_optimizer(model, cfg.optim, cfg.train.batch_size)
        scheduler = build_scheduler(optimizer, cfg.optim, len(sampler), cfg.train.epochs, clock)
        state = RunState()
        if resuming:
            state = restore(run, cfg, model, optimizer, scheduler, clock)
        else:
            run.trim_metrics(after_step=0)  # records of an attempt killed before its first checkpoint
            if resume:
                log.info("no checkpoint in %s yet: starting fresh", run.path)
        run.write_config(cfg.to_dict())
        log_run_start(cfg, run, device, dist_info, clock)
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


def build_network(cfg: Config, device: torch.device, dist_info: DistInfo, warm_start: bool = True) -> Method:
    """The seeded method around its backbone (``--init`` weights loaded when ``warm_start``),
    BatchNorm synchronised across ranks when asked, on ``device``."""
    seed_everything(cfg.train.seed)
    model = build_model(cfg, gather_distributed=dist_info.enabled)
    if cfg.model.init and warm_start:
        log.info(load_init_weights(model.backbone, cfg.model.init).summary())
    if cfg.train.sync_batchnorm and dist_info.enabled:
        model = convert_sync_batchnorm(model, device)
    return model.to(device)


def log_run_start(cfg: Config, run: RunFolder, device: torch.device, dist_info: DistInfo,
                  clock: Optional[BudgetClock]) -> None:
    """One line on what trains where, and which preset variant and recipe shaped the config."""
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
