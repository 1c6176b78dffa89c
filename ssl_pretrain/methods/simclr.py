"""SimCLR (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual Representations"):
backbone -> 2-layer MLP head -> NT-Xent between the two views of each image, the other 2B-2 views
of the batch as negatives (lightly's ``SimCLRProjectionHead`` and ``NTXentLoss``).

Options: the decoupled loss (``loss: dcl``, Yeh et al. 2022, "Decoupled Contrastive Learning":
the positive pair leaves the denominator; lightly's ``DCLLoss``) and multi-crop
(``augment.local_views``: the multi-crop of SwAV, Caron et al. 2020, which that paper also applies
to SimCLR - each small crop is a positive of both full-size views; the loss is the mean NT-Xent
over those pairs and the global pair)."""

from __future__ import annotations

from typing import Literal

import torch
from lightly.loss import DCLLoss, NTXentLoss
from lightly.models.modules import SimCLRProjectionHead
from pydantic import Field
from torch import nn

from ssl_pretrain.methods.base import Method, MethodSettings

NAME = "simclr"
LOCAL_VIEWS = True  # multi-crop: each small crop is paired with both full-size views
SUMMARY = "contrastive, in-batch negatives (NT-Xent)"


class Settings(MethodSettings):
    temperature: float = Field(0.5, gt=0)
    """NT-Xent temperature: 0.5 is the paper's best for CIFAR-10 (Appendix B.9) and lightly's
    default; the paper uses 0.1 for ImageNet (Table 5)."""
    hidden_dim: int = Field(2048, ge=1)
    output_dim: int = Field(128, ge=1)
    """2-layer MLP head, 128-d output (Section 4.2)."""
    loss: Literal["ntxent", "dcl"] = "ntxent"
    """``ntxent``: the paper's; ``dcl``: the decoupled contrastive loss (the positive pair removed
    from NT-Xent's denominator, Yeh et al. 2022, Eq. 6), same cost."""


class SimCLR(Method):
    def __init__(self, backbone: nn.Module, feature_dim: int, settings: Settings, gather_distributed: bool = False):
        super().__init__(backbone, feature_dim)
        self.projection_head = SimCLRProjectionHead(feature_dim, settings.hidden_dim, settings.output_dim)
        # gather_distributed: each rank's views meet the negatives of every rank (lightly
        # all-gathers them; its backward all-reduces the gradients, so with DDP's averaging each
        # rank gets the gradient of the global mean loss)
        loss = NTXentLoss if settings.loss == "ntxent" else DCLLoss
        self.criterion = loss(temperature=settings.temperature, gather_distributed=gather_distributed)

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        projections = [p.float() for p in self.projections(views)]
        # the global pair, then each small crop against each full-size view (multi-crop)
        pairs = [(0, 1)] + [(g, v) for v in range(2, len(projections)) for g in (0, 1)]
        return sum(self.criterion(projections[a], projections[b]) for a, b in pairs) / len(pairs)


build = SimCLR
