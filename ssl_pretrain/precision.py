"""The precision a run trains in: bf16 autocast where the hardware runs it natively and faster,
fp32 elsewhere (``ssl_pretrain.engine.hardware`` knows the hardware; this module times the run's
own network where only a measurement can tell, and builds the autocast context the step uses).

``cfg`` here is the run's ``ssl_pretrain.config.Config`` (its ``method``, ``model``, ``augment``
and ``train`` sections are read).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Any, Callable

import torch

from ssl_pretrain.engine import hardware
from ssl_pretrain.methods import build_model

PROBE_STEPS = 3
"""Timed forward+backward passes per precision in the start-up probe (after one untimed)."""


def probe_workload(cfg, channels_last: bool) -> str:
    """What the precision probe's answer depends on besides the machine."""
    return (f"{cfg.method} {cfg.model.backbone} {cfg.augment.input_size}px batch {cfg.train.batch_size}"
            f"{' channels-last' if channels_last else ''}")


def probe_precisions(cfg, device: torch.device, channels_last: bool) -> dict[str, float]:
    """Images/s of forward+backward of the configured method and network (a fresh one: weights do
    not change the speed) in fp32 and under bf16 autocast, on random views of the run's size (a
    batch of at most 64 images, so a large network still takes seconds). The random state is left
    as it was."""
    images = min(cfg.train.batch_size, 64)
    size, memory_format = cfg.augment.input_size, torch.channels_last if channels_last else torch.contiguous_format
    rates = {}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        network = build_model(cfg).to(device).train()
        if channels_last:
            network.to(memory_format=torch.channels_last)
        views = torch.randn(2 * images, 3, size, size, device=device).contiguous(memory_format=memory_format)
        for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
            context = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()
            for index in range(PROBE_STEPS + 1):
                if index == 1:
                    started = time.perf_counter()
                with context:
                    loss = network(list(views.chunk(2)))
                loss.backward()
                network.zero_grad(set_to_none=True)
            rates[name] = PROBE_STEPS * images / (time.perf_counter() - started)
    return rates


def default_channels_last(cfg, device: torch.device) -> bool:
    """``train.channels_last``, by default on for CUDA (tensor cores) and CPUs (oneDNN's faster
    convolutions; BENCHMARKS.md, "Pretraining throughput"), off for MPS."""
    return device.type in ("cuda", "cpu") if cfg.train.channels_last is None else cfg.train.channels_last


def training_autocast(cfg, device: torch.device, channels_last: bool, probe: bool = True) -> Callable[[], Any]:
    """The context each step's forward pass runs in: bf16 autocast where ``train.precision``
    resolves to bf16 on ``device`` (``hardware.resolve_precision``), else a no-op.

    Args:
        probe: allow timing the network where only a measurement can tell (distributed runs do
            not: every rank must decide alike without timing its own share).
    """
    timing = (lambda: probe_precisions(cfg, device, channels_last)) if probe else None
    use_bf16 = hardware.resolve_precision(cfg.train.precision, device, timing,
                                          workload=probe_workload(cfg, channels_last))
    return (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 else nullcontext
