"""Barlow Twins (Zbontar et al. 2021, "Self-Supervised Learning via Redundancy Reduction"): the
cross-correlation matrix of the two views' batch-standardised projections is driven to the identity:
``sum_i (1 - C_ii)^2 + lambda sum_{i != j} C_ij^2`` (Eq. 1), lightly's ``BarlowTwinsLoss``."""

from __future__ import annotations

import torch
from lightly.loss import BarlowTwinsLoss
from lightly.models.modules import BarlowTwinsProjectionHead
from pydantic import Field
from torch import nn

from ssl_pretrain.methods.base import Method, MethodSettings, per_view

NAME = "barlowtwins"
SUMMARY = "cross-correlation of the two views driven to the identity"


class Settings(MethodSettings):
    hidden_dim: int = Field(2048, ge=1)
    output_dim: int = Field(2048, ge=1)
    """3-layer projector; the paper's 8192 is for ImageNet, 2048 is solo-learn's CIFAR setting."""
    lambda_param: float = Field(0.005, gt=0)
    """Weight of the off-diagonal terms (Sec. 2: 5e-3)."""


class BarlowTwins(Method):
    def __init__(self, backbone: nn.Module, feature_dim: int, settings: Settings, gather_distributed: bool = False):
        super().__init__(backbone, feature_dim)
        self.projection_head = BarlowTwinsProjectionHead(feature_dim, settings.hidden_dim, settings.output_dim)
        # gather_distributed: the cross-correlation is over the global batch (lightly all-reduces it)
        self.criterion = BarlowTwinsLoss(lambda_param=settings.lambda_param, gather_distributed=gather_distributed)

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        projections_a, projections_b = per_view(lambda images: self.projection_head(self.backbone(images)), views)
        return self.criterion(projections_a.float(), projections_b.float())


build = BarlowTwins
