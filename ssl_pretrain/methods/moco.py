"""MoCo v2 (He et al. 2020, "Momentum Contrast"; Chen et al. 2020, "Improved Baselines with Momentum
Contrastive Learning"): a query encoder is trained with InfoNCE against the key from a momentum
encoder of the other view, the negatives drawn from a queue of past keys. Symmetrised over the two
views, as in the authors' CIFAR-10 demo and solo-learn's MoCo v2+: both directions are scored against
the same queue of past keys, then this step's keys are enqueued (lightly's ``MemoryBankModule``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightly.models.modules import MoCoProjectionHead
from lightly.models.modules.memory_bank import MemoryBankModule
from pydantic import Field
from torch import nn

from ssl_pretrain.methods.base import Method, MethodSettings, cosine_momentum, follow, momentum_copy, per_view

NAME = "moco"
SUMMARY = "contrastive, momentum key encoder and a queue of negatives (MoCo v2)"


class Settings(MethodSettings):
    hidden_dim: int = Field(2048, ge=1)
    output_dim: int = Field(128, ge=1)
    """MoCo v2's 2-layer MLP head, 128-d output."""
    temperature: float = Field(0.2, gt=0)
    """MoCo v2: 0.2."""
    queue_size: int = Field(4096, ge=1)
    """Negatives kept from past batches: 65,536 on ImageNet in the paper; 4,096 in lightly's CIFAR-10
    benchmark (a queue of 50,000 CIFAR images' keys would hold keys from a much older encoder)."""
    momentum: float = Field(0.99, ge=0, le=1)
    """Key encoder momentum at the start, cosine to 1: the paper's 0.999 is for 200 ImageNet
    epochs; 0.99 is solo-learn's CIFAR setting."""


class MoCo(Method):
    def __init__(self, backbone: nn.Module, feature_dim: int, settings: Settings, gather_distributed: bool = False):
        super().__init__(backbone, feature_dim)
        self.projection_head = MoCoProjectionHead(feature_dim, settings.hidden_dim, settings.output_dim)
        self.key_backbone = momentum_copy(backbone)
        self.key_projection_head = momentum_copy(self.projection_head)
        self.base_momentum = settings.momentum
        self.temperature = settings.temperature
        # gather_distributed: every rank enqueues the keys of all ranks
        self.queue = MemoryBankModule((settings.queue_size, settings.output_dim), gather_distributed=gather_distributed,
                                      feature_dim_first=False)
        # lightly keeps the queue out of the state dict; a resumed run must continue with the same
        # negatives, so the queue and its pointer travel in the checkpoint
        self.queue.register_buffer("bank", self.queue.bank, persistent=True)
        self.queue.register_buffer("bank_ptr", self.queue.bank_ptr, persistent=True)

    def info_nce(self, queries: torch.Tensor, keys: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
        """MoCo's Algorithm 1: ``-log exp(q.k+/T) / (exp(q.k+/T) + sum_queue exp(q.k-/T))``, unit vectors.

        Shape: queries, keys ``(B, D)``; negatives ``(K, D)``, already unit length.
        """
        queries, keys = F.normalize(queries, dim=1), F.normalize(keys, dim=1)
        positives = (queries * keys).sum(dim=1, keepdim=True)
        logits = torch.cat([positives, queries @ negatives.T], dim=1) / self.temperature
        return F.cross_entropy(logits, torch.zeros(len(queries), dtype=torch.long, device=queries.device))

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        queries = self.projections(views)
        with torch.no_grad():
            keys = per_view(lambda images: self.key_projection_head(self.key_backbone(images)), views)
        queries = [q.float() for q in queries]
        keys = [F.normalize(k.float(), dim=1) for k in keys]
        # both directions against the queue of earlier batches' keys; then this step's keys join it
        _, negatives = self.queue(keys[1], update=False)
        loss = 0.5 * (self.info_nce(queries[0], keys[1], negatives) + self.info_nce(queries[1], keys[0], negatives))
        for enqueued in (keys[1], keys[0]):  # one call each: on several ranks, every rank's k2, then k1,
            self.queue(enqueued, update=True)  # as one process with the global batch would order them
        return loss

    def after_step(self, progress: float) -> None:
        momentum = cosine_momentum(self.base_momentum, progress)
        follow(self.key_backbone, self.backbone, momentum)
        follow(self.key_projection_head, self.projection_head, momentum)


build = MoCo
