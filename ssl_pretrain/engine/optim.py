"""Optimiser and schedules: SGD, LARS or AdamW; linear warm-up then cosine decay of the learning
rate, and an optional cosine schedule of the weight decay (DINO)."""

from __future__ import annotations

import math
import time
from typing import Optional

import torch
from lightly.utils.lars import LARS
from torch import nn

from ssl_pretrain.settings import OptimConfig


def scaled_lr(cfg: OptimConfig, batch_size: int) -> float:
    """Base rate per 256 images, scaled to the batch (Goyal et al. 2017; SimCLR uses linear)."""
    factor = {"linear": batch_size / 256, "sqrt": math.sqrt(batch_size / 256), "none": 1.0}
    return cfg.lr * factor[cfg.lr_scaling]


NO_DECAY_NAMES = {"pos_embedding", "pos_embed", "class_token", "cls_token", "mask_token"}
"""ViT parameters that are never decayed either (torchvision's and timm's names; as in MAE's and
DINO's code)."""


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on conv/linear weights only: norm layers and biases are excluded, as in
    SimCLR's and BYOL's reference code (nor are a ViT's position embeddings and class token). lightly's LARS skips its trust ratio for groups with no
    weight decay, so the same split also excludes them from LARS adaptation."""
    decay, no_decay = [], []
    for module in model.modules():
        is_norm = isinstance(module, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm))
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            exempt = is_norm or name == "bias" or name in NO_DECAY_NAMES
            (no_decay if exempt else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay, "decayed": True},
        {"params": no_decay, "weight_decay": 0.0, "decayed": False},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig, batch_size: int) -> torch.optim.Optimizer:
    groups = parameter_groups(model, cfg.weight_decay)
    lr = scaled_lr(cfg, batch_size)
    if cfg.name == "lars":
        return LARS(groups, lr=lr, momentum=cfg.momentum)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas))
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum)


def weight_decay_at(cfg: OptimConfig, progress: float) -> float:
    """``optim.weight_decay`` at ``progress`` (0 -> 1) of training: constant, or a cosine from it to
    ``optim.weight_decay_end`` (DINO, Caron et al. 2021: 0.04 -> 0.4)."""
    if cfg.weight_decay_end is None:
        return cfg.weight_decay
    ramp = 0.5 * (1.0 - math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    return cfg.weight_decay + (cfg.weight_decay_end - cfg.weight_decay) * ramp


def set_weight_decay(optimizer: torch.optim.Optimizer, weight_decay: float) -> None:
    """Set the weight decay of the decayed groups (norm layers and biases stay at 0)."""
    for group in optimizer.param_groups:
        if group.get("decayed", group["weight_decay"] > 0):
            group["weight_decay"] = weight_decay


def warmup_cosine(step: int, total_steps: int, warmup_steps: int) -> float:
    """Multiplier of the peak rate at ``step``: linear from 1/warmup up to 1, then cosine to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class BudgetClock:
    """Wall-clock time of a run with a time budget (``train.time_budget_minutes``).

    ``now`` is the run's elapsed time in seconds, carried over a resume (``used``: the time spent
    before the last checkpoint) and updated once per step by ``tick`` - in a distributed run to
    the largest over ranks, so every rank sees the same learning rate and stops at the same step.
    ``warmup_end`` is the time at which the warm-up ended (the cosine decays from there to the
    budget).
    """

    def __init__(self, budget_seconds: float, used: float = 0.0, warmup_end: Optional[float] = None):
        self.budget, self.used, self.warmup_end = float(budget_seconds), float(used), warmup_end
        self.started = time.perf_counter()
        self.now = self.used
        self.step_seconds = 0.0  # the last interval between two ticks (one training step)

    def resume(self, state: dict) -> None:
        """Continue from a checkpoint's ``state()``: its elapsed time counts against the budget."""
        self.used, self.warmup_end = float(state["elapsed_s"]), state["warmup_end_s"]
        self.now = self.used

    def tick(self, sync=None) -> float:
        """Read the clock (``sync``: a function making the reading the same on every rank)."""
        now = self.used + time.perf_counter() - self.started
        now = sync(now) if sync else now
        self.step_seconds, self.now = max(now - self.now, 0.0), now
        return self.now

    def out_of_time(self) -> bool:
        """Would one more step (as long as the last one) end past the budget?"""
        return self.now + self.step_seconds >= self.budget

    def progress(self) -> float:
        """0 at the end of the warm-up, 1 at the budget."""
        if self.warmup_end is None:
            return 0.0
        return (self.now - self.warmup_end) / max(self.budget - self.warmup_end, 1e-9)

    def state(self) -> dict:
        return {"budget_s": self.budget, "elapsed_s": self.now, "warmup_end_s": self.warmup_end}


def budget_cosine(step: int, total_steps: int, warmup_steps: int, clock: BudgetClock) -> float:
    """``warmup_cosine`` whose decay ends at the budget or at ``total_steps``, whichever comes
    first: the cosine's progress is the larger of the two fractions."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if clock.warmup_end is None:
        clock.warmup_end = clock.now
    by_steps = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = max(by_steps, clock.progress())
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(optimizer, cfg: OptimConfig, steps_per_epoch: int, epochs: int,
                    clock: Optional[BudgetClock] = None):
    """A per-step ``LambdaLR``; its state (the step count) is saved in checkpoints.

    With a ``clock`` (a time budget) the cosine decays over the budget's remaining time after the
    warm-up (or over the epochs, if they end first).
    """
    total = steps_per_epoch * epochs
    warmup = min(int(round(cfg.warmup_epochs * steps_per_epoch)), total)
    if clock is not None:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: budget_cosine(step, total, warmup, clock))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, total, warmup))
