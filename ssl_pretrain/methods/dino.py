"""DINO (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers"): a student
matches the softmax output of a momentum teacher on the other views (cross-entropy, Algorithm 1);
the teacher's outputs are centred (a running mean) and sharpened (a low temperature, warmed up)
to avoid collapse. lightly's ``DINOProjectionHead`` and ``DINOLoss``."""

from __future__ import annotations

import math
from typing import Optional

import torch
from lightly.loss import DINOLoss
from lightly.models.modules import DINOProjectionHead
from lightly.models.utils import deactivate_requires_grad
from pydantic import Field, model_validator
from torch import nn

from ssl_pretrain.methods.base import Method, MethodSettings, cosine_momentum, follow, momentum_copy, per_view

NAME = "dino"
LOCAL_VIEWS = True  # multi-crop: augment.local_views small crops pass through the student only
SUMMARY = "self-distillation from a momentum teacher, centred and sharpened"


class Settings(MethodSettings):
    hidden_dim: int = Field(2048, ge=1)
    bottleneck_dim: int = Field(256, ge=1)
    output_dim: int = Field(4096, ge=1)
    """Head 2048 -> 256 -> K prototypes: K = 65,536 in the paper (ImageNet), 4,096 in solo-learn's
    CIFAR setting (and 16x cheaper on a CPU)."""
    student_temperature: float = Field(0.1, gt=0)
    teacher_temperature: float = Field(0.04, gt=0)
    warmup_teacher_temperature: float = Field(0.04, gt=0)
    teacher_warmup_fraction: float = Field(0.1, ge=0, le=1)
    """Teacher temperature from ``warmup_teacher_temperature`` to ``teacher_temperature``, linearly
    over the first 10% of training; student 0.1 (Sec. 3.1). 0.04 throughout is the authors' code's
    default (main_dino.py: "anything above 0.07 is unstable... start with 0.04") and lightly's; the
    paper's 0.04 -> 0.07 is for ViT-S/16 over 300 epochs; in short CPU trials it collapsed to the
    uniform output (loss ln K) where 0.04 learnt (BENCHMARKS.md, "Methods at one CPU budget")."""
    batch_norm: bool = False
    """BatchNorm in the head's MLP: off in the paper (ViT), on in lightly's ResNet CIFAR-10 benchmark."""
    freeze_last_layer_fraction: float = Field(0.0, ge=0, le=1)
    """The head's last layer gets no update over this fraction of training (the paper: the first
    epoch of 100-800, for stability); 0: off."""
    center_momentum: float = Field(0.9, ge=0, lt=1)
    momentum: float = Field(0.996, ge=0, le=1)
    """Teacher momentum at the start, cosine to 1 (paper: 0.996)."""

    @model_validator(mode="after")
    def _temperatures(self) -> "Settings":
        if self.warmup_teacher_temperature > self.teacher_temperature:
            raise ValueError("warmup_teacher_temperature must not exceed teacher_temperature")
        return self


class DINO(Method):
    def __init__(self, backbone: nn.Module, feature_dim: int, settings: Settings, gather_distributed: bool = False):
        super().__init__(backbone, feature_dim)
        head = lambda: DINOProjectionHead(feature_dim, settings.hidden_dim, settings.bottleneck_dim,  # noqa: E731
                                          settings.output_dim, batch_norm=settings.batch_norm)
        self.projection_head = head()
        self.teacher_backbone = momentum_copy(backbone)
        # the head's weight-normalised last layer cannot be deep-copied: a second one takes its weights
        self.teacher_projection_head = head()
        self.teacher_projection_head.load_state_dict(self.projection_head.state_dict())
        deactivate_requires_grad(self.teacher_projection_head)
        self.settings = settings
        # the centre is all-reduced over ranks by lightly when distributed; it is a buffer, so it
        # travels in the checkpoint
        self.criterion = DINOLoss(output_dim=settings.output_dim, student_temp=settings.student_temperature,
                                  teacher_temp=settings.teacher_temperature,
                                  warmup_teacher_temp=settings.warmup_teacher_temperature,
                                  center_momentum=settings.center_momentum)
        self.register_buffer("progress", torch.zeros(()))  # for the teacher temperature; resumed with the run

    def teacher_temperature(self) -> float:
        s = self.settings
        if s.teacher_warmup_fraction == 0 or float(self.progress) >= s.teacher_warmup_fraction:
            return s.teacher_temperature
        ramp = float(self.progress) / s.teacher_warmup_fraction
        return s.warmup_teacher_temperature + ramp * (s.teacher_temperature - s.warmup_teacher_temperature)

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        student = self.projections(views)
        with torch.no_grad():  # only the 2 global views pass through the teacher
            teacher = per_view(lambda images: self.teacher_projection_head(self.teacher_backbone(images)), views[:2])
        dtype = self.criterion.center.dtype  # float32 (bf16 autocast outputs are cast up to it)
        return self.criterion([t.to(dtype) for t in teacher], [s.to(dtype) for s in student],
                              teacher_temp=self.teacher_temperature())

    def before_optimizer_step(self, progress: float) -> None:
        if progress < self.settings.freeze_last_layer_fraction:
            for param in self.projection_head.last_layer.parameters():
                param.grad = None  # no update (nor weight decay) for this step

    def after_step(self, progress: float) -> None:
        self.progress.fill_(progress)
        momentum = cosine_momentum(self.settings.momentum, progress)
        follow(self.teacher_backbone, self.backbone, momentum)
        follow(self.teacher_projection_head, self.projection_head, momentum)

    def collapse_message(self, epoch_loss: float) -> Optional[str]:
        uniform = math.log(self.settings.output_dim)  # the cross-entropy of two uniform distributions
        if epoch_loss > uniform * (1 - 1e-3):
            return (f"the loss is {epoch_loss:.4f}, at ln(output_dim) = {uniform:.4f}: teacher and student output "
                    "the uniform distribution for every image (collapse); the usual cause is a teacher temperature "
                    f"too high for the run (dino.teacher_temperature {self.settings.teacher_temperature:g}; 0.04 "
                    "learnt where 0.07 collapsed)")
        return None


build = DINO
