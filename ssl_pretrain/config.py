"""One typed config for a pretraining run.

Every default lives here and names its source. A YAML preset from ``configs/`` is read on top of
these defaults, then ``--set section.key=value`` overrides on top of that. Unknown or mistyped
keys are rejected with a one-line message that names the key (nanoGPT-style: fail loudly).
"""

from __future__ import annotations

import copy

import difflib
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from ssl_pretrain.methods import METHODS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ConfigError(ValueError):
    """A config that cannot be used; the message is one line and names the offending key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    source: Optional[str] = None
    """Folder (scanned recursively), text file of paths, ``builtin:digits[:train|:test]``,
    or a torchvision dataset on disk: ``cifar10:ROOT``, ``cifar100:ROOT``, ``stl10:ROOT``."""
    download: bool = False
    """Let torchvision download ``cifar10:``/``cifar100:``/``stl10:`` if missing (needs internet)."""
    pipeline: Literal["auto", "pil", "tensor"] = "auto"
    """``tensor``: decode every image once into memory and augment whole batches on the training
    device (fast; images of one size up to 64 px, at most 8 GB decoded). ``pil``: per-image
    lightly/PIL transforms in data-loader workers (any size, streams from disk). ``auto``: tensor
    when the images are that small and take under 2 GB decoded (CIFAR-10: 150 MB), else pil."""
    num_workers: int | Literal["auto"] = "auto"
    """Data loader processes; ``auto`` = one per core beyond the training thread, at most 8."""
    max_images: Optional[int] = Field(None, ge=1)
    """Use a fixed random subset of this many images (quick trials, tests); default: all."""
    max_image_pixels: int = 89_478_485
    """Images with more pixels are skipped as decompression bombs (Pillow's own limit)."""


class AugmentConfig(_Section):
    """SimCLR augmentations (Chen et al. 2020, Appendix A) through ``lightly.transforms``.

    ``recipe`` picks the defaults; any field set explicitly wins over the recipe.
    cifar: crop scale 0.08-1, colour jitter strength 0.5, no blur (SimCLR Appendix B.9).
    imagenet: crop scale 0.08-1, colour jitter strength 1.0, blur with p=0.5 (SimCLR Appendix A).
    """

    recipe: Literal["cifar", "imagenet"] = "cifar"
    input_size: Optional[int] = None
    min_scale: float = 0.08
    cj_prob: float = 0.8
    cj_strength: Optional[float] = None
    gray_prob: float = 0.2
    blur_prob: Optional[float] = None
    hflip_prob: float = 0.5
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    local_views: int = Field(0, ge=0)
    """Multi-crop (SwAV, Caron et al. 2020, Sec. 3.2; DINO): this many small crops of every image on
    top of the two full-size views, for the methods that use them (dino: DINO uses 6-10; simclr). The
    in-memory batch pipeline makes them (images up to 64 px)."""
    local_size: Optional[int] = None
    """Side of the local crops; default 3/7 of ``input_size`` (DINO's 96 px of 224), at least 8."""
    local_scale: tuple[float, float] = (0.05, 0.4)
    """Area range of the local crops (DINO: 0.05-0.4; it then crops the global views at 0.4-1,
    ``min_scale: 0.4``)."""

    @model_validator(mode="after")
    def _fill_from_recipe(self) -> "AugmentConfig":
        recipe = {
            "cifar": {"input_size": 32, "cj_strength": 0.5, "blur_prob": 0.0},
            "imagenet": {"input_size": 224, "cj_strength": 1.0, "blur_prob": 0.5},
        }[self.recipe]
        for key, value in recipe.items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, value)
        if self.local_size is None:
            object.__setattr__(self, "local_size", max(8, round(self.input_size * 3 / 7)))
        if not 0 < self.local_scale[0] <= self.local_scale[1] <= 1:
            raise ValueError(f"local_scale must be 0 < low <= high <= 1, got {self.local_scale}")
        return self


class ModelConfig(_Section):
    backbone: str = "resnet18"
    """A name from ``ssl_pretrain.models.backbones.BACKBONES`` (``ssl-pretrain --list-backbones``)."""
    small_stem: Optional[bool] = None
    """ResNet stem for small images (3x3 conv, no max-pool). Default: on for inputs <= 64 px."""
    init: Optional[str] = None
    """Start the backbone from these weights (``--init``): a torchvision/timm state dict (``.pth``,
    loaded with ``weights_only=True``), a ``.safetensors`` file or one of our runs; the head starts
    fresh. ``ssl_pretrain.models.warm_start``. With a warm start, a lower ``optim.lr`` usually suits."""


    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, name: str) -> str:
        from ssl_pretrain.models.backbones import BACKBONES

        if name not in BACKBONES:
            raise ValueError(f"unknown backbone; available: {', '.join(sorted(BACKBONES))}")
        return name


class OptimConfig(_Section):
    name: Literal["sgd", "lars", "adamw"] = "sgd"
    """``sgd`` (lightly's CIFAR-10 benchmarks), ``lars`` (SimCLR, BYOL, Barlow Twins on ImageNet) or
    ``adamw`` (DINO, MAE; ``momentum`` is then unused, ``betas`` apply)."""
    lr: float = Field(0.12, gt=0)
    """Base learning rate for a batch of 256; scaled by ``lr_scaling``. 0.12 x bs/256 with SGD is
    lightly's CIFAR-10 benchmark (its scripts: ``6e-2 * batch_size / 128``); SimCLR uses LARS with 0.3 x bs/256 on ImageNet."""
    lr_scaling: Literal["linear", "sqrt", "none"] = "linear"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    """5e-4 for CIFAR with SGD (lightly benchmark); SimCLR uses 1e-6 with LARS on ImageNet.
    Never applied to norm layers and biases."""
    weight_decay_end: Optional[float] = Field(None, ge=0)
    """Cosine schedule of the weight decay from ``weight_decay`` to this value over training (DINO:
    0.04 -> 0.4); default: constant."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW's moment decay rates (DINO and MAE: 0.9, 0.999 and 0.9, 0.95)."""
    warmup_epochs: float = 10
    """Linear warm-up, then cosine decay to zero (SimCLR: 10 epochs of warm-up)."""
    grad_clip: Optional[float] = None
    """Clip the gradient's global norm to this value; off by default."""


class TrainConfig(_Section):
    epochs: int = Field(100, ge=1)
    """Number of epochs; with ``time_budget_minutes``, the most epochs to run."""
    time_budget_minutes: Optional[float] = Field(None, gt=0)
    """Train for this wall-clock time, counted from the start of the run (data decoding
    included): the cosine learning-rate decay ends at the budget and the run stops there, mid-epoch
    if need be, with a checkpoint and the exported backbone. A host that runs slower trains fewer
    steps instead of overrunning. ``train.epochs`` still caps the run (the decay then ends at
    whichever comes first). The steps taken depend on the machine's speed, so two budgeted runs
    are not step-for-step identical; a resumed run continues the clock from its checkpoint."""
    batch_size: int = Field(256, ge=2)
    seed: int = 0
    device: str = "auto"
    """``auto`` (CUDA, then MPS, then CPU), or any torch device string."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """``auto``: bf16 autocast where the hardware runs bf16 natively - CUDA from compute
    capability 8, CPUs with AMX or AVX512-BF16 (faster than fp32 there) - and fp32 elsewhere,
    where bf16 is emulated and much slower (``ssl_pretrain.engine.hardware``; BENCHMARKS.md,
    "Pretraining throughput"). A forced ``bf16`` on such a CPU runs with a warning."""
    channels_last: Optional[bool] = None
    """Default: on for CUDA and CPU (oneDNN's convolutions train faster channels-last; BENCHMARKS.md,
    "Pretraining throughput"), off for MPS."""
    compile: bool = False
    """``torch.compile`` the model (GPU; slow to start)."""
    sync_batchnorm: bool = False
    """Distributed runs: BatchNorm statistics over the global batch instead of each rank's share
    (torch's SyncBatchNorm on GPUs, an all-reduce BatchNorm on CPUs). Worth it when the batch
    per GPU is small; each BatchNorm layer then costs a collective."""
    checkpoint_every_steps: int = Field(0, ge=0)
    """Also write ``checkpoints/last.pt`` every N steps (0: only at the end of each epoch)."""
    keep_every_epochs: int = Field(0, ge=0)
    """Keep a copy ``checkpoints/epoch-NNNN.pt`` every N epochs (0: keep only the last)."""
    log_every_steps: int = Field(10, ge=1)
    tensorboard: bool = False
    threads: Optional[int] = None
    """torch intra-op threads; default leaves torch's choice."""
    keep_freed_memory: bool = True
    """CPU runs on Linux: let glibc's heap keep freed blocks for reuse instead of mapping fresh
    pages for every multi-megabyte tensor (``ssl_pretrain.engine.allocator``: faster steps and
    augmentation, BENCHMARKS.md "Pretraining throughput"; the process keeps its peak memory, "Memory")."""


class MonitorConfig(_Section):
    """Online kNN monitor: kNN top-1 of the backbone's features on labelled data."""

    train: Optional[str] = None
    """Labelled source for the kNN memory (image-folder layout or ``builtin:digits:train``)."""
    val: Optional[str] = None
    """Labelled source to classify (image-folder layout or ``builtin:digits:test``)."""
    every_epochs: int = Field(1, ge=1)
    k: int = Field(200, ge=1)
    temperature: float = Field(0.1, gt=0)
    """k=200, T=0.1: the InstDisc protocol used by lightly's benchmarks."""


VARIANT_CONDITIONS = {
    "no_fast_bf16": "bf16 is not the fast precision here - no AMX tiles and no CUDA GPU of compute capability 8+, "
                    "and on a CPU with AVX512-BF16 alone a probe found fp32 faster - so training runs in fp32",
}
"""The conditions a preset's ``variants:`` section may be keyed by (``ssl_pretrain.engine.hardware``)."""


class _ConfigBase(_Section):
    variant: Optional[str] = None
    """The preset variant ``load_config`` applied for this hardware (informational; set by it)."""
    recipe: Optional[str] = None
    """The method whose preset recipe ``load_config`` applied (informational; set by it)."""
    recipe_sections: list[str] = []
    """Where that recipe was read: ``recipes.METHOD``, ``variants.CONDITION.recipes.METHOD``
    (informational; set by ``load_config``)."""
    method: str = "simclr"
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
        from ssl_pretrain.models.backbones import input_multiple, resolve_small_stem

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


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'optim.lr=0.3'`` -> ``(['optim', 'lr'], 0.3)``; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set expects KEY=VALUE (for example optim.lr=0.3), got '{text}'")
    key, raw = text.split("=", 1)
    parts = [part for part in key.strip().split(".") if part]
    if not parts:
        raise ConfigError(f"--set has an empty key in '{text}'")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return parts, value


def _apply_override(tree: dict, parts: list[str], value: Any) -> None:
    node = tree
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set: '{'.'.join(parts[: depth + 1])}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> Config:
    """Defaults, then the YAML file at ``path``, then its ``variants:`` entry that fits this
    hardware (if any), then its ``recipes:`` entry for the method, then ``KEY=VALUE`` overrides.

    A preset may start from another: ``extends: OTHER.yaml`` (a path relative to the preset's
    folder) reads OTHER first and lays this file's sections over it, key by key (its variants and
    recipes too), so a preset for another kind of data changes only what differs.

    A preset may hold ``variants: {CONDITION: {dotted.key: value, ...}}``, CONDITION one of
    ``VARIANT_CONDITIONS``: settings measured to be better where that condition holds (the CPU
    preset trains a narrower network where training runs in fp32). It may hold ``recipes: {METHOD:
    {dotted.key: value, ...}}``: what a method needs beyond the preset's shared settings (its
    optimiser, learning rate, crops), applied when that method is trained. A variant may hold
    ``recipes:`` too, applied after the preset's for that method where the variant applies (the CPU
    preset's fp32 variant gives SimCLR multi-crop). ``--set`` still wins.

    Raises:
        ConfigError: a missing or malformed file, an unknown key or a bad value (one line).
    """
    tree: dict[str, Any] = {}
    origin = "defaults"
    if path is not None:
        origin = str(path)
        tree = _read_preset(Path(path))
    user = [parse_override(text) for text in overrides]
    variants = tree.pop("variants", None)
    recipes = [("recipes", _check_recipes(tree.pop("recipes"), origin))] if "recipes" in tree else []
    if variants is not None:
        # a variant's own recipes apply after the preset's: the more specific setting wins
        recipes += _apply_variant(tree, _check_variants(variants, origin), user)
    for section, recipe_set in recipes:
        _apply_recipe(tree, recipe_set, user, section)
    for parts, value in user:
        _apply_override(tree, parts, value)
        origin = f"{origin} + --set"
    try:
        return Config.model_validate(tree)
    except ValidationError as error:
        raise ConfigError(_format_validation_error(error, origin)) from None


def _read_preset(path: Path, extended_by: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The preset's mapping, its ``extends:`` chain merged in (the base first)."""
    try:
        loaded = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        via = f" (extended by {extended_by[-1]})" if extended_by else ""
        raise ConfigError(f"config file not found: {path}{via}") from None
    except (OSError, UnicodeDecodeError) as error:  # a folder, no permission, a binary file
        raise ConfigError(f"cannot read config file {path}: {getattr(error, 'strerror', None) or error}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {str(error).splitlines()[0]}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, not {type(loaded).__name__}")
    tree = loaded or {}
    base = tree.pop("extends", None)
    if base is None:
        return tree
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: 'extends' must name another preset file, not {base!r}")
    base_path = path.parent / base
    chain = (*extended_by, path)
    if base_path.resolve() in {link.resolve() for link in chain}:
        raise ConfigError(f"{path}: 'extends' loops back to {base_path}")
    return _merged(_read_preset(base_path, chain), tree)


def _merged(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``: mappings merged key by key, anything else replaced."""
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merged(merged[key], value)
        else:
            merged[key] = value
    return merged


def _check_variants(variants: Any, origin: str) -> dict[str, dict[str, Any]]:
    if not isinstance(variants, dict):
        raise ConfigError(f"{origin}: 'variants' must map a condition to settings, not {type(variants).__name__}")
    for condition, settings in variants.items():
        if condition not in VARIANT_CONDITIONS:
            raise ConfigError(f"{origin}: unknown variant condition '{condition}'; "
                              f"allowed: {', '.join(VARIANT_CONDITIONS)}")
        if not isinstance(settings, dict):
            raise ConfigError(f"{origin}: variant '{condition}' must map dotted keys to values")
        if "recipes" in settings:
            _check_recipes(settings["recipes"], f"{origin}: variant '{condition}'")
    return variants


def _check_recipes(recipes: Any, origin: str) -> dict[str, dict[str, Any]]:
    if not isinstance(recipes, dict):
        raise ConfigError(f"{origin}: 'recipes' must map a method to settings, not {type(recipes).__name__}")
    for method, settings in recipes.items():
        if method not in METHODS:
            raise ConfigError(f"{origin}: unknown method '{method}' under recipes; allowed: {', '.join(METHODS)}")
        if not isinstance(settings, dict):
            raise ConfigError(f"{origin}: recipe '{method}' must map dotted keys to values")
    return recipes


def _apply_recipe(tree: dict, recipes: dict[str, dict[str, Any]], user: list, section: str = "recipes") -> None:
    """Apply the recipe of the method the run will train (``--set method=`` or ``--method`` first,
    then the preset's ``method``, then the default); ``section`` names where it was read."""
    method = next((value for parts, value in reversed(user) if parts == ["method"]), None)
    method = str(method or tree.get("method") or Config.model_fields["method"].default)
    if method in recipes:
        for key, value in recipes[method].items():
            _apply_override(tree, [part for part in str(key).split(".") if part], value)
        tree["recipe"] = method
        tree.setdefault("recipe_sections", []).append(f"{section}.{method}")


def _apply_variant(tree: dict, variants: dict[str, dict[str, Any]], user: list) -> list[tuple[str, dict]]:
    """Apply the first variant whose condition holds on the device the run will use; returns its
    ``recipes`` as ``[(section name, recipes)]`` (empty when it has none or no variant applies),
    which the caller applies after the preset's. Where only a measurement can tell (a CPU with AVX512-BF16
    but no AMX), the preset's own network is timed in both precisions
    (``ssl_pretrain.train.probe_precisions``; a few seconds, cached per machine)."""
    from ssl_pretrain.engine.hardware import fast_bf16

    device = next((value for parts, value in reversed(user) if parts == ["train", "device"]), None)
    device = str(device or (tree.get("train") or {}).get("device") or "auto")
    probe, workload = _base_network_probe(tree, user, device)
    for condition, settings in variants.items():
        if condition == "no_fast_bf16" and not fast_bf16(device, probe, workload):
            for key, value in settings.items():
                if key != "recipes":
                    _apply_override(tree, [part for part in str(key).split(".") if part], value)
            tree["variant"] = condition
            return [(f"variants.{condition}.recipes", settings["recipes"])] if "recipes" in settings else []
    return []


def _base_network_probe(tree: dict, user: list, device: str):
    """``(probe, workload)`` of the network the config describes without its variants (None, ""
    when that config is not valid: the error comes from validation later, in one line)."""
    base = copy.deepcopy(tree)
    try:
        for parts, value in user:
            _apply_override(base, parts, value)
        cfg = Config.model_validate(base)
    except (ConfigError, ValidationError):
        return None, ""
    import torch

    from ssl_pretrain.train import probe_precisions, probe_workload

    channels_last = cfg.train.channels_last if cfg.train.channels_last is not None else device != "mps"
    torch_device = torch.device("cpu" if device == "auto" else device)  # only CPUs are probed

    return (lambda: probe_precisions(cfg, torch_device, channels_last)), probe_workload(cfg, channels_last)
