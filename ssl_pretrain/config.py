"""One typed config for a pretraining run: the sections of ``ssl_pretrain.settings`` plus one
section per method (each method's ``Settings``), and ``load_config``, which reads a preset
(``ssl_pretrain.presets``) and validates it.

Every default lives in the schema and names its source. A YAML preset from ``configs/`` is read on
top of these defaults, then ``--set section.key=value`` overrides on top of that. Unknown or
mistyped keys are rejected with a one-line message that names the key (nanoGPT-style: fail loudly).
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any, Optional

import torch
from pydantic import BaseModel, ValidationError, create_model, field_validator, model_validator

from ssl_pretrain import precision
from ssl_pretrain.methods import DEFAULT_METHOD, METHODS
from ssl_pretrain.models.backbones import input_multiple, resolve_small_stem
from ssl_pretrain.presets import apply_override, merge_preset, parse_override
from ssl_pretrain.settings import (AugmentConfig, ConfigError, DataConfig, ModelConfig, MonitorConfig, OptimConfig,
                                   Section, TrainConfig)


class _ConfigBase(Section):
    variant: Optional[str] = None
    """The preset variant ``load_config`` applied for this hardware (informational; set by it)."""
    recipe: Optional[str] = None
    """The method whose preset recipe ``load_config`` applied (informational; set by it)."""
    recipe_sections: list[str] = []
    """Where that recipe was read: ``recipes.METHOD``, ``variants.CONDITION.recipes.METHOD``
    (informational; set by ``load_config``)."""
    survey: Optional[str] = None
    """What the data, the machine and the ``--init`` weights looked like, where the settings were
    chosen from them (``ssl-pretrain`` without ``--config``; ``ssl_pretrain.recipe``; informational)."""
    survey_choices: dict[str, str] = {}
    """Each setting chosen from that survey -> why (informational; set by ``ssl_pretrain.recipe``)."""
    survey_advice: list[str] = []
    """Warnings, with their fixes, that the survey gave (``ssl_pretrain.recipe.advise``; informational)."""
    method: str = DEFAULT_METHOD
    """The pretraining method (``ssl_pretrain.methods``; ``ssl-pretrain --list-methods``). Its
    hyper-parameters are in the section of the same name (``simclr.temperature``, ``byol.momentum``)."""
    data: DataConfig = DataConfig()
    augment: AugmentConfig = AugmentConfig()
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    monitor: MonitorConfig = MonitorConfig()

    @field_validator("method")
    @classmethod
    def _known_method(cls, name: str) -> str:
        if name not in METHODS:
            raise ValueError(f"unknown method; available: {', '.join(METHODS)}")
        return name

    @model_validator(mode="after")
    def _views_fit_the_method(self) -> "_ConfigBase":
        if self.augment.local_views and not getattr(METHODS[self.method], "LOCAL_VIEWS", False):
            takers = [name for name, module in METHODS.items() if getattr(module, "LOCAL_VIEWS", False)]
            raise ValueError(f"augment.local_views (multi-crop) is used by {', '.join(takers)} only; "
                             f"method {self.method} trains on two views")
        return self

    @model_validator(mode="after")
    def _backbone_fits_the_method(self) -> "_ConfigBase":
        fitting = getattr(METHODS[self.method], "BACKBONES", None)  # e.g. MAE masks ViT patch tokens
        if fitting is not None and self.model.backbone not in fitting:
            raise ValueError(f"method {self.method} trains only the backbones {', '.join(fitting)}; "
                             f"model.backbone is {self.model.backbone}")
        # a ViT's patches must tile every view it is fed, DINO's local crops included
        patch = input_multiple(self.model.backbone, resolve_small_stem(self.model.small_stem, self.augment.input_size))
        sizes = {"input_size": self.augment.input_size}
        if self.augment.local_views:
            sizes["local_size"] = self.augment.local_size
        for key, size in sizes.items():
            if size % patch:
                raise ValueError(f"augment.{key} {size} px is not a multiple of the {self.model.backbone} "
                                 f"patch size, {patch} px")
        return self

    @property
    def method_settings(self) -> BaseModel:
        """The section of the selected method (``cfg.simclr`` when ``method`` is simclr)."""
        return getattr(self, self.method)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (lists, not tuples) that YAML and ``torch.load(weights_only=True)`` accept."""
        return _tuples_to_lists(self.model_dump())


# One section per method, named after it, with the method's own defaults (each method's file).
Config = create_model(
    "Config", __base__=_ConfigBase, __doc__="One pretraining run's settings; every default names its source.",
    **{name: (module.Settings, module.Settings()) for name, module in METHODS.items()},
)

MOVED_KEYS = {
    "loss.temperature": "simclr.temperature",
    "model.proj_hidden_dim": "simclr.hidden_dim",
    "model.proj_output_dim": "simclr.output_dim",
}
"""Keys that have moved to a method's section (``--set loss.temperature`` names the new key)."""


def _tuples_to_lists(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _tuples_to_lists(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_tuples_to_lists(item) for item in value]
    return value


def _allowed_keys(loc: tuple) -> list[str]:
    model: Any = Config
    for part in loc[:-1]:
        field = model.model_fields.get(part)
        if field is None or not isinstance(field.annotation, type):
            return []
        model = field.annotation
    return list(model.model_fields) if hasattr(model, "model_fields") else []


def _format_validation_error(error: ValidationError, origin: str) -> str:
    first = error.errors()[0]
    key = ".".join(str(part) for part in first["loc"])
    given = first.get("input") if isinstance(first.get("input"), dict) else {}
    for moved in [key, *(f"{key}.{sub}" for sub in given)]:  # a removed section reports only its name
        if moved in MOVED_KEYS:
            return f"{origin}: config key '{moved}' is now '{MOVED_KEYS[moved]}'"
    if first["type"] == "extra_forbidden":
        allowed = _allowed_keys(first["loc"])
        close = difflib.get_close_matches(str(first["loc"][-1]), allowed, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; allowed: {', '.join(allowed)}"
        return f"{origin}: unknown config key '{key}'{hint}"
    return f"{origin}: bad value for '{key}': {first['msg']} (got {first.get('input')!r})"


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = (),
                base: Optional[dict[str, Any]] = None) -> Config:
    """Defaults, then ``base`` (dotted keys: the recipe ``ssl_pretrain.recipe`` chose from the
    data), then the YAML file at ``path``, then its ``variants:`` entry that fits this
    hardware (if any), then its ``recipes:`` entry for the method, then ``KEY=VALUE`` overrides.

    A preset may start from another: ``extends: OTHER.yaml`` (a path relative to the preset's
    folder) reads OTHER first and lays this file's sections over it, key by key (its variants and
    recipes too), so a preset for another kind of data changes only what differs.

    A preset may hold ``variants: {CONDITION: {dotted.key: value, ...}}``, CONDITION one of
    ``ssl_pretrain.presets.VARIANT_CONDITIONS``: settings measured to be better where that
    condition holds (the CPU preset trains a narrower network where training runs in fp32). It may
    hold ``recipes: {METHOD: {dotted.key: value, ...}}``: what a method needs beyond the preset's
    shared settings (its optimiser, learning rate, crops), applied when that method is trained. A
    variant may hold ``recipes:`` too, applied after the preset's for that method where the variant
    applies (the CPU preset's fp32 variant gives SimCLR multi-crop). ``--set`` still wins.

    Raises:
        ConfigError: a missing or malformed file, an unknown key or a bad value (one line).
    """
    user = [parse_override(text) for text in overrides]
    tree, origin = merge_preset(None if path is None else Path(path), user,
                                Config.model_fields["method"].default, _base_network_probe, base)
    try:
        return Config.model_validate(tree)
    except ValidationError as error:
        raise ConfigError(_format_validation_error(error, origin)) from None


def _base_network_probe(tree: dict, user: list, device: str):
    """``(probe, workload)`` of the network the config describes without its variants (None, ""
    when that config is not valid: the error comes from validation later, in one line)."""
    base = copy.deepcopy(tree)
    try:
        for parts, value in user:
            apply_override(base, parts, value)
        cfg = Config.model_validate(base)
    except (ConfigError, ValidationError):
        return None, ""
    channels_last = cfg.train.channels_last if cfg.train.channels_last is not None else device != "mps"
    torch_device = torch.device("cpu" if device == "auto" else device)  # only CPUs are probed
    # looked up when called, so that a test can stand in for the timing
    return (lambda: precision.probe_precisions(cfg, torch_device, channels_last)), \
        precision.probe_workload(cfg, channels_last)
