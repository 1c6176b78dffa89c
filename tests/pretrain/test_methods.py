"""The method registry (``ssl_pretrain.methods``): each loss agrees with a slow restatement of its
paper's formula on two augmented views of real digits, the momentum schedules do what the papers
say, every method trains end to end through ``ssl-pretrain``, exports its student and resumes
bit-exactly after a kill, and the errors a user hits name what to fix.

The loss tests build a method around a tiny backbone, record what its heads output during one
``forward`` (forward hooks), and recompute only the loss from those outputs in float64 NumPy.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ssl_pretrain import cli
from ssl_pretrain.checkpoint import load_backbone, read_backbone_file
from ssl_pretrain.config import ConfigError, load_config
from ssl_pretrain.methods import METHODS, barlowtwins, byol, dino, moco, simsiam, vicreg
from ssl_pretrain.methods.base import cosine_momentum

from loss_references import build, digit_views, recorded
from tiny_runs import KILL_AT_STEP, checkpoint_model, kill_after_checkpoint, pretrain_args

RTOL = 1e-5


# ---------------------------------------------------------------------------------------------
# Loss restatements on real views


def halves(array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A head's output on the two views batched together -> one array per view."""
    return tuple(np.split(array, 2))


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.sum(unit(a) * unit(b), axis=1)))


def log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def test_byol_loss_is_the_papers_normalised_mse_up_to_its_offset():
    """BYOL (Grill et al. 2020), Eq. 2: ``L = 2 - 2 <q, z'> / (|q| |z'|)`` per image, symmetrised
    over the views. The code uses lightly's ``-cos`` averaged over the two directions, which is
    ``(mean over directions of (2 - 2 cos) - 2) / 2``: the paper's loss shifted by -2 and halved."""
    method = build(byol, hidden_dim=64, output_dim=16)
    with recorded(method, "projection_head", "prediction_head", "target_projection_head") as out:
        loss = method(digit_views()).item()
    p_a, p_b = halves(out["prediction_head"][0])
    z_a, z_b = halves(out["target_projection_head"][0])
    paper = 0.5 * ((2 - 2 * mean_cosine(p_a, z_b)) + (2 - 2 * mean_cosine(p_b, z_a)))
    assert loss == pytest.approx((paper - 2) / 2, rel=RTOL)
    # a fresh target is a copy of the online network: at step 0 it projects exactly as it does
    assert np.array_equal(out["target_projection_head"][0], out["projection_head"][0])


def test_simsiam_loss_is_the_symmetrised_negative_cosine():
    """SimSiam (Chen & He 2021), Algorithm 1: ``L = D(p1, sg(z2))/2 + D(p2, sg(z1))/2``,
    ``D(p, z) = -mean cos(p, z)``; the predictor runs on each view's projections."""
    method = build(simsiam, output_dim=32, prediction_hidden_dim=8)
    with recorded(method, "projection_head", "prediction_head") as out:
        loss = method(digit_views()).item()
    z_1, z_2 = halves(out["projection_head"][0])
    p_1, p_2 = out["prediction_head"]
    assert loss == pytest.approx(-mean_cosine(p_1, z_2) / 2 - mean_cosine(p_2, z_1) / 2, rel=RTOL)


def test_simsiam_stops_the_gradient_through_the_target_projection():
    """Algorithm 1's ``z.detach()``: the loss reaches the projections only through the predictor."""
    method = build(simsiam, output_dim=32, prediction_hidden_dim=8)
    kept = []
    method.projection_head.register_forward_hook(lambda module, args, z: kept.append(z) or z.retain_grad())
    method(digit_views()).backward()
    (z,) = kept
    # d/dz through the predictor only: recompute it with the predictor's own gradient
    z_1, z_2 = z.detach().chunk(2)
    z_1.requires_grad_(True), z_2.requires_grad_(True)
    cos = nn.functional.cosine_similarity
    via_predictor = -0.5 * (cos(method.prediction_head(z_1), z_2.detach()).mean()
                            + cos(method.prediction_head(z_2), z_1.detach()).mean())
    via_predictor.backward()
    assert torch.allclose(z.grad, torch.cat([z_1.grad, z_2.grad]), rtol=1e-5, atol=1e-8)


def barlow_twins_reference(z_a: np.ndarray, z_b: np.ndarray, lambda_param: float) -> float:
    """Barlow Twins (Zbontar et al. 2021), Eq. 1 and Algorithm 1, with the authors' code's
    normalisation (``BatchNorm1d(affine=False)``: biased variance plus eps 1e-5; Algorithm 1's
    ``z.std(0)`` is the unbiased one, without eps):
    ``C_ij = sum_b za_bi zb_bj / N``; ``L = sum_i (1 - C_ii)^2 + lambda sum_{i != j} C_ij^2``."""
    n, d = z_a.shape
    norm = lambda z: (z - z.mean(0)) / np.sqrt(z.var(0) + 1e-5)  # noqa: E731
    c = norm(z_a).T @ norm(z_b) / n
    on_diagonal = sum((1 - c[i, i]) ** 2 for i in range(d))
    off_diagonal = sum(c[i, j] ** 2 for i in range(d) for j in range(d) if i != j)
    return on_diagonal + lambda_param * off_diagonal


def test_barlow_twins_loss_matches_the_paper():
    method = build(barlowtwins, hidden_dim=64, output_dim=24, lambda_param=0.05)
    with recorded(method, "projection_head") as out:
        loss = method(digit_views()).item()
    assert loss == pytest.approx(barlow_twins_reference(*halves(out["projection_head"][0]), 0.05), rel=RTOL)


def vicreg_reference(z_a: np.ndarray, z_b: np.ndarray, lam: float, mu: float, nu: float) -> float:
    """VICReg (Bardes et al. 2022), Eq. 1-6 as the authors' code computes them:
    invariance ``s = mean_(b,k) (z_bk - z'_bk)^2``; variance ``v(Z) = mean_k max(0, 1 - sqrt(Var(z_k) + 1e-4))``
    (unbiased variance), averaged over the two branches; covariance
    ``c(Z) = sum_{i != j} C(Z)_ij^2 / d`` with ``C(Z) = (Z - mean)^T (Z - mean) / (n - 1)``, summed
    over the branches; ``L = lambda s + mu (v(Z) + v(Z')) / 2 + nu (c(Z) + c(Z'))``."""
    n, d = z_a.shape
    invariance = np.mean((z_a - z_b) ** 2)

    def variance(z):
        return np.mean(np.maximum(0.0, 1.0 - np.sqrt(z.var(0, ddof=1) + 1e-4)))

    def covariance(z):
        centred = z - z.mean(0)
        cov = centred.T @ centred / (n - 1)
        return sum(cov[i, j] ** 2 for i in range(d) for j in range(d) if i != j) / d

    return lam * invariance + mu * (variance(z_a) + variance(z_b)) / 2 + nu * (covariance(z_a) + covariance(z_b))


def test_vicreg_loss_matches_the_paper():
    settings = dict(invariance_weight=25.0, variance_weight=15.0, covariance_weight=2.0)
    method = build(vicreg, hidden_dim=64, output_dim=24, **settings)
    with recorded(method, "projection_head") as out:
        loss = method(digit_views()).item()
    z_a, z_b = halves(out["projection_head"][0])
    assert loss == pytest.approx(vicreg_reference(z_a, z_b, *settings.values()), rel=RTOL)


def info_nce(q: np.ndarray, k: np.ndarray, queue: np.ndarray, temperature: float) -> float:
    """MoCo (He et al. 2020), Algorithm 1: logits ``[q.k+, q.queue]`` / T of unit vectors, the
    positive first, cross-entropy with label 0, mean over the batch."""
    q, k = unit(q), unit(k)
    logits = np.concatenate([np.sum(q * k, axis=1, keepdims=True), q @ queue.T], axis=1) / temperature
    return float(-np.mean(log_softmax(logits)[:, 0]))


def enqueue(queue: np.ndarray, pointer: int, keys: np.ndarray) -> tuple[np.ndarray, int]:
    """Algorithm 1's ``enqueue(queue, k); dequeue(queue)``: the oldest entries are replaced."""
    queue = queue.copy()
    queue[pointer:pointer + len(keys)] = unit(keys)
    return queue, (pointer + len(keys)) % len(queue)


def moco_step(queue_size: int = 64):
    method = build(moco, hidden_dim=64, output_dim=16, temperature=0.2, queue_size=queue_size)
    bank = method.queue
    queue, pointer = bank.bank.double().numpy().copy(), int(bank.bank_ptr)
    with recorded(method, "projection_head", "key_projection_head") as out:
        loss = method(digit_views()).item()
    q_1, q_2 = halves(out["projection_head"][0])
    k_1, k_2 = halves(out["key_projection_head"][0])
    return method, loss, queue, pointer, (q_1, q_2, k_1, k_2), out


def test_moco_symmetric_loss_scores_both_directions_against_past_keys_only():
    """MoCo v2 symmetrised (the authors' CIFAR-10 demo ``contrastive_loss`` twice, then one
    ``_dequeue_and_enqueue(cat(k2, k1))``): ``L = (InfoNCE(q1, k2, Q) + InfoNCE(q2, k1, Q)) / 2``
    with the same queue ``Q`` of earlier batches' keys in both terms; after the step the queue
    holds ``k2`` then ``k1`` (unit length) where the oldest keys were."""
    method, loss, queue, pointer, (q_1, q_2, k_1, k_2), out = moco_step()
    assert loss == pytest.approx(0.5 * (info_nce(q_1, k_2, queue, 0.2) + info_nce(q_2, k_1, queue, 0.2)), rel=RTOL)
    final, pointer_after = enqueue(*enqueue(queue, pointer, k_2), k_1)
    bank = method.queue
    assert np.allclose(bank.bank.double().numpy(), final, rtol=0, atol=1e-6) and int(bank.bank_ptr) == pointer_after == 32
    # the key encoder starts as a copy of the query encoder
    assert np.array_equal(out["key_projection_head"][0], out["projection_head"][0])


def dino_reference(teacher: list[np.ndarray], student: list[np.ndarray], center: np.ndarray,
                   teacher_temperature: float, student_temperature: float) -> float:
    """DINO (Caron et al. 2021), Algorithm 1 with multi-crop: ``H(t, s) = -sum_k P_t log P_s``
    with ``P_t = softmax((t - C) / T_t)``, ``P_s = softmax(s / T_s)``, averaged over the batch and
    over the pairs (teacher view i, student view j), j != i (the teacher sees the global views)."""
    terms = []
    for i, t in enumerate(teacher):
        p_t = np.exp(log_softmax((t - center) / teacher_temperature))
        for j, s in enumerate(student):
            if i != j:
                terms.append(np.mean(-np.sum(p_t * log_softmax(s / student_temperature), axis=1)))
    return float(np.mean(terms))


def test_dino_loss_centre_and_teacher_temperature_match_the_paper():
    """Two steps with two global views and two local crops: the second step uses the centre
    ``C <- m C + (1 - m) mean(teacher outputs)`` of the first and the warmed-up temperature."""
    settings = dict(hidden_dim=32, bottleneck_dim=8, output_dim=24, student_temperature=0.1,
                    teacher_temperature=0.07, warmup_teacher_temperature=0.04, teacher_warmup_fraction=0.1,
                    center_momentum=0.9)
    method = build(dino, **settings)
    global_a, global_b = digit_views()
    views = [global_a, global_b, global_a[..., 2:10, 3:11], global_b[..., 5:13, 4:12]]
    center = np.zeros(24)
    for progress, temperature in ((0.0, 0.04), (0.05, 0.055)):
        method.after_step(progress)  # sets the temperature's clock (and moves the teacher)
        with recorded(method, "projection_head", "teacher_projection_head") as out:
            loss = method(views).item()
        teacher = list(halves(out["teacher_projection_head"][0]))
        student = [*halves(out["projection_head"][0]), *halves(out["projection_head"][1])]
        assert loss == pytest.approx(dino_reference(teacher, student, center, temperature, 0.1), rel=RTOL)
        center = 0.9 * center + 0.1 * np.mean(np.concatenate(teacher), axis=0)
        assert np.allclose(method.criterion.center.double().numpy().ravel(), center, rtol=1e-5, atol=1e-7)


def test_a_fresh_dino_teacher_is_a_copy_of_the_student():
    method = build(dino, hidden_dim=32, bottleneck_dim=8, output_dim=24)
    with recorded(method, "projection_head", "teacher_projection_head") as out:
        method(digit_views())
    assert np.array_equal(out["teacher_projection_head"][0], out["projection_head"][0])


# ---------------------------------------------------------------------------------------------
# Momentum and temperature schedules


@pytest.mark.parametrize("base", [0.0, 0.9, 0.99, 0.996, 0.999])
def test_cosine_momentum_runs_from_base_to_one(base):
    """BYOL Sec. 3.2: ``tau = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2``."""
    assert cosine_momentum(base, 0.0) == base and cosine_momentum(base, 1.0) == 1.0
    assert cosine_momentum(base, 0.5) == pytest.approx(1 - (1 - base) / 2, rel=1e-12)
    assert cosine_momentum(base, 0.25) == pytest.approx(1 - (1 - base) * (math.cos(math.pi / 4) + 1) / 2, rel=1e-12)
    assert cosine_momentum(base, -0.5) == base and cosine_momentum(base, 2.0) == 1.0  # clamped


def test_byol_target_follows_the_online_network_by_the_scheduled_momentum():
    """BYOL Sec. 3.2: ``xi <- tau xi + (1 - tau) theta`` after each step, ``tau`` on the cosine
    schedule; evaluated as ``(tau xi) + (1 - tau) theta``, which is what the update must give
    bit for bit."""
    method = build(byol, hidden_dim=64, output_dim=16)
    with torch.no_grad():  # an online network that has moved away from its target
        for param in [*method.backbone.parameters(), *method.projection_head.parameters()]:
            param.add_(torch.randn_like(param))
    pairs = [(method.target_backbone, method.backbone), (method.target_projection_head, method.projection_head)]
    before = [[p.detach().clone() for p in target.parameters()] for target, _ in pairs]
    method.after_step(0.3)
    tau = cosine_momentum(0.99, 0.3)
    for (target, online), old in zip(pairs, before):
        for new, old_param, theta in zip(target.parameters(), old, online.parameters()):
            assert torch.equal(new, torch.add(old_param * tau, theta.detach(), alpha=1 - tau))
            assert not new.requires_grad


@pytest.mark.parametrize("progress, expected", [
    (0.0, 0.04), (0.025, 0.0475), (0.05, 0.055), (0.075, 0.0625), (0.1, 0.07), (0.5, 0.07), (1.0, 0.07)])
def test_dino_teacher_temperature_warms_up_linearly(progress, expected):
    """DINO Sec. 3.1/Appendix: teacher temperature 0.04 -> 0.07 linearly over the warm-up (here
    10% of training), then constant."""
    method = build(dino, hidden_dim=32, bottleneck_dim=8, output_dim=24, teacher_temperature=0.07)
    method.after_step(progress)
    assert method.teacher_temperature() == pytest.approx(expected, rel=1e-6)


def test_dino_without_warmup_uses_the_final_teacher_temperature():
    method = build(dino, hidden_dim=32, bottleneck_dim=8, output_dim=24, teacher_warmup_fraction=0.0,
                   teacher_temperature=0.07)
    assert method.teacher_temperature() == 0.07


# ---------------------------------------------------------------------------------------------
# End to end through ssl-pretrain, resume after a kill


TEACHERS = {"moco": "key_backbone", "byol": "target_backbone", "dino": "teacher_backbone"}
CARRIED = {"moco": ("queue.bank", "queue.bank_ptr", "key_backbone.", "key_projection_head."),
           "byol": ("target_backbone.", "target_projection_head."),
           "dino": ("criterion.center", "progress", "teacher_backbone.", "teacher_projection_head.")}
"""Model state beyond the student that a resume must carry over, by method."""
CNN_METHODS = [name for name, module in METHODS.items() if not hasattr(module, "BACKBONES")]
"""The methods that train smallconv; MAE trains ViTs only, its end-to-end tests are in test_vit.py."""


@pytest.fixture(scope="module")
def finished_runs(tmp_path_factory):
    """Method -> folder of an uninterrupted 2-epoch run (run once per method, shared)."""
    runs: dict[str, Path] = {}

    def get(method: str) -> Path:
        if method not in runs:
            out = tmp_path_factory.mktemp(method) / "run"
            assert cli.main(pretrain_args(method, out)) == 0
            runs[method] = out
        return runs[method]

    return get


@pytest.mark.parametrize("method", CNN_METHODS)
def test_every_method_trains_end_to_end_and_exports_its_student(method, finished_runs):
    """``ssl-pretrain --method NAME`` on the built-in digits: finite losses, an exported backbone
    that loads and embeds, and that export is the student's weights, not the teacher's."""
    run = finished_runs(method)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r["loss_mean"] for r in records if "loss_mean" in r]
    steps = [r["loss"] for r in records if "loss" in r]
    assert len(epochs) == 2 and len(steps) == 4 and all(math.isfinite(value) for value in epochs + steps)
    backbone, info = load_backbone(run / "backbone.safetensors")
    assert (info.architecture, info.feature_dim) == ("smallconv", 256)
    with torch.no_grad():
        assert backbone(torch.randn(3, 3, 16, 16)).shape == (3, 256)
    exported, _ = read_backbone_file(run / "backbone.safetensors")
    checkpoint = torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    model = checkpoint["model"]
    assert checkpoint["config"]["method"] == method
    assert all(torch.equal(tensor, model[f"backbone.{key}"]) for key, tensor in exported.items())
    assert len(exported) == sum(key.startswith("backbone.") for key in model)
    if method in TEACHERS:  # the teacher has drifted behind the student: the export is not it
        teacher = {key: model[f"{TEACHERS[method]}.{key}"] for key in exported}
        assert not all(torch.equal(exported[key], teacher[key]) for key in exported)


@pytest.mark.parametrize("method", CNN_METHODS)
def test_every_method_resumes_bit_exactly_after_a_kill(method, finished_runs, tmp_path, monkeypatch):
    """Killed right after the checkpoint of step 3 (mid-epoch), resumed with ``--resume``: the final model
    state (momentum encoders, MoCo's queue and pointer, DINO's centre and clock included) is the
    uninterrupted run's, bit for bit."""
    killed = tmp_path / "killed"
    undo = kill_after_checkpoint(monkeypatch, KILL_AT_STEP)
    assert cli.main(pretrain_args(method, killed)) == 130  # KeyboardInterrupt, as for a kill
    undo()
    assert torch.load(killed / "checkpoints" / "last.pt", weights_only=True)["global_step"] == KILL_AT_STEP
    assert cli.main(pretrain_args(method, killed, "--resume")) == 0
    straight, resumed = checkpoint_model(finished_runs(method)), checkpoint_model(killed)
    assert straight.keys() == resumed.keys()
    different = [key for key in straight if not torch.equal(straight[key], resumed[key])]
    assert different == []
    for prefix in CARRIED.get(method, ()):  # what the comparison must have covered
        assert any(key.startswith(prefix) for key in straight), prefix


# ---------------------------------------------------------------------------------------------
# Bad input


def test_an_unknown_method_is_refused_with_the_list_of_methods():
    with pytest.raises(ConfigError) as error:
        load_config(None, ["method=swav"])
    message = str(error.value)
    assert "\n" not in message and "'method'" in message and "swav" in message
    assert all(name in message for name in METHODS)


def test_the_old_loss_temperature_key_names_its_new_place():
    with pytest.raises(ConfigError, match=r"simclr\.temperature"):
        load_config(None, ["loss.temperature=0.2"])


def test_a_moved_model_key_names_its_new_place():
    with pytest.raises(ConfigError, match=r"'model\.proj_hidden_dim' is now 'simclr\.hidden_dim'"):
        load_config(None, ["model.proj_hidden_dim=256"])


def test_resuming_a_simclr_run_as_byol_is_refused(finished_runs, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_runs("simclr"), run)
    args = pretrain_args("simclr", run, "--resume")
    args[args.index("--method") + 1] = "byol"
    capsys.readouterr()
    assert cli.main(args) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ssl-pretrain: error:")]
    assert len(errors) == 1
    error = errors[0]
    assert "'method'" in error and "byol" in error and "simclr" in error


def test_list_methods_prints_every_method(capsys):
    assert cli.main(["--list-methods"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in printed] == list(METHODS)
    assert all(METHODS[line.split()[0]].SUMMARY in line for line in printed)


def test_another_methods_section_may_change_on_resume_but_not_the_methods_own(tmp_path):
    """Only the trained method's section is part of what a resume must keep."""
    from ssl_pretrain.resume import check_resume_compatible, method_relevant

    saved = load_config(None, ["method=byol"]).to_dict()
    check_resume_compatible(method_relevant(saved), method_relevant(
        load_config(None, ["method=byol", "simclr.temperature=0.2"]).to_dict()))
    with pytest.raises(ConfigError, match=r"'byol.momentum'"):
        check_resume_compatible(method_relevant(saved), method_relevant(
            load_config(None, ["method=byol", "byol.momentum=0.9"]).to_dict()))
