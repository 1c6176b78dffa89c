"""Tiny pretraining runs for the tests: a config that trains in a second or two, the command line
of a two-epoch run of any method, a kill at the worst moment, and a run's final model state."""

from __future__ import annotations

from pathlib import Path

import torch

from ssl_pretrain import train as train_module
from ssl_pretrain.config import Config, load_config


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


def kill_after_checkpoint(monkeypatch, global_step: int):
    """Make ``pretrain`` raise KeyboardInterrupt right after writing the checkpoint of
    ``global_step`` (a kill at the worst moment); returns a function that undoes it."""
    real_write = train_module.write_checkpoint

    def write_then_die(run, cfg, model, optimizer, scheduler, state, clock=None):
        real_write(run, cfg, model, optimizer, scheduler, state, clock)
        if state.global_step == global_step:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "write_checkpoint", write_then_die)
    return lambda: monkeypatch.setattr(train_module, "write_checkpoint", real_write)


HEADS = {
    "simclr": ["simclr.hidden_dim=64", "simclr.output_dim=32"],
    "moco": ["moco.hidden_dim=64", "moco.output_dim=32", "moco.queue_size=320"],  # wraps around at step 3
    "byol": ["byol.hidden_dim=64", "byol.output_dim=32"],
    "simsiam": ["simsiam.output_dim=64", "simsiam.prediction_hidden_dim=16"],
    "barlowtwins": ["barlowtwins.hidden_dim=64", "barlowtwins.output_dim=64"],
    "vicreg": ["vicreg.hidden_dim=64", "vicreg.output_dim=64", "optim.lr=0.1"],
    "dino": ["dino.hidden_dim=64", "dino.bottleneck_dim=32", "dino.output_dim=128"],
}
KILL_AT_STEP = 3  # 2 epochs of 2 steps (128 images, batch 64): mid-way through the second


def pretrain_args(method: str, out: Path, *extra: str) -> list[str]:
    settings = ["data.max_images=128", "data.num_workers=0", "augment.input_size=16", "augment.min_scale=0.25",
                "model.backbone=smallconv", "train.precision=fp32", "optim.warmup_epochs=0",
                "train.checkpoint_every_steps=1", "train.log_every_steps=1", *HEADS[method]]
    return ["--data", "builtin:digits:train", "--out", str(out), "--method", method, "--epochs", "2",
            "--batch-size", "64", "--no-progress", *[part for s in settings for part in ("--set", s)], *extra]


def checkpoint_model(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)["model"]
