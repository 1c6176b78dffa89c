"""What the loss tests compare against: slow NumPy restatements of the papers' formulas, and the
machinery to record what a method's heads output on real digit views (forward hooks) so that only
the loss is recomputed, in float64."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from ssl_pretrain.augment.batch_transforms import batch_views, build_batch_augment
from ssl_pretrain.data import digits_source

from tiny_runs import tiny_config

FEATURES = 32


def nt_xent_reference(z_a: np.ndarray, z_b: np.ndarray, temperature: float) -> float:
    """SimCLR (Chen et al. 2020), Algorithm 1, written out slowly.

    z = [z_1, ..., z_2N] with z_{2k-1}, z_{2k} the two views of image k;
    s_ij = z_i.z_j / (|z_i||z_j|);
    l(i, j) = -log( exp(s_ij/t) / sum_{k != i} exp(s_ik/t) );
    L = 1/(2N) sum_k [ l(2k-1, 2k) + l(2k, 2k-1) ].
    """
    n = len(z_a)
    z = np.empty((2 * n, z_a.shape[1]))
    z[0::2], z[1::2] = z_a, z_b
    total = 0.0
    for i in range(2 * n):
        j = i + 1 if i % 2 == 0 else i - 1
        sims = [z[i] @ z[k] / (np.linalg.norm(z[i]) * np.linalg.norm(z[k])) for k in range(2 * n)]
        denominator = sum(np.exp(sims[k] / temperature) for k in range(2 * n) if k != i)
        total += -np.log(np.exp(sims[j] / temperature) / denominator)
    return total / (2 * n)


def digit_views(count: int = 16, seed: int = 0) -> list[torch.Tensor]:
    """Two augmented views (the training pipeline's own crop/flip/jitter, 16 px) of ``count``
    real digits."""
    images = digits_source("train").images[:count]
    rgb = torch.from_numpy(np.repeat(images[..., None], 3, axis=-1))
    return list(batch_views(rgb, build_batch_augment(tiny_config().augment), seed))


def tiny_backbone() -> nn.Module:
    """Images of any size -> FEATURES-d features (pooled to 4x4 first, so multi-crop works)."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(3 * 16, FEATURES))


def build(module, **settings) -> nn.Module:
    torch.manual_seed(0)
    return module.build(tiny_backbone(), FEATURES, module.Settings(**settings)).train()


@contextmanager
def recorded(method: nn.Module, *heads: str):
    """``{head: [output of each call, float64 NumPy]}`` for the named submodules of ``method``."""
    outputs: dict[str, list[np.ndarray]] = {name: [] for name in heads}
    handles = [getattr(method, name).register_forward_hook(
        lambda module, args, out, name=name: outputs[name].append(out.detach().double().numpy()))
        for name in heads]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()
