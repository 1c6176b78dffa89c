"""Gradient clipping (``optim.grad_clip``) keeps a run alive at a learning rate that blows it up.

SimCLR with BatchNorm and a cosine-similarity loss is nearly scale-invariant, so only an absurd
rate diverges here: 3e10 (x 64/256 = 7.5e9 per step) reaches NaN in the first epoch on CPU, while
1e9 does not. Clipped to norm 0.01 the same rate trains on (finite up to 1e11 at least). The stop
itself, its message and the last good checkpoint are tested in ``test_pretrain.py``.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from ssl_pretrain.checkpoint import load_backbone, load_checkpoint
from ssl_pretrain.data import digits_source
from ssl_pretrain.diagnostics import DivergenceError
from ssl_pretrain.train import pretrain

from tiny_runs import tiny_config

HUGE_LR = ("optim.lr=3e10", "optim.weight_decay=0", "train.epochs=2", "train.threads=1")


@pytest.fixture(autouse=True)
def keep_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _all_finite(tensors) -> bool:
    return all(torch.isfinite(tensor.float()).all() for tensor in tensors)


def test_a_huge_learning_rate_diverges_without_clipping_and_trains_with_it(tmp_path):
    # Which blows up first depends on the CPU's kernels: the loss (Xeon, AVX-512) or BatchNorm's
    # running variance (AMD EPYC, AVX2); either way the run stops in the first epoch.
    with pytest.raises(DivergenceError, match=r"loss became nan at epoch 1.*set optim.grad_clip|became non-finite in epoch 1"):
        pretrain(tiny_config(*HUGE_LR), tmp_path / "unclipped", progress=False)
    run = tmp_path / "clipped"
    pretrain(tiny_config(*HUGE_LR, "optim.grad_clip=0.01"), run, progress=False)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [math.isfinite(record["loss"]) for record in records if "loss" in record] == [True] * 8
    assert _all_finite(load_checkpoint(run / "checkpoints" / "last.pt")["model"].values())  # BatchNorm stats too
    backbone, _ = load_backbone(run)
    images = np.asarray(digits_source("test").images[:32], dtype=np.float32) / 255.0
    batch = torch.from_numpy(images)[:, None].repeat(1, 3, 2, 2)  # 8 px -> 16 px, 3 channels
    with torch.no_grad():
        assert _all_finite([backbone(batch)])


def test_a_run_whose_batchnorm_statistics_overflow_is_stopped(tmp_path):
    # With clipping the loss stays finite, but BatchNorm's running variance overflows to inf.
    with pytest.raises(DivergenceError, match="became non-finite.*although the loss stayed finite"):
        pretrain(tiny_config(*HUGE_LR, "optim.grad_clip=1.0"), tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "backbone.safetensors").exists()
