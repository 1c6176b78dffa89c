"""The pretraining methods, by name: ``method: byol`` in a config, ``--set method=byol`` on the
command line, ``ssl-pretrain --list-methods`` to see them.

Each method is one file in this package, found here by its ``NAME`` (no list to edit): a
``Settings`` section (its hyper-parameters, with their sources; it becomes the config section of
the same name), ``build(backbone, feature_dim, settings, gather_distributed)`` returning a
``Method`` (``forward(views) -> loss``, ``after_step(progress)``), ``NAME`` and ``SUMMARY``;
optionally ``LOCAL_VIEWS = True`` (takes multi-crop views) and ``BACKBONES`` (the only backbones it
trains). CONTRIBUTING.md walks through adding one.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

from ssl_pretrain.methods.base import Method
from ssl_pretrain.models.backbones import build_backbone, resolve_small_stem

DEFAULT_METHOD = "simclr"
"""What a config without ``method`` trains: SimCLR, the method the presets were measured with."""


def _discover_methods() -> dict[str, ModuleType]:
    """Every module of this package that defines ``NAME``: the default first, then by name (the
    order ``--list-methods`` prints)."""
    found = {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "NAME"):
            found[module.NAME] = module
    return {name: found[name] for name in sorted(found, key=lambda name: (name != DEFAULT_METHOD, name))}


METHODS: dict[str, ModuleType] = _discover_methods()
"""Name -> module with ``NAME``, ``SUMMARY``, ``Settings`` and
``build(backbone, feature_dim, settings, gather_distributed)``; optionally ``LOCAL_VIEWS`` (takes
multi-crop views) and ``BACKBONES`` (the only backbones it trains)."""


def build_model(cfg, gather_distributed: bool = False) -> Method:
    """The configured method (``cfg.method``, its section's settings) around the configured backbone.

    Args:
        cfg: the run's ``ssl_pretrain.config.Config`` (its ``method``, ``model`` and ``augment``).
        gather_distributed: in a distributed run, losses over the batch (negatives, cross-
            correlations, queues) see the global batch.
    """
    small_stem = resolve_small_stem(cfg.model.small_stem, cfg.augment.input_size)
    backbone, feature_dim = build_backbone(cfg.model.backbone, small_stem, cfg.augment.input_size)
    return METHODS[cfg.method].build(backbone, feature_dim, cfg.method_settings, gather_distributed)
