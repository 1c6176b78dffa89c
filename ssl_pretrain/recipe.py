"""A recipe from the data: with no ``--config``, ``ssl-pretrain`` looks at the images, the machine
and any ``--init`` weights (``ssl_pretrain.survey``) and chooses what the tuned presets would for
them - input size, network and stem, augmentations, multi-crop, method settings, batch size and,
on a CPU, a time budget - each choice with its reason.

The choices are the lowest layer of the config (``load_config(..., base=recipe.settings())``): a
preset's values and ``--set`` still win. Where the data asks for it, ``advise`` words a warning
with its fix: images far larger than the training size, too few images to learn from scratch, a
time budget too short for a few epochs.

The rules follow the presets, which were measured (BENCHMARKS.md names each): 8-px grey digits get
``configs/demo_digits.yaml``'s recipe, 32-px images on a CPU ``configs/cifar10_cpu.yaml``'s,
ImageNet weights ``configs/warm_start_resnet18.yaml``'s.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from ssl_pretrain.models.backbones import BACKBONES, resolve_small_stem
from ssl_pretrain.survey import DataSurvey, InitSurvey, MachineSurvey, measure_images_per_second

log = logging.getLogger("ssl_pretrain")

CPU_BUDGET_MINUTES = 15
"""A CPU run without ``--epochs`` stops after this many minutes (configs/cifar10_cpu.yaml's budget)."""
FEW_IMAGES = 5000
"""Under this many images, a network pretrained elsewhere (``--init``) is the better start."""
LARGE_IMAGES = 4
"""Images whose shorter side is this many times the training size cost more to decode than to train on."""
FEW_EPOCHS = 5.0
"""A time budget that gives fewer epochs than this hardly trains (SimCLR counts in hundreds)."""


@dataclass
class Choice:
    key: str
    value: Any
    reason: str


@dataclass
class DataRecipe:
    """The surveys, the settings chosen from them, and the notes on what was left alone and why."""

    data: Optional[DataSurvey]
    machine: MachineSurvey
    init: Optional[InitSurvey]
    choices: list[Choice] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [self.data.summary() if self.data else "no data given", self.machine.summary()]
        return "; ".join(parts + ([f"init {self.init.summary()}"] if self.init else []))

    def settings(self) -> dict[str, Any]:
        """Dotted key -> value for ``load_config``'s ``base``, with the informational ``survey``
        (what was seen) and ``survey_choices`` (key -> reason) the saved config keeps."""
        settings = {choice.key: choice.value for choice in self.choices}
        settings["survey"] = self.summary()
        settings["survey_choices"] = {choice.key: choice.reason for choice in self.choices}
        return settings

    def lines(self) -> list[str]:
        """What ``--print-config`` and the log show: the survey, each choice and why, the notes."""
        return ([f"recipe from the data: {self.summary()}"]
                + [f"  {choice.key} = {_text(choice.value)}: {choice.reason}" for choice in self.choices]
                + [f"  {note}" for note in self.notes])


def _text(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def describe_choices(config: dict[str, Any]) -> list[str]:
    """``key = value: reason`` for each choice a saved config (``Config.to_dict()``) records."""
    lines = []
    for key, reason in (config.get("survey_choices") or {}).items():
        node: Any = config
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        lines.append(f"  {key} = {_text(node)}: {reason}")
    return lines


class _Picker:
    """The choices made so far, under the user's own settings (which a choice never replaces)."""

    def __init__(self, recipe: DataRecipe, user: dict[str, Any]):
        self.recipe, self.user, self.chosen = recipe, user, {}

    def get(self, key: str, default: Any = None) -> Any:
        if key in self.user:
            return self.user[key]
        return self.chosen[key].value if key in self.chosen else default

    def set(self, key: str, value: Any, reason: str) -> None:
        if key in self.user:
            return  # --set / a flag wins; the run's config shows the user's value
        self.chosen[key] = Choice(key, value, reason)

    def note(self, text: str) -> None:
        self.recipe.notes.append(text)


def choose_recipe(data: Optional[DataSurvey], machine: MachineSurvey, init: Optional[InitSurvey],
                  user: dict[str, Any]) -> DataRecipe:
    """The settings for these images on this machine (``user``: the dotted keys the command line
    sets, which no choice replaces and later choices build on)."""
    recipe = DataRecipe(data, machine, init)
    picker = _Picker(recipe, user)
    for rule in (_input_size, _network, _stem, _augmentation, _multi_crop, _method, _optimiser, _batch, _length):
        rule(picker)
    recipe.choices = list(picker.chosen.values())
    return recipe


def _gpu(picker: _Picker) -> bool:
    return picker.recipe.machine.device == "cuda"


def _input_size(picker: _Picker) -> None:
    data, init, gpu = picker.recipe.data, picker.recipe.init, _gpu(picker)
    if init is not None and init.input_size:
        picker.set("augment.input_size", init.input_size, "the size the --init run was trained at")
        return
    if data is None:
        return
    side = data.short_side[1]
    if side <= 12:
        size, why = 16, f"{side}-px images upscaled to 16: crops of so few pixels are too coarse (configs/demo_digits.yaml)"
    elif side <= 24:
        size, why = max(16, 4 * round(side / 4)), f"small images ({side} px) keep their size"
    elif side <= 40:
        size, why = 32, f"images of about {side} px train at CIFAR's 32 px"
    elif side <= 80:
        size, why = 64, f"tiles of about {side} px train at 64 px"
    elif gpu:
        size = min(224, 32 * (side // 32))
        why = f"photos ({side} px median shorter side) on a GPU: their size, at most ImageNet's 224 px"
    else:
        machine = picker.recipe.machine
        cap = 128 if machine.fast_bf16 and machine.cores >= 8 else 96
        size = min(cap, 32 * (side // 32))
        why = (f"photos ({side} px median shorter side) on a CPU: {size} px keeps enough detail at a cost a CPU "
               f"trains" + (" (fast bf16 on 8 or more cores: up to 128 px)" if cap == 128 else " (STL-10's size)"))
    if init is not None and init.small_stem is False and size < 64:
        size, why = 64, (f"{why}; then 64 px, since the ImageNet stem of the --init weights shrinks an image 4x "
                         "before the first block")
    picker.set("augment.input_size", size, why)


def _network(picker: _Picker) -> None:
    init, machine = picker.recipe.init, picker.recipe.machine
    if init is not None and init.architecture:
        picker.set("model.backbone", init.architecture, f"the --init weights are a {init.architecture}")
    elif _gpu(picker):
        picker.set("model.backbone", "resnet18", "a CUDA GPU: SimCLR's ResNet-18 (lightly's CIFAR-10 benchmark)")
    elif picker.get("augment.input_size", 32) <= 16:
        picker.set("model.backbone", "smallconv" if machine.fast_bf16 else "smallconv-s",
                   "small images on a CPU: configs/demo_digits.yaml's network"
                   + ("" if machine.fast_bf16 else " in fp32 (3/4 width: learns as much here, in less time)"))
    else:
        picker.set("model.backbone", "smallconv" if machine.fast_bf16 else "smallconv-xs",
                   "a CPU: configs/cifar10_cpu.yaml's network" + (
                       "" if machine.fast_bf16 else " in fp32 (half width: more steps in the same minutes)"))


def _stem(picker: _Picker) -> None:
    init, backbone = picker.recipe.init, picker.get("model.backbone", "resnet18")
    size = picker.get("augment.input_size", 32)
    if init is not None and init.small_stem is not None and backbone == init.architecture:
        stem = "the small-image stem" if init.small_stem else "the ImageNet stem (7x7/2 conv + max-pool)"
        picker.set("model.small_stem", init.small_stem, f"{stem}, which the --init weights were trained with")
    elif backbone not in BACKBONES or BACKBONES[backbone].patched:
        return  # a ViT's patch size follows the default rule; an unknown name fails validation
    elif BACKBONES[backbone].cpu_sized and not _gpu(picker):
        small = size <= 24
        picker.set("model.small_stem", small, "a stride-1 first conv keeps the detail of images this small"
                   if small else "a stride-2 first conv on a CPU: many times faster than stride 1, which "
                   "sees more detail (configs/cifar10_cpu.yaml)")
    else:
        small = resolve_small_stem(None, size)
        picker.set("model.small_stem", small, f"{size}-px inputs: " + (
            "the small-image stem (3x3/1, no max-pool), as SimCLR on CIFAR-10" if small else "the ImageNet stem"))


def _augmentation(picker: _Picker) -> None:
    data, size = picker.recipe.data, picker.get("augment.input_size")
    if size is None:
        return
    large = size >= 96
    picker.set("augment.recipe", "imagenet" if large else "cifar", (
        "photo-sized inputs: SimCLR's ImageNet augmentations (colour jitter 1.0, blur p=0.5)" if large else
        "small inputs: SimCLR's CIFAR augmentations (colour jitter 0.5, no blur)"))
    if data is None:
        return
    glyphs = data.grey and data.short_side[1] <= 32
    if data.grey:
        picker.set("augment.gray_prob", 0.0, "the images are grey already; colour jitter stays, as on grey "
                   "images only its brightness and contrast act, and they matter (configs/glyphs_cpu.yaml)")
    if glyphs:
        picker.set("augment.hflip_prob", 0.0, "small grey images are mostly glyphs (digits, letters) that a "
                   "mirror changes (configs/glyphs_cpu.yaml); --set augment.hflip_prob=0.5 where it does not")
    if glyphs or size <= 16:
        picker.set("augment.min_scale", 0.25, "crops of 0.25-1 of the image: a 0.08 crop of a small image "
                   "holds too little to recognise (configs/demo_digits.yaml, configs/glyphs_cpu.yaml)")


def _multi_crop(picker: _Picker) -> None:
    data, machine = picker.recipe.data, picker.recipe.machine
    size, method = picker.get("augment.input_size"), picker.get("method", "simclr")
    if data is None or size is None or method != "simclr" or "augment.local_views" in picker.user:
        return
    if picker.recipe.init is not None:
        picker.note("multi-crop off: a warm start trains two views (configs/warm_start_resnet18.yaml)")
    elif _gpu(picker) or machine.fast_bf16:
        picker.note("multi-crop off: measured to pay only where training runs in fp32 on a CPU")
    elif not 24 < size <= 64:
        picker.note(f"multi-crop off: measured at 32 px only; at {size} px its crops would be "
                    + ("too small to hold anything" if size <= 24 else "costly and untried"))
    elif picker.get("data.pipeline") == "pil":
        picker.note("multi-crop off: the batch pipeline makes its crops, and data.pipeline=pil is set")
    else:
        reason = "4 small crops per image, each a positive of both views: more learnt per second in fp32 " \
                 "(configs/cifar10_cpu.yaml's fp32 variant)"
        picker.set("augment.local_views", 4, reason)
        picker.set("augment.local_size", size // 2, "half the input size, as 16 px of 32 in the preset")
        picker.set("augment.local_scale", [0.1, 0.5], "the fp32 variant's crop areas")


def _method(picker: _Picker) -> None:
    init, gpu = picker.recipe.init, _gpu(picker)
    picker.set("method", "simclr", "SimCLR, the method every preset trains by default")
    if picker.get("method") != "simclr":
        picker.note(f"method {picker.get('method')}: its own defaults (configs/cifar10_cpu.yaml's recipes: "
                    "hold measured settings per method)")
        return
    if init is not None and init.architecture:
        picker.set("simclr.temperature", 0.2, "a warm start: configs/warm_start_resnet18.yaml's temperature")
    elif picker.get("augment.input_size", 32) <= 16 and not gpu:
        picker.set("simclr.temperature", 0.2, "configs/demo_digits.yaml's temperature")
    elif not gpu:
        picker.set("simclr.temperature", 0.1, "beat 0.2 and 0.3 on a CPU budget (configs/cifar10_cpu.yaml)")
    if not gpu:
        picker.set("simclr.hidden_dim", 512, "a head sized for a CPU: the paper's 2048 costs more than the network")


def _optimiser(picker: _Picker) -> None:
    init = picker.recipe.init
    if picker.get("method") != "simclr":
        return
    if init is not None and init.architecture:
        why = "a warm start: a tenth of the from-scratch rate, so the first steps keep what the weights know " \
              "(configs/warm_start_resnet18.yaml)"
        picker.set("optim.lr", 0.03, why)
        picker.set("optim.weight_decay", 1.0e-5, "configs/warm_start_resnet18.yaml's weight decay")
        picker.set("optim.warmup_epochs", 1, "a short warm-up for a short run")
    elif _gpu(picker):
        return  # the defaults are the GPU recipe (lightly's CIFAR-10 benchmark)
    elif picker.get("augment.input_size", 32) <= 16:
        picker.set("optim.lr", 0.6, "per 256 images: configs/demo_digits.yaml's rate")
        picker.set("optim.warmup_epochs", 2, "configs/demo_digits.yaml's warm-up")
    else:
        picker.set("optim.lr", 0.3, "per 256 images: configs/cifar10_cpu.yaml's rate")
        picker.set("optim.warmup_epochs", 1, "configs/cifar10_cpu.yaml's warm-up: a budgeted run is short")


def _batch(picker: _Picker) -> None:
    data, gpu = picker.recipe.data, _gpu(picker)
    batch, why = (256, "a GPU: the default batch") if gpu else \
        (128, "a CPU: as good as 256 in trials, and more steps in the budget (configs/cifar10_cpu.yaml)")
    if data is not None:
        images = min(data.count, picker.get("data.max_images") or data.count)
        if images < 4 * batch:
            batch = max(2, min(images, 2 ** int(math.log2(max(images // 4, 1)))))
            why = f"{images} images: a batch of {batch} leaves at least four steps an epoch"
    if not gpu or batch != 256:
        picker.set("train.batch_size", batch, why)


def _length(picker: _Picker) -> None:
    if _gpu(picker):
        return
    if "train.epochs" in picker.user or "train.time_budget_minutes" in picker.user:
        picker.note("run length: as given (--epochs / --time-budget)")
        return
    picker.set("train.time_budget_minutes", CPU_BUDGET_MINUTES,
               f"a CPU: the run stops after {CPU_BUDGET_MINUTES} minutes of wall clock (decoding included), with "
               "a checkpoint and the backbone; --time-budget N for longer, --epochs N to train by epochs")
    if picker.get("augment.input_size", 32) <= 16:
        picker.set("train.epochs", 15, "as good as 20 on small images (configs/demo_digits.yaml)")
    else:
        picker.set("train.epochs", 100, "a cap: the time budget ends the run first on a CPU")


# ---------------------------------------------------------------------------------------------
# Advice


def advise(recipe: DataRecipe, cfg, images_per_second: Optional[Callable[[Any, MachineSurvey], float]] = None,
           timed: bool = True) -> list[str]:
    """Warnings, each with its fix, for what the data and the resolved config ``cfg`` (a
    ``Config``) ask for (the run logs them: ``log_recipe``). ``images_per_second`` times the network (default
    ``measure_images_per_second``; called only for a run with a time budget, and not at all without
    ``timed``: the ranks of a torchrun job would each time alike-configured networks differently)."""
    data, size, advice = recipe.data, cfg.augment.input_size, []
    if data is None:
        return advice
    side = data.short_side[1]
    if not data.in_memory and side >= LARGE_IMAGES * size:
        advice.append(
            f"the images are far larger than the training size (median shorter side {side} px, {side / size:.0f}x "
            f"{size} px): decoding costs more than training on them; the batch pipeline decodes each file once at "
            f"the training size into a cache file that later runs reuse, data.pipeline=pil decodes every epoch; to "
            f"save even that, resize a copy once to about {2 * size} px on the shorter side (e.g. mogrify -resize "
            f"'{2 * size}x{2 * size}^' *.jpg) and point --data at it")
    images = min(data.count, cfg.data.max_images or data.count)
    if images < FEW_IMAGES and not cfg.model.init:
        advice.append(
            f"only {images:,} images: self-supervision from scratch rarely beats a network pretrained elsewhere on "
            f"so few; start from one with --init (torchvision:resnet18, or a saved ImageNet .pth) - the recipe then "
            f"fits its network, stem and learning rate")
    if cfg.train.time_budget_minutes and timed:
        measure = images_per_second or measure_images_per_second
        epochs_at = lambda rate: min(rate * 60 * cfg.train.time_budget_minutes / max(images, 1),  # noqa: E731
                                     cfg.train.epochs)
        rate = measure(cfg, recipe.machine)
        if epochs_at(rate) < min(FEW_EPOCHS, cfg.train.epochs):
            # A second forecast before warning: a job sharing the cores can slow a few small timed
            # steps many times over (threads of two processes spinning on the same cores).
            rate = max(rate, measure(cfg, recipe.machine))
        epochs = epochs_at(rate)
        if epochs < min(FEW_EPOCHS, cfg.train.epochs):
            needed = 2 * FEW_EPOCHS * images / max(rate, 1e-9) / 60
            load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
            busy = (f"; measured while the machine was busy (load average {load:.1f} on {recipe.machine.cores} cores), "
                    f"so it may be too low: the run measures again after its first steps"
                    if load > recipe.machine.cores / 2 else "")
            advice.append(
                f"the {cfg.train.time_budget_minutes:g}-minute budget gives about {epochs:.1f} epochs of {images:,} "
                f"images (an estimated {rate:.0f} images/s for {cfg.model.backbone} at {size} px, before "
                f"decoding{busy}): too few to learn much; raise --time-budget to about {math.ceil(needed)} for "
                f"{2 * FEW_EPOCHS:.0f} epochs, or train a smaller network (--set model.backbone=smallconv-xs) "
                f"or size (--set augment.input_size={max(16, size // 2)})")
    return advice


# ---------------------------------------------------------------------------------------------
# A resumed run


def saved_recipe(run_dir: str | Path) -> Optional[dict[str, Any]]:
    """The choices a run in ``run_dir`` was started with, as ``settings()`` gives them (so that
    ``--resume`` trains the same config even where a new survey would choose otherwise); ``{}``
    for a run started without them, None where there is no run."""
    config_file = Path(run_dir) / "config.yaml"
    try:
        saved = yaml.safe_load(config_file.read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return None
    if not isinstance(saved, dict):
        return None
    choices = saved.get("survey_choices") or {}
    settings: dict[str, Any] = {}
    for key in choices:
        node: Any = saved
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        settings[key] = node
    if choices:
        settings["survey"], settings["survey_choices"] = saved.get("survey"), choices
        settings["survey_advice"] = saved.get("survey_advice") or []
    return settings


def log_recipe(config: dict[str, Any]) -> None:
    """Log (into the run's ``train.log``) what the survey saw, each choice and why, and its advice."""
    log.info("recipe from the data (no --config; a preset or --set overrides any choice): %s", config["survey"])
    for line in describe_choices(config):
        log.info(line)
    for text in config.get("survey_advice") or []:
        log.warning(text)
