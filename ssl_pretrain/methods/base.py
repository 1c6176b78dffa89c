"""What every method shares: its settings section, the student backbone it trains and exports, and
the momentum (teacher) utilities the self-distillation methods use.

A method is an ``nn.Module`` built from a backbone: ``forward(views) -> loss`` on a list of view
batches (two for most methods; DINO adds small local crops), and ``after_step(progress)``, called
after every optimiser step with the fraction of training done (0 -> 1), for momentum updates and
schedules. Everything a method must carry over a resume (momentum encoder, queue, centre) is a
parameter or buffer, so it travels in the checkpoint's ``model`` state.
"""

from __future__ import annotations

import copy
import math
from typing import Callable, Optional

import torch
from lightly.models.utils import deactivate_requires_grad, update_momentum
from pydantic import BaseModel, ConfigDict
from torch import nn


class MethodSettings(BaseModel):
    """A method's config section (``--set byol.momentum=0.996``); unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Method(nn.Module):
    """Base of the methods: ``backbone`` (the student, what is exported), ``feature_dim`` and, in
    every method here but MAE (a pixel decoder instead), a ``projection_head``."""

    def __init__(self, backbone: nn.Module, feature_dim: int):
        super().__init__()
        self.backbone = backbone
        self.feature_dim = feature_dim

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:  # pragma: no cover - abstract
        """Shape: ``views[i]`` ``(B, 3, H, W)`` -> the scalar loss of the batch."""
        raise NotImplementedError

    def before_optimizer_step(self, progress: float) -> None:
        """Called between the backward pass and the optimiser step (e.g. to drop some gradients)."""

    def after_step(self, progress: float) -> None:
        """Called after each optimiser step; ``progress`` in [0, 1] is the fraction of training done."""

    def collapse_message(self, epoch_loss: float) -> Optional[str]:
        """What an epoch's mean loss says about a known collapse of this method (every image mapped
        alike), or None; asked from the second epoch on."""
        return None

    def projections(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """The student's ``projection_head(backbone(view))`` of each view (``per_view``)."""
        return per_view(lambda images: self.projection_head(self.backbone(images)), views)


def cosine_collapse_message(epoch_loss: float) -> Optional[str]:
    """The collapse of the methods whose loss is a negative cosine similarity (BYOL, SimSiam): the
    epoch's mean loss at its floor of -1, every prediction equal to its target."""
    if epoch_loss < -0.999:
        return (f"the loss is {epoch_loss:.4f}, at its floor of -1: every image gives the same prediction "
                "(collapse); a lower optim.lr or a longer optim.warmup_epochs usually avoids it")
    return None


def per_view(network: Callable[[torch.Tensor], torch.Tensor], views: list[torch.Tensor]) -> list[torch.Tensor]:
    """``network`` applied to each view, the views of one size in one pass: BatchNorm sees the
    whole 2B batch, as in SimCLR, and one large batch runs faster than two small ones.

    Shape: ``views[i]`` ``(B, 3, H_i, W_i)`` -> one ``(B, D)`` output per view.
    """
    outputs: list[torch.Tensor] = []
    start = 0
    while start < len(views):
        end = start + 1
        while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
            end += 1
        outputs.extend(network(torch.cat(views[start:end])).chunk(end - start))
        start = end
    return outputs


def momentum_copy(module: nn.Module) -> nn.Module:
    """A frozen copy of ``module`` that follows it by exponential moving average (the teacher)."""
    teacher = copy.deepcopy(module)
    deactivate_requires_grad(teacher)
    return teacher


def cosine_momentum(base: float, progress: float) -> float:
    """BYOL's schedule (Grill et al. 2020, Sec. 3.2): ``1 - (1 - base) (cos(pi p) + 1) / 2``,
    from ``base`` at the start to 1 at the end of training."""
    return 1.0 - (1.0 - base) * (math.cos(math.pi * min(max(progress, 0.0), 1.0)) + 1.0) / 2.0


@torch.no_grad()
def follow(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``teacher <- momentum * teacher + (1 - momentum) * student`` on the parameters (lightly's
    ``update_momentum``, as BYOL, MoCo and DINO do). The teacher runs in training mode, so its
    BatchNorm normalises with batch statistics; its running statistics are never used."""
    update_momentum(student, teacher, momentum)
