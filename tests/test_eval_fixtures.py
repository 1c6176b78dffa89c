"""Shared fixtures of the evaluation tests (imported by the ``test_eval_*`` files; no tests here).

Real data, small: the scikit-learn digits written as PNG files in image-folder layout, and a
randomly initialised ``smallconv`` backbone exported at 16 px, the fastest checkpoint there is.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_pretrain.models.backbones import build_backbone
from ssl_pretrain.checkpoint import BackboneInfo, export_backbone
from ssl_pretrain.data import digits_source

DIGITS_MEAN, DIGITS_STD = (0.25, 0.25, 0.25), (0.35, 0.35, 0.35)


def export_random_backbone(folder: Path, architecture: str = "smallconv", input_size: int = 16,
                           seed: int = 0, claimed_architecture: str | None = None) -> Path:
    """Export a random-init backbone into ``folder`` (a run folder); ``claimed_architecture``
    writes another architecture's name into the metadata, as a mislabelled file would."""
    torch.manual_seed(seed)
    backbone, feature_dim = build_backbone(architecture, small_stem=True)
    info = BackboneInfo(claimed_architecture or architecture, True, feature_dim, input_size, DIGITS_MEAN, DIGITS_STD)
    export_backbone(folder / "backbone.safetensors", backbone, info)
    return folder


def write_digits_folder(root: Path, per_class: int, offset: int = 0, classes=range(10)) -> Path:
    """``root/<digit>/<n>.png``: ``per_class`` real digits of each class, from position ``offset``."""
    source = digits_source("all")
    for digit in classes:
        positions = np.flatnonzero(source.labels == digit)[offset : offset + per_class]
        (root / str(digit)).mkdir(parents=True, exist_ok=True)
        for position in positions:
            Image.fromarray(source.images[position]).save(root / str(digit) / f"{position:04d}.png")
    return root


@pytest.fixture(scope="module")
def random_checkpoint(tmp_path_factory) -> Path:
    return export_random_backbone(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def digits_folders(tmp_path_factory) -> tuple[Path, Path]:
    """``(train, test)`` folders: 30 and 10 real digits per class, disjoint."""
    root = tmp_path_factory.mktemp("digits")
    return write_digits_folder(root / "train", 30), write_digits_folder(root / "test", 10, offset=30)
