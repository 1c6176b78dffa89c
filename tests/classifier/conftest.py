"""The classifier tests' shared set-up: one linear classifier on the digits, made once per session.

Tests that change a model folder copy it into their own ``tmp_path`` first.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from ssl_classifier.train import FinetuneSettings, train_classifier
from ssl_pretrain.data import digits_source

from digit_files import export_random_backbone


@pytest.fixture(scope="session")
def backbone_run(tmp_path_factory) -> Path:
    return export_random_backbone(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="session")
def linear_model(backbone_run, tmp_path_factory) -> Path:
    """A linear classifier trained on the 1,347 training digits (random smallconv features)."""
    out = tmp_path_factory.mktemp("model")
    settings = FinetuneSettings(device="cpu", progress=False, overwrite=True, epochs=60, mode="linear")
    train_classifier(backbone_run, "builtin:digits:train", out, test="builtin:digits:test", settings=settings)
    return out


@pytest.fixture(scope="session")
def test_digit_files(tmp_path_factory) -> tuple[Path, list[str]]:
    """The 450 held-out digits as PNG files and their labels, in file-name order."""
    folder = tmp_path_factory.mktemp("test-digits")
    source = digits_source("test")
    for index in range(len(source)):
        Image.fromarray(source.images[index]).save(folder / f"{index:04d}.png")
    return folder, [str(label) for label in source.labels]
