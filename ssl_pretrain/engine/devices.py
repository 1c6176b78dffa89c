"""Where a run computes: the torch device a setting names, and the CPU cores this process may use
(both read by pretraining, evaluation and the classifier)."""

from __future__ import annotations

import os

import torch

from ssl_pretrain.settings import ConfigError


def resolve_device(setting: str) -> torch.device:
    """``auto`` -> CUDA, then MPS, then CPU; anything else must be a usable torch device.

    Raises:
        ConfigError: not a device name, or a GPU this torch cannot see (one line).
    """
    if setting == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    try:
        device = torch.device(setting)
    except RuntimeError:
        raise ConfigError(f"'{setting}' is not a torch device (try auto, cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{setting}' asked for, but this torch sees no CUDA GPU")
    return device


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity: ``taskset``, a container's cpuset),
    else the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
