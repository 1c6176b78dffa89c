"""Shared fixtures: real images (scikit-learn's digits) written as files, and a tiny fast config."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ssl_pretrain.config import Config, load_config
from ssl_pretrain.data import digits_source

# The precision probe's answers go to a throw-away cache, never the user's ~/.cache (subprocesses
# started by tests inherit it).
os.environ["SSL_PRETRAIN_CACHE"] = tempfile.mkdtemp(prefix="ssl-pretrain-cache-")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


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


@pytest.fixture(scope="session")
def digits_folder(tmp_path_factory) -> Path:
    """200 real digits as 16x16 PNG files in class subfolders."""
    folder = tmp_path_factory.mktemp("digits")
    write_digit_images(folder, 200)
    return folder


def tiny_config(*overrides: str, source: str = "builtin:digits:train") -> Config:
    """smallconv at 16 px, batch 64, 1 epoch, no workers, no monitor, fp32: a second or two per epoch."""
    base = [
        f"data.source={source}", "data.num_workers=0", "data.max_images=256",
        "augment.input_size=16", "augment.min_scale=0.25",
        "model.backbone=smallconv", "simclr.hidden_dim=128", "simclr.output_dim=32",
        "simclr.temperature=0.2", "optim.lr=0.5", "optim.warmup_epochs=0",
        "train.epochs=1", "train.batch_size=64", "train.log_every_steps=1",
        "train.precision=fp32",  # the same arithmetic on every machine (auto is bf16 where native)
    ]
    return load_config(None, base + list(overrides))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def kill_after_checkpoint(monkeypatch, global_step: int):
    """Make ``pretrain`` raise KeyboardInterrupt right after writing the checkpoint of
    ``global_step`` (a kill at the worst moment); returns a function that undoes it."""
    from ssl_pretrain import train as train_module

    real_write = train_module.write_checkpoint

    def write_then_die(run, cfg, model, optimizer, scheduler, state, clock=None):
        real_write(run, cfg, model, optimizer, scheduler, state, clock)
        if state.global_step == global_step:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "write_checkpoint", write_then_die)
    return lambda: monkeypatch.setattr(train_module, "write_checkpoint", real_write)
