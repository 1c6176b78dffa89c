"""Optimiser and learning-rate schedule: SGD or LARS, linear warm-up then cosine decay."""

from __future__ import annotations

import math

import torch
from lightly.utils.lars import LARS
from torch import nn

from ssl_pretrain.config import OptimConfig


def scaled_lr(cfg: OptimConfig, batch_size: int) -> float:
    """Base rate per 256 images, scaled to the batch (Goyal et al. 2017; SimCLR uses linear)."""
    factor = {"linear": batch_size / 256, "sqrt": math.sqrt(batch_size / 256), "none": 1.0}
    return cfg.lr * factor[cfg.lr_scaling]


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on conv/linear weights only: norm layers and biases are excluded, as in
    SimCLR's and BYOL's reference code. lightly's LARS skips its trust ratio for groups with no
    weight decay, so the same split also excludes them from LARS adaptation."""
    decay, no_decay = [], []
    for module in model.modules():
        is_norm = isinstance(module, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm))
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            (no_decay if is_norm or name == "bias" else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig, batch_size: int) -> torch.optim.Optimizer:
    groups = parameter_groups(model, cfg.weight_decay)
    lr = scaled_lr(cfg, batch_size)
    if cfg.name == "lars":
        return LARS(groups, lr=lr, momentum=cfg.momentum)
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum)


def warmup_cosine(step: int, total_steps: int, warmup_steps: int) -> float:
    """Multiplier of the peak rate at ``step``: linear from 1/warmup up to 1, then cosine to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(optimizer, cfg: OptimConfig, steps_per_epoch: int, epochs: int):
    """A per-step ``LambdaLR``; its state (the step count) is saved in checkpoints."""
    total = steps_per_epoch * epochs
    warmup = min(int(round(cfg.warmup_epochs * steps_per_epoch)), total)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, total, warmup))
