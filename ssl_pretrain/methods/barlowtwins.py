"""Barlow Twins (Zbontar et al. 2021, "Self-Supervised Learning via Redundancy Reduction"): the
cross-correlation matrix of the two views' batch-standardised projections is driven to the identity:
``sum_i (1 - C_ii)^2 + lambda sum_{i != j} C_ij^2`` (Eq. 1), lightly's ``BarlowTwinsLoss``."""

from __future__ import annotations

import torch
from lightly.loss import BarlowTwinsLoss
from lightly.models.modules import BarlowTwinsProjectionHead
from lightly.utils.dist import gather, world_size
from pydantic import Field
from torch import nn

from ssl_pretrain.methods.base import Method, MethodSettings

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
        self.criterion = BarlowTwinsLoss(lambda_param=settings.lambda_param)
        # Distributed: the projections of every rank are gathered and each rank computes the loss
        # of the global batch, standardised with the global batch's statistics as in the authors'
        # code (whose SyncBatchNorm covers the standardising BatchNorm). lightly's own
        # gather_distributed standardises per rank and averages the correlation matrices: not the
        # global batch's loss.
        self.gather_distributed = gather_distributed

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        projections_a, projections_b = self.projections(views)
        if self.gather_distributed and world_size() > 1:
            # gather's backward sums every rank's gradient of this (identical) loss, DDP averages
            projections_a, projections_b = torch.cat(gather(projections_a)), torch.cat(gather(projections_b))
        return self.criterion(projections_a.float(), projections_b.float())


build = BarlowTwins
