"""NT-Xent as wired here agrees with a NumPy transcription of the SimCLR paper's loss."""

import numpy as np
import pytest
import torch

from ssl_pretrain.methods import simclr

from loss_references import nt_xent_reference


def build_loss(temperature: float) -> torch.nn.Module:
    """The NT-Xent criterion exactly as the SimCLR method wires it."""
    return simclr.SimCLR(torch.nn.Identity(), 16, simclr.Settings(temperature=temperature)).criterion


@pytest.mark.parametrize("temperature", [0.1, 0.2, 0.5, 1.0])
def test_nt_xent_matches_the_paper(temperature, rng):
    z_a, z_b = rng.normal(size=(8, 16)), rng.normal(size=(8, 16))
    loss = build_loss(temperature)
    ours = loss(torch.from_numpy(z_a), torch.from_numpy(z_b)).item()
    assert ours == pytest.approx(nt_xent_reference(z_a, z_b, temperature), rel=1e-6)


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_the_one_pass_nt_xent_that_simclr_trains_with_matches_the_paper(temperature, rng):
    z_a, z_b = rng.normal(size=(8, 16)), rng.normal(size=(8, 16))
    ours = simclr.multicrop_ntxent([torch.from_numpy(z_a), torch.from_numpy(z_b)], temperature).item()
    assert ours == pytest.approx(nt_xent_reference(z_a, z_b, temperature), rel=1e-6)


def test_the_one_pass_multi_crop_nt_xent_equals_lightlys_loss_per_pair_with_its_gradients(rng):
    # 2 global views + 3 crops: pairs (0, 1) and (g, v) for g in 0, 1 and v in 2..4
    views = [torch.tensor(rng.normal(size=(6, 8)), requires_grad=True) for _ in range(5)]
    pairs = [(0, 1)] + [(g, v) for v in range(2, 5) for g in (0, 1)]
    lightly_loss = build_loss(0.2)
    reference = sum(lightly_loss(views[a], views[b]) for a, b in pairs) / len(pairs)
    ours = simclr.multicrop_ntxent(views, 0.2)
    assert ours.item() == pytest.approx(reference.item(), rel=1e-9)
    for mine, theirs in zip(torch.autograd.grad(ours, views), torch.autograd.grad(reference, views)):
        np.testing.assert_allclose(mine.numpy(), theirs.numpy(), rtol=1e-7, atol=1e-12)


def test_matching_views_give_a_lower_loss_than_unrelated_ones(rng):
    z = rng.normal(size=(16, 32))
    loss = build_loss(0.5)
    aligned = loss(torch.from_numpy(z), torch.from_numpy(z + 0.01 * rng.normal(size=z.shape))).item()
    unrelated = loss(torch.from_numpy(z), torch.from_numpy(rng.normal(size=z.shape))).item()
    assert aligned < unrelated


def build_dcl(temperature: float) -> torch.nn.Module:
    return simclr.SimCLR(torch.nn.Identity(), 16, simclr.Settings(temperature=temperature, loss="dcl")).criterion


def dcl_reference(z_a: np.ndarray, z_b: np.ndarray, temperature: float) -> float:
    """Decoupled contrastive loss (Yeh et al. 2022, Eq. 6), written out slowly: NT-Xent without the
    positive pair in the denominator.

    l(i, j) = -s_ij/t + log sum_{k != i, k != j} exp(s_ik/t);  L = 1/(2N) sum over both views of each image.
    """
    n = len(z_a)
    z = np.concatenate([z_a, z_b])
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    total = 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        sims = z @ z[i]
        total += -sims[j] / temperature + np.log(sum(np.exp(sims[k] / temperature)
                                                     for k in range(2 * n) if k not in (i, j)))
    return total / (2 * n)


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_decoupled_loss_matches_the_paper(temperature, rng):
    z_a, z_b = rng.normal(size=(8, 16)), rng.normal(size=(8, 16))
    ours = build_dcl(temperature)(torch.from_numpy(z_a), torch.from_numpy(z_b)).item()
    assert ours == pytest.approx(dcl_reference(z_a, z_b, temperature), rel=1e-6)
    # the positive left the denominator: DCL = NT-Xent minus the mean log of what it took away
    assert ours < nt_xent_reference(z_a, z_b, temperature)
