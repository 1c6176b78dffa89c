"""Where a run stands and how it continues after a kill: the run state, the checkpoint that holds
it (model, optimiser, scheduler, budget clock, every random generator) and the check that a resumed
run trains the same model the same way.

``cfg`` here is the run's ``ssl_pretrain.config.Config``.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

import ssl_pretrain
from ssl_pretrain.checkpoint import BackboneInfo, load_checkpoint, load_state_dict_strict, save_checkpoint
from ssl_pretrain.engine.distributed import unwrap
from ssl_pretrain.engine.optim import BudgetClock
from ssl_pretrain.engine.run_folder import RunFolder
from ssl_pretrain.methods import METHODS
from ssl_pretrain.models.backbones import resolve_small_stem
from ssl_pretrain.settings import ConfigError

log = logging.getLogger("ssl_pretrain")

RESUMABLE_CHANGES = {
    "train.epochs", "train.device", "train.threads", "train.keep_freed_memory", "train.log_every_steps", "train.tensorboard",
    "train.checkpoint_every_steps", "train.keep_every_epochs", "data.num_workers", "data.source",
    "monitor.train", "monitor.val", "monitor.every_epochs",
}
"""Keys that may change when a run is resumed; anything else must match the saved config. The
number of ranks may change too: the global batch order does not depend on it."""


@dataclass
class RunState:
    """Where the run stands: the next epoch and step to run, and what was skipped so far."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    skipped: dict[str, str] = field(default_factory=dict)


def backbone_info(cfg, feature_dim: int, epoch: int = 0) -> BackboneInfo:
    """What a checkpoint and the exported backbone say about the network and its input."""
    return BackboneInfo(
        architecture=cfg.model.backbone,
        small_stem=resolve_small_stem(cfg.model.small_stem, cfg.augment.input_size),
        feature_dim=feature_dim,
        input_size=cfg.augment.input_size,
        mean=tuple(cfg.augment.mean),
        std=tuple(cfg.augment.std),
        epoch=epoch,
        hflip=cfg.augment.hflip_prob > 0,
    )


def check_resume_compatible(saved: dict[str, Any], new: dict[str, Any], prefix: str = "") -> None:
    """A resumed run must train the same model the same way; only a few keys may change.

    Raises:
        ConfigError: a key outside ``RESUMABLE_CHANGES`` differs (named, with both values).
    """
    for key, saved_value in saved.items():
        path = f"{prefix}{key}"
        new_value = new.get(key)
        if isinstance(saved_value, dict) and isinstance(new_value, dict):
            check_resume_compatible(saved_value, new_value, path + ".")
        elif saved_value != new_value and path not in RESUMABLE_CHANGES:
            raise ConfigError(
                f"cannot resume: '{path}' is {new_value!r} now but the run was started with "
                f"{saved_value!r} (use another --out folder for a different setting)"
            )


def method_relevant(config: dict[str, Any]) -> dict[str, Any]:
    """A config without the sections of the methods it does not train (they may change on resume)."""
    return {key: value for key, value in config.items() if key not in METHODS or key == config.get("method")}


def restore(run: RunFolder, cfg, model, optimizer, scheduler, clock: Optional[BudgetClock] = None) -> RunState:
    """Load ``last.pt`` into the model, optimiser, scheduler, budget clock and random generators;
    return where to continue."""
    state = load_checkpoint(run.last_checkpoint)
    check_resume_compatible(method_relevant(state["config"]), method_relevant(cfg.to_dict()))
    load_state_dict_strict(model, state["model"], str(run.last_checkpoint))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if clock is not None and state.get("clock"):
        clock.resume(state["clock"])
    set_rng_states(state["rng"])
    run.trim_metrics(after_step=state["global_step"])
    log.info("resumed from %s at epoch %d, step %d", run.last_checkpoint, state["epoch"] + 1,
             state["step_in_epoch"])
    return RunState(state["epoch"], state["step_in_epoch"], state["global_step"], dict(state["skipped"]))


def rng_states() -> dict[str, Any]:
    """torch's, NumPy's and Python's random states as tensors and lists ``weights_only`` loads."""
    numpy_state = np.random.get_state()
    python_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(numpy_state[1].astype(np.int64)),
        "numpy_pos": [int(numpy_state[2]), int(numpy_state[3]), float(numpy_state[4])],
        "python": [python_state[0], list(python_state[1]), python_state[2]],
    }


def set_rng_states(states: dict[str, Any]) -> None:
    """The inverse of ``rng_states``."""
    torch.set_rng_state(states["torch"])
    np.random.set_state(("MT19937", states["numpy"].numpy().astype(np.uint32), *states["numpy_pos"]))
    random.setstate((states["python"][0], tuple(states["python"][1]), states["python"][2]))


def write_checkpoint(run: RunFolder, cfg, model, optimizer, scheduler, state: RunState,
                     clock: Optional[BudgetClock] = None) -> None:
    """``last.pt``: everything ``restore`` needs, written atomically by rank 0 only."""
    if not run.writer:
        return  # rank 0 writes for everyone
    model = unwrap(model)  # torch.compile, DistributedDataParallel
    model_state = model.state_dict()
    save_checkpoint(run.last_checkpoint, {
        "config": cfg.to_dict(),
        "epoch": state.epoch,
        "step_in_epoch": state.step_in_epoch,
        "global_step": state.global_step,
        "model": {key: value.detach().cpu() for key, value in model_state.items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_states(),
        "skipped": dict(state.skipped),
        "clock": clock.state() if clock is not None else None,
        "backbone_info": backbone_info(cfg, model.feature_dim, state.epoch).__dict__,
        "versions": {"ssl_pretrain": ssl_pretrain.__version__, "torch": str(torch.__version__)},
    })
