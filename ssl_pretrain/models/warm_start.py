"""Start pretraining from weights someone already trained (domain-adaptive pretraining).

``model.init: PATH`` (``ssl-pretrain --init PATH``) loads a torchvision or timm state dict (``.pth``
/ ``.pt`` read with ``torch.load(weights_only=True)``: no code runs), a ``.safetensors`` file, or
one of our exported backbones / run folders into the backbone before the first step; the
projection head starts fresh, as it does in every SimCLR run. The log names the keys that
matched, the backbone's keys the file lacks (left at their random initialisation) and the file's
keys the backbone has no use for (a classifier's ``fc``); a tensor whose shape does not fit is
refused in one line, naming the first one, because a silently skipped layer would train a
different network than the user thinks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ssl_pretrain.models.backbones import build_backbone
from ssl_pretrain.checkpoint import BackboneInfo, CheckpointError, load_backbone
from ssl_pretrain.settings import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)

WRAPPER_KEYS = ("state_dict", "model", "backbone", "module")
"""Where training scripts nest the weights in a saved dict (``{"state_dict": ...}``)."""
PREFIXES = ("module.", "backbone.", "model.", "encoder.")
"""Prefixes that wrappers (DDP, SSL models) put before the backbone's own key names."""


@dataclass
class InitReport:
    """What ``load_init_weights`` did: keys loaded, left at random, and ignored."""

    path: str
    matched: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = f"initialised from {self.path}: {len(self.matched)} tensors loaded"
        if self.missing:
            text += f", {len(self.missing)} left random ({_few(self.missing)})"
        if self.unexpected:
            text += f", {len(self.unexpected)} in the file not used ({_few(self.unexpected)})"
        return text


def _few(keys: list[str], shown: int = 4) -> str:
    return ", ".join(keys[:shown]) + (f", ... {len(keys) - shown} more" if len(keys) > shown else "")


TORCHVISION_PREFIX = "torchvision:"


def parse_torchvision_name(name: str) -> tuple[str, str]:
    """``torchvision:resnet50:IMAGENET1K_V2`` -> ``("resnet50", "IMAGENET1K_V2")`` (weights
    default to ``DEFAULT``); a one-line error for a malformed name."""
    parts = name[len(TORCHVISION_PREFIX):].split(":")
    if not 1 <= len(parts) <= 2 or not parts[0]:
        raise CheckpointError(f"'{name}' is not torchvision:MODEL[:WEIGHTS] (e.g. torchvision:resnet50:IMAGENET1K_V2)")
    return parts[0], parts[1] if len(parts) == 2 and parts[1] else "DEFAULT"


def torchvision_weights_file(name: str) -> Path:
    """The local file of torchvision's pretrained weights ``torchvision:MODEL[:WEIGHTS]``: in torch's
    hub cache (``$TORCH_HOME/hub/checkpoints``) if it is there, else downloaded into it (needs a
    network; offline, put the file there or pass its path instead). The file is then read as any
    other, with ``weights_only=True``.

    Raises:
        CheckpointError: an unknown model or weights name, or a failed download (one line).
    """
    import torchvision

    model, weights_name = parse_torchvision_name(name)
    try:
        weights_enum = torchvision.models.get_model_weights(model)
    except ValueError:
        raise CheckpointError(f"torchvision has no model '{model}' with pretrained weights ({name})") from None
    if weights_name not in weights_enum.__members__:
        raise CheckpointError(f"torchvision's {model} has no weights '{weights_name}': choose from "
                              f"{', '.join(weights_enum.__members__)}")
    url = weights_enum[weights_name].url
    target = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
    if target.is_file():
        return target
    log.info("downloading %s (%s.%s) to %s", url, weights_enum.__name__, weights_name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(target), progress=True)  # to a temporary file, then moved
    except Exception as error:  # noqa: BLE001 - offline, proxy, disk: one line
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"cannot download {name} from {url} ({reason}): without a network, download the "
                              f"file elsewhere and put it at {target}, or pass its path") from None
    return target


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weight file, unwrapped and without wrapper prefixes; ``path`` may also be
    ``torchvision:MODEL[:WEIGHTS]`` (``torchvision_weights_file``).

    Raises:
        CheckpointError: a missing file, one that needs code to load, or no tensors in it.
    """
    if str(path).startswith(TORCHVISION_PREFIX):
        path = torchvision_weights_file(str(path))
    path = Path(path)
    if path.is_dir():
        path = path / "backbone.safetensors"  # a run folder of ours
    if not path.is_file():
        raise CheckpointError(f"init weights not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable or unsafe file is one line
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"cannot read init weights {path} (loaded without running code): {first}") from None
    for key in WRAPPER_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    tensors = {key: value for key, value in state.items() if isinstance(value, torch.Tensor)} \
        if isinstance(state, dict) else {}
    if not tensors:
        raise CheckpointError(f"{path} holds no tensors (expected a state dict)")
    return {_strip(key): value for key, value in tensors.items()}


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def load_init_weights(backbone: nn.Module, path: str | Path) -> InitReport:
    """Copy the matching tensors of ``path`` into ``backbone`` (in place).

    Raises:
        CheckpointError: unreadable file, a tensor of the wrong shape (the first is named), or no
            key in common with the backbone (another architecture).
    """
    tensors = read_state_dict(path)
    own = backbone.state_dict()
    report = InitReport(str(path))
    for key, value in tensors.items():
        if key not in own:
            report.unexpected.append(key)
        elif tuple(value.shape) != tuple(own[key].shape):
            raise CheckpointError(
                f"{path} does not fit this backbone: '{key}' has shape {tuple(value.shape)} in the file and "
                f"{tuple(own[key].shape)} in the network (another architecture, or model.small_stem differs)")
        else:
            report.matched.append(key)
    if not report.matched:
        raise CheckpointError(f"{path} has no tensor in common with this backbone (first keys in the file: "
                              f"{_few(sorted(tensors))}): another architecture?")
    report.missing = [key for key in own if key not in tensors]
    backbone.load_state_dict({key: tensors[key] for key in report.matched}, strict=False)
    return report


def load_foreign_backbone(path: str | Path, architecture: str, input_size: int = 224,
                          small_stem: bool = False):
    """A backbone of ``architecture`` with *all* its weights from a foreign file (a torchvision or
    timm state dict: "ImageNet features" as a row beside "pretrained on my data"), fed images
    normalised with the ImageNet mean and std at ``input_size``; eval mode.

    Returns:
        ``(backbone, BackboneInfo)``, as ``ssl_pretrain.checkpoint.load_backbone``.

    Raises:
        CheckpointError: unreadable file, an unknown architecture, or weights that do not fit it
            or leave some of its tensors random.
    """
    try:
        backbone, feature_dim = build_backbone(architecture, small_stem, input_size)
    except ValueError as error:
        raise CheckpointError(str(error)) from None
    report = load_init_weights(backbone, path)
    if report.missing:
        raise CheckpointError(f"{path} lacks {len(report.missing)} of the {architecture}'s tensors "
                              f"({_few(report.missing)}): not a whole {architecture}")
    log.info("%s (as %s)", report.summary(), architecture)
    info = BackboneInfo(architecture, small_stem, feature_dim, input_size, IMAGENET_MEAN, IMAGENET_STD)
    return backbone.eval(), info


def load_any_backbone(checkpoint: str | Path, architecture: str | None = None, input_size: int = 224):
    """One of our checkpoints (``architecture`` None), or a foreign weight file read as
    ``architecture`` (for ``torchvision:MODEL[:WEIGHTS]`` the model is the architecture by default)."""
    if architecture is None and str(checkpoint).startswith(TORCHVISION_PREFIX):
        architecture = parse_torchvision_name(str(checkpoint))[0]
    if architecture is None:
        return load_backbone(checkpoint)
    return load_foreign_backbone(checkpoint, architecture, input_size)
