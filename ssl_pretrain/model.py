"""SimCLR as a composition (lightly-style): backbone + projection head; the loss is separate."""

from __future__ import annotations

import torch
from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead
from torch import nn

from ssl_pretrain.backbones import build_backbone
from ssl_pretrain.config import LossConfig, ModelConfig


class SimCLR(nn.Module):
    """Backbone -> features -> 2-layer MLP head -> projections (Chen et al. 2020, Fig. 2)."""

    def __init__(self, backbone: nn.Module, feature_dim: int, hidden_dim: int, output_dim: int):
        super().__init__()
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.projection_head = SimCLRProjectionHead(feature_dim, hidden_dim, output_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Shape: ``(B, 3, H, W)`` -> projections ``(B, output_dim)``."""
        return self.projection_head(self.backbone(images))


def build_model(cfg: ModelConfig, small_stem: bool) -> SimCLR:
    backbone, feature_dim = build_backbone(cfg.backbone, small_stem)
    return SimCLR(backbone, feature_dim, cfg.proj_hidden_dim, cfg.proj_output_dim)


def build_loss(cfg: LossConfig, gather_distributed: bool = False) -> NTXentLoss:
    """NT-Xent (SimCLR eq. 1) from lightly: for a batch of B pairs, each view's positive is its
    partner and its 2B-2 negatives are the other views in the batch.

    ``gather_distributed``: the batch is the global one - each rank's views meet the negatives of
    every rank (lightly all-gathers them; its backward all-reduces the gradients, so with
    DistributedDataParallel's averaging each rank gets the gradient of the global mean loss).
    """
    return NTXentLoss(temperature=cfg.temperature, gather_distributed=gather_distributed)
