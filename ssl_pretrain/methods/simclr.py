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
from torch.nn import functional as F

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
        self.temperature = settings.temperature
        # in one process, NT-Xent over every pair at once (the same loss and gradients, fewer ops);
        # across ranks, lightly's loss gathers the negatives
        self.fused = settings.loss == "ntxent" and not gather_distributed

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        projections = [p.float() for p in self.projections(views)]
        if self.fused:
            return multicrop_ntxent(projections, self.temperature)
        # the global pair, then each small crop against each full-size view (multi-crop)
        pairs = [(0, 1)] + [(g, v) for v in range(2, len(projections)) for g in (0, 1)]
        return sum(self.criterion(projections[a], projections[b]) for a, b in pairs) / len(pairs)


def multicrop_ntxent(projections: list[torch.Tensor], temperature: float) -> torch.Tensor:
    """NT-Xent averaged over the pairs of multi-crop: the global pair (views 0, 1) and every
    further view against each global view - with two views, SimCLR's loss. Equal (values and
    gradients) to the mean of lightly's ``NTXentLoss`` over those pairs, which for each pair forms
    four B x B products and masks them by indexing; here one product of the global views against
    all views, and one per extra view for its own block, serve every pair, which makes the loss and
    the multi-crop step cheaper (``scripts/bench_loss.py``; BENCHMARKS.md, "Pretraining throughput").

    For anchor i of view a paired with view b: ``-log(exp(s(a_i, b_i)) / sum over j of
    [exp(s(a_i, b_j)) + exp(s(a_i, a_j)) for j != i])``, ``s`` the cosine similarity / temperature;
    the mean over both directions of every pair and all anchors.

    Shape: ``projections[v]`` ``(B, D)``, at least two views.
    """
    views, batch = len(projections), projections[0].shape[0]
    z = F.normalize(torch.stack(projections), dim=-1)  # (V, B, D)
    # sims[g, v]: global view g's anchors (rows) against view v's images (columns)
    sims = (z[:2].flatten(0, 1) @ z.flatten(0, 1).T / temperature).view(2, batch, views, batch).transpose(1, 2)
    own = [sims[0, 0], sims[1, 1]]
    if views > 2:
        own += list((z[2:] @ z[2:].transpose(1, 2) / temperature).unbind())
    eye = torch.eye(batch, dtype=torch.bool, device=z.device)
    # each anchor's negatives within its own view (itself left out), log-summed
    own_lse = torch.logsumexp(torch.stack(own).masked_fill(eye, float("-inf")), dim=-1)  # (V, B)
    positives = sims.diagonal(dim1=-2, dim2=-1)  # (2, V, B)
    # anchors in a global view against its partner's images (rows), and anchors in view v against
    # a global view's images (columns of the same block: the similarity is symmetric)
    rows = torch.logaddexp(torch.logsumexp(sims, dim=-1), own_lse[:2, None]) - positives
    cols = torch.logaddexp(torch.logsumexp(sims, dim=-2), own_lse[None]) - positives
    partner = ~torch.eye(2, views, dtype=torch.bool, device=z.device)  # global anchors: every other view
    extra = torch.zeros(2, views, dtype=torch.bool, device=z.device)
    extra[:, 2:] = True  # the extra views' anchors: against both global views
    return (rows[partner].sum() + cols[extra].sum()) / (batch * int(partner.sum() + extra.sum()))


build = SimCLR
