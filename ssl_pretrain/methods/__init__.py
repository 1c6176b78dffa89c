"""The pretraining methods, by name: ``method: byol`` in a config, ``--set method=byol`` on the
command line, ``ssl-pretrain --list-methods`` to see them.

Each method is one file: a ``Settings`` section (its hyper-parameters, with their sources), a
``Method`` module built from a backbone (``forward(views) -> loss``, ``after_step(progress)``) and
``NAME``. Adding a method means adding its file and its line below.
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING

from ssl_pretrain.methods import barlowtwins, byol, dino, mae, moco, simclr, simsiam, vicreg
from ssl_pretrain.methods.base import Method

if TYPE_CHECKING:
    from ssl_pretrain.config import Config

METHODS: dict[str, ModuleType] = {
    module.NAME: module for module in (simclr, moco, byol, simsiam, barlowtwins, vicreg, dino, mae)
}
"""Name -> module with ``NAME``, ``SUMMARY``, ``Settings`` and
``build(backbone, feature_dim, settings, gather_distributed)``; optionally ``LOCAL_VIEWS`` (takes
multi-crop views) and ``BACKBONES`` (the only backbones it trains)."""


def build_model(cfg: "Config", gather_distributed: bool = False) -> Method:
    """The configured method (``cfg.method``, its section's settings) around the configured backbone.

    ``gather_distributed``: in a distributed run, losses over the batch (negatives, cross-
    correlations, queues) see the global batch.
    """
    from ssl_pretrain.models.backbones import build_backbone, resolve_small_stem

    small_stem = resolve_small_stem(cfg.model.small_stem, cfg.augment.input_size)
    backbone, feature_dim = build_backbone(cfg.model.backbone, small_stem, cfg.augment.input_size)
    return METHODS[cfg.method].build(backbone, feature_dim, cfg.method_settings, gather_distributed)
