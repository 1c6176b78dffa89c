"""Real images for the tests: scikit-learn's digits written as files, and random-init checkpoints.

The digits ship inside scikit-learn, so accuracy assertions on them mean something and need no
download. The checkpoints are a randomly initialised backbone exported at 16 px: the fastest run
folder there is, for tests of the evaluation and classifier stages that do not need learned features.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ssl_pretrain.checkpoint import BackboneInfo, export_backbone
from ssl_pretrain.data import digits_source
from ssl_pretrain.models.backbones import build_backbone

DIGITS_MEAN, DIGITS_STD = (0.25, 0.25, 0.25), (0.35, 0.35, 0.35)


def write_digit_images(folder: Path, count: int, with_classes: bool = True, size: int = 16) -> list[Path]:
    """Write the first ``count`` training digits as PNG files (``folder/<class>/<n>.png``)."""
    source = digits_source("train")
    paths = []
    for index in range(count):
        label = int(source.labels[index])
        target = folder / str(label) if with_classes else folder
        target.mkdir(parents=True, exist_ok=True)
        path = target / f"{index:04d}.png"
        source.load(index).resize((size, size), Image.BICUBIC).save(path)
        paths.append(path)
    return paths


def write_digits_folder(root: Path, per_class: int, offset: int = 0, classes=range(10)) -> Path:
    """``root/<digit>/<n>.png``: ``per_class`` real digits of each class, from position ``offset``."""
    source = digits_source("all")
    for digit in classes:
        positions = np.flatnonzero(source.labels == digit)[offset : offset + per_class]
        (root / str(digit)).mkdir(parents=True, exist_ok=True)
        for position in positions:
            Image.fromarray(source.images[position]).save(root / str(digit) / f"{position:04d}.png")
    return root


def export_random_backbone(folder: Path, architecture: str = "smallconv", input_size: int = 16,
                           seed: int = 0, claimed_architecture: str | None = None) -> Path:
    """Export a random-init backbone into ``folder`` (a run folder); ``claimed_architecture``
    writes another architecture's name into the metadata, as a mislabelled file would."""
    torch.manual_seed(seed)
    backbone, feature_dim = build_backbone(architecture, small_stem=True)
    info = BackboneInfo(claimed_architecture or architecture, True, feature_dim, input_size, DIGITS_MEAN, DIGITS_STD)
    export_backbone(folder / "backbone.safetensors", backbone, info)
    return folder
