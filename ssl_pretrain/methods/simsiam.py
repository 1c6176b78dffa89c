"""SimSiam (Chen & He 2021, "Exploring Simple Siamese Representation Learning"): BYOL without the
momentum target - the stop-gradient alone prevents collapse. Loss: ``D(p1, sg(z2))/2 +
D(p2, sg(z1))/2`` with ``D`` the negative cosine similarity (Algorithm 1)."""

from __future__ import annotations

from typing import Optional

import torch
from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules import SimSiamPredictionHead, SimSiamProjectionHead
from pydantic import Field
from torch import nn

from ssl_pretrain.methods.base import Method, MethodSettings, cosine_collapse_message

NAME = "simsiam"
SUMMARY = "predict the other view's projection under a stop-gradient, no momentum"


class Settings(MethodSettings):
    output_dim: int = Field(2048, ge=1)
    """3-layer projection MLP with 2048-d output (Sec. 4, CIFAR: Appendix D)."""
    prediction_hidden_dim: int = Field(512, ge=1)
    """The prediction MLP's bottleneck: 512 = output/4 (Sec. 4)."""


class SimSiam(Method):
    def __init__(self, backbone: nn.Module, feature_dim: int, settings: Settings, gather_distributed: bool = False):
        super().__init__(backbone, feature_dim)
        self.projection_head = SimSiamProjectionHead(feature_dim, settings.output_dim, settings.output_dim)
        self.prediction_head = SimSiamPredictionHead(settings.output_dim, settings.prediction_hidden_dim,
                                                     settings.output_dim)
        self.criterion = NegativeCosineSimilarity()

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        projections = self.projections(views)
        projections = [z.float() for z in projections]
        predictions = [self.prediction_head(z) for z in projections]
        return 0.5 * (self.criterion(predictions[0], projections[1].detach())
                      + self.criterion(predictions[1], projections[0].detach()))

    def collapse_message(self, epoch_loss: float) -> Optional[str]:
        return cosine_collapse_message(epoch_loss)

build = SimSiam
