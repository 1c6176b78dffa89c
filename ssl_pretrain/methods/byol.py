"""BYOL (Grill et al. 2020, "Bootstrap Your Own Latent"): an online network (backbone -> projection
-> prediction) predicts a momentum target network's projection of the other view; no negatives.
Loss: the paper's ``2 - 2 cos(p, z')`` over both directions (Eq. 2) written as lightly's benchmark
does, the mean of the two directions' negative cosine similarity: the paper's gradient scaled by
1/4, the scale at which lightly's CIFAR-10 table (91.0% kNN, SGD 0.06 x bs/128) was measured. The target follows the online weights with a cosine momentum schedule."""

from __future__ import annotations

from typing import Optional

import torch
from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
from pydantic import Field
from torch import nn

from ssl_pretrain.methods.base import Method, MethodSettings, cosine_collapse_message, cosine_momentum, follow, momentum_copy, per_view

NAME = "byol"
SUMMARY = "predict a momentum target's projection, no negatives"


class Settings(MethodSettings):
    hidden_dim: int = Field(4096, ge=1)
    output_dim: int = Field(256, ge=1)
    """Projection and prediction MLPs 4096 -> 256 (Sec. 3.3)."""
    momentum: float = Field(0.99, ge=0, le=1)
    """Target momentum at the start, cosine to 1 (Sec. 3.2): the paper's 0.996 is for 1,000
    ImageNet epochs; 0.99 is solo-learn's CIFAR setting, and suits short runs."""


class BYOL(Method):
    def __init__(self, backbone: nn.Module, feature_dim: int, settings: Settings, gather_distributed: bool = False):
        super().__init__(backbone, feature_dim)
        self.projection_head = BYOLProjectionHead(feature_dim, settings.hidden_dim, settings.output_dim)
        self.prediction_head = BYOLPredictionHead(settings.output_dim, settings.hidden_dim, settings.output_dim)
        self.target_backbone = momentum_copy(backbone)
        self.target_projection_head = momentum_copy(self.projection_head)
        self.base_momentum = settings.momentum
        self.criterion = NegativeCosineSimilarity()  # per-sample: nothing to gather across ranks

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        predictions = per_view(lambda images: self.prediction_head(self.projection_head(self.backbone(images))), views)
        with torch.no_grad():
            targets = per_view(lambda images: self.target_projection_head(self.target_backbone(images)), views)
        predictions = [p.float() for p in predictions]
        targets = [t.float() for t in targets]
        return 0.5 * (self.criterion(predictions[0], targets[1]) + self.criterion(predictions[1], targets[0]))

    def after_step(self, progress: float) -> None:
        momentum = cosine_momentum(self.base_momentum, progress)
        follow(self.target_backbone, self.backbone, momentum)
        follow(self.target_projection_head, self.projection_head, momentum)

    def collapse_message(self, epoch_loss: float) -> Optional[str]:
        return cosine_collapse_message(epoch_loss)

build = BYOL
