"""SimCLR (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual Representations"):
backbone -> 2-layer MLP head -> NT-Xent between the two views of each image, the other 2B-2 views
of the batch as negatives (lightly's ``SimCLRProjectionHead`` and ``NTXentLoss``)."""

from __future__ import annotations

import torch
from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead
from pydantic import Field
from torch import nn

from ssl_pretrain.methods.base import Method, MethodSettings

NAME = "simclr"
SUMMARY = "contrastive, in-batch negatives (NT-Xent)"


class Settings(MethodSettings):
    temperature: float = Field(0.5, gt=0)
    """NT-Xent temperature: 0.5 is the paper's best for CIFAR-10 (Appendix B.9) and lightly's
    default; the paper uses 0.1 for ImageNet (Table 5)."""
    hidden_dim: int = Field(2048, ge=1)
    output_dim: int = Field(128, ge=1)
    """2-layer MLP head, 128-d output (Section 4.2)."""


class SimCLR(Method):
    def __init__(self, backbone: nn.Module, feature_dim: int, settings: Settings, gather_distributed: bool = False):
        super().__init__(backbone, feature_dim)
        self.projection_head = SimCLRProjectionHead(feature_dim, settings.hidden_dim, settings.output_dim)
        # gather_distributed: each rank's views meet the negatives of every rank (lightly
        # all-gathers them; its backward all-reduces the gradients, so with DDP's averaging each
        # rank gets the gradient of the global mean loss)
        self.criterion = NTXentLoss(temperature=settings.temperature, gather_distributed=gather_distributed)

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        projections_a, projections_b = self.projections(views)
        return self.criterion(projections_a.float(), projections_b.float())


build = SimCLR
