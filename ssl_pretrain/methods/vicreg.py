"""VICReg (Bardes et al. 2022, "Variance-Invariance-Covariance Regularization"): the two views'
projections are pulled together (invariance, mean squared error) while each dimension's standard
deviation over the batch is kept above 1 (variance) and the dimensions are decorrelated
(covariance): ``lambda s + mu v + nu c`` (Eq. 6), lightly's ``VICRegLoss``."""

from __future__ import annotations

import torch
from lightly.loss import VICRegLoss
from lightly.models.modules import BarlowTwinsProjectionHead
from pydantic import Field
from torch import nn

from ssl_pretrain.methods.base import Method, MethodSettings

NAME = "vicreg"
SUMMARY = "invariance + variance + covariance terms"


class Settings(MethodSettings):
    hidden_dim: int = Field(2048, ge=1)
    output_dim: int = Field(2048, ge=1)
    """3-layer expander (the paper's is 8192 wide on ImageNet; 2048 as solo-learn on CIFAR)."""
    invariance_weight: float = Field(25.0, ge=0)
    variance_weight: float = Field(25.0, ge=0)
    covariance_weight: float = Field(1.0, ge=0)
    """lambda = mu = 25, nu = 1 (Sec. 4.1)."""


class VICReg(Method):
    def __init__(self, backbone: nn.Module, feature_dim: int, settings: Settings, gather_distributed: bool = False):
        super().__init__(backbone, feature_dim)
        # VICReg's expander has the same shape as Barlow Twins' projector (Linear-BN-ReLU x2, Linear)
        self.projection_head = BarlowTwinsProjectionHead(feature_dim, settings.hidden_dim, settings.output_dim)
        self.criterion = VICRegLoss(lambda_param=settings.invariance_weight, mu_param=settings.variance_weight,
                                    nu_param=settings.covariance_weight, gather_distributed=gather_distributed)

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        projections_a, projections_b = self.projections(views)
        return self.criterion(projections_a.float(), projections_b.float())


build = VICReg
