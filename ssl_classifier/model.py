"""The saved classifier: a pretrained backbone + a linear head, in two files.

- ``classifier.safetensors``: the weights (backbone, BatchNorm statistics, head, normalisation),
  with the description below in its metadata, so the file alone says what it is. Loading it
  runs no code (safetensors).
- ``classifier.json``: the description, for people and for tools in other languages: class names
  in order, architecture, input size and preprocessing, normalisation, the backbone it came from,
  how it was trained and its validation figures.

The network takes RGB images as floats in [0, 1], ``(B, 3, input_size, input_size)``, and
normalises them itself, so an exported ONNX file needs no mean and std from the caller: resize,
centre-crop, divide by 255 (``ssl_classifier.preprocess``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ssl_pretrain.checkpoint import CheckpointError, atomic_write, load_state_dict_strict
from ssl_pretrain.errors import SSLError
from ssl_pretrain.models.backbones import build_backbone

MODEL_FILE = "classifier.safetensors"
INFO_FILE = "classifier.json"
ONNX_FILE = "classifier.onnx"
ONNX_INT8_FILE = "classifier.int8.onnx"
TORCHSCRIPT_FILE = "classifier.torchscript.pt"
FORMAT = "ssl_classifier/classifier"
FORMAT_VERSION = 1


class ClassifierError(SSLError, ValueError):
    """A classifier that cannot be trained, loaded or used as asked; the message is one line."""


@dataclass
class ClassifierInfo:
    """Everything needed to rebuild the network and feed it images (``classifier.json``).

    Attributes:
        classes: class names; logit ``i`` is ``classes[i]``.
        architecture, small_stem, feature_dim: the backbone (``ssl_pretrain.models.backbones``).
        input_size: side of the square input; images are resized (short side, antialiased bicubic) and
            centre-cropped to it.
        mean, std: the normalisation the network applies to its [0, 1] input.
        mode: ``linear`` (frozen backbone + head) or ``finetune`` (whole network trained).
        backbone: where the backbone came from (path, weights hash, pretraining epoch).
        training: the settings and label counts of the training run.
        validation, test: metrics of the chosen epoch (``test`` only when a test set was given).
    """

    classes: list[str]
    architecture: str
    small_stem: bool
    feature_dim: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    mode: str = "linear"
    backbone: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, Any] | None = None
    test: dict[str, Any] | None = None
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    input: str = "RGB, float32 in [0, 1], shape (batch, 3, input_size, input_size); normalised inside the network"
    preprocess: str = "resize the short side to input_size (antialiased bicubic), centre-crop to input_size x input_size"

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, allow_nan=False) + "\n"

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str) -> "ClassifierInfo":
        """Raises ``ClassifierError`` for a file that is not a classifier description or is newer."""
        if not isinstance(values, dict) or values.get("format") != FORMAT:
            raise ClassifierError(f"{where} is not an ssl_classifier model description")
        version = values.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ClassifierError(f"{where} has format version {version}; this package reads up to "
                                  f"{FORMAT_VERSION}: upgrade it")
        try:
            known = {key: values[key] for key in cls.__dataclass_fields__ if key in values}
            known["mean"], known["std"] = tuple(known["mean"]), tuple(known["std"])
            return cls(**known)
        except (KeyError, TypeError) as error:
            raise ClassifierError(f"{where} lacks a field of the model description: {error}") from None


class ImageClassifier(nn.Module):
    """Normalisation -> backbone -> linear head.

    Shape: ``(B, 3, H, W)`` RGB floats in [0, 1] -> ``(B, num_classes)`` logits.
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.backbone = backbone
        self.head = nn.Linear(feature_dim, num_classes)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in [0, 1] -> ``(B, feature_dim)`` backbone features."""
        return self.backbone((images - self.mean) / self.std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(images))


def build_network(info: ClassifierInfo) -> ImageClassifier:
    """The classifier of ``info`` with random weights (to load a state dict into)."""
    try:
        backbone, _ = build_backbone(info.architecture, info.small_stem, info.input_size)
    except ValueError as error:
        raise ClassifierError(str(error)) from None
    return ImageClassifier(backbone, info.feature_dim, info.num_classes, info.mean, info.std)


# ---------------------------------------------------------------------------------------------
# Files


def save_classifier(model_dir: str | Path, network: ImageClassifier, info: ClassifierInfo) -> list[Path]:
    """Write ``classifier.safetensors`` then ``classifier.json`` into ``model_dir``, atomically.

    The JSON is written last: a folder whose JSON is missing holds no usable model, and an old
    JSON is removed first so that new weights never sit beside an old description.
    """
    from safetensors.torch import save

    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / INFO_FILE).unlink(missing_ok=True)
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in network.state_dict().items()}
    description = info.to_json()
    payload = save(tensors, metadata={"ssl_classifier": description})
    atomic_write(model_dir / MODEL_FILE, lambda file: file.write(payload))
    atomic_write(model_dir / INFO_FILE, lambda file: file.write(description.encode()))
    return [model_dir / MODEL_FILE, model_dir / INFO_FILE]


def read_info(model_dir: str | Path) -> ClassifierInfo:
    """``classifier.json`` of a model folder (or the folder of a given model file)."""
    model_dir = resolve_model_dir(model_dir)
    path = model_dir / INFO_FILE
    if not path.is_file():
        raise ClassifierError(f"{model_dir} holds no {INFO_FILE} (train one with ssl-finetune)")
    try:
        values = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ClassifierError(f"{path} is not valid JSON (truncated?): {error}") from None
    return ClassifierInfo.from_dict(values, str(path))


def resolve_model_dir(path: str | Path) -> Path:
    """A model folder as given, or the folder of one of its files."""
    path = Path(path)
    if path.is_file():
        return path.parent
    if not path.is_dir():
        raise ClassifierError(f"model not found: {path}")
    return path


def load_network(model_dir: str | Path) -> tuple[ImageClassifier, ClassifierInfo]:
    """Rebuild the saved classifier in eval mode, without running code from the files.

    Raises:
        ClassifierError: missing, truncated or foreign files, or weights of another architecture
            (one line naming the first mismatch).
    """
    from safetensors import SafetensorError, safe_open

    model_dir = resolve_model_dir(model_dir)
    info = read_info(model_dir)
    path = model_dir / MODEL_FILE
    if not path.is_file():
        raise ClassifierError(f"{model_dir} holds {INFO_FILE} but no {MODEL_FILE}")
    try:
        with safe_open(str(path), framework="pt") as file:
            tensors = {key: file.get_tensor(key) for key in file.keys()}
    except (SafetensorError, ValueError, OSError) as error:
        raise ClassifierError(f"{path} is not a readable safetensors file (truncated?): {error}") from None
    network = build_network(info)
    try:
        load_state_dict_strict(network, tensors, f"{path} ({info.architecture}, {info.num_classes} classes)")
    except CheckpointError as error:
        raise ClassifierError(str(error)) from None
    return network.eval(), info
