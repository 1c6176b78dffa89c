"""Per-method recipes in presets, AdamW with DINO's weight-decay schedule, DINO's frozen last
layer, and the collapse warning."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from ssl_pretrain import cli
from ssl_pretrain.config import ConfigError, load_config
from ssl_pretrain.engine.optim import build_optimizer, parameter_groups, set_weight_decay, weight_decay_at
from ssl_pretrain.methods import build_model, byol, simsiam
from ssl_pretrain.methods.base import Method

from tiny_runs import kill_after_checkpoint, tiny_config

PRESET = """
method: simclr
optim: {name: sgd, lr: 0.3, weight_decay: 5.0e-4}
recipes:
  dino: {optim.name: adamw, optim.lr: 5.0e-4, optim.weight_decay_end: 0.4, dino.output_dim: 512}
  byol: {optim.lr: 0.12}
"""


@pytest.fixture
def preset(tmp_path):
    path = tmp_path / "preset.yaml"
    path.write_text(PRESET)
    return path


def test_the_recipe_of_the_trained_method_is_applied_and_no_other(preset):
    simclr = load_config(preset)
    assert (simclr.recipe, simclr.optim.name, simclr.optim.lr) == (None, "sgd", 0.3)
    dino_cfg = load_config(preset, ["method=dino"])
    assert dino_cfg.recipe == "dino"
    assert (dino_cfg.optim.name, dino_cfg.optim.lr, dino_cfg.optim.weight_decay_end) == ("adamw", 5e-4, 0.4)
    assert dino_cfg.dino.output_dim == 512 and dino_cfg.optim.weight_decay == 5e-4  # the preset's, kept
    byol_cfg = load_config(preset, ["method=byol"])
    assert (byol_cfg.optim.name, byol_cfg.optim.lr, byol_cfg.recipe) == ("sgd", 0.12, "byol")


def test_set_wins_over_the_recipe_and_a_preset_method_picks_its_recipe(preset, tmp_path):
    assert load_config(preset, ["method=dino", "optim.lr=1e-3"]).optim.lr == 1e-3
    path = tmp_path / "dino.yaml"
    path.write_text(PRESET.replace("method: simclr", "method: dino"))
    assert load_config(path).optim.name == "adamw"
    assert load_config(path, ["method=simclr"]).optim.name == "sgd"  # --set method= decides


@pytest.mark.parametrize("recipes, message", [
    ("recipes: {swav: {optim.lr: 0.1}}", "unknown method 'swav' under recipes"),
    ("recipes: [dino]", "'recipes' must map a method to settings"),
    ("recipes: {dino: 0.1}", "recipe 'dino' must map dotted keys to values"),
    ("recipes: {dino: {optim.lrr: 0.1}}", "unknown config key 'optim.lrr'"),
])
def test_a_bad_recipe_is_a_one_line_error(tmp_path, recipes, message):
    path = tmp_path / "bad.yaml"
    path.write_text(recipes + "\n")
    with pytest.raises(ConfigError, match=message) as error:
        load_config(path, ["method=dino"])
    assert "\n" not in str(error.value)


def test_the_cpu_preset_gives_every_method_a_valid_config():
    for name in ("simclr", "moco", "byol", "simsiam", "barlowtwins", "vicreg", "dino", "mae"):
        cfg = load_config("configs/cifar10_cpu.yaml", [f"method={name}", "train.device=cpu"])
        assert cfg.method == name
    mae = load_config("configs/cifar10_cpu.yaml", ["method=mae"])
    assert mae.model.backbone == "vit-tiny" and mae.optim.name == "adamw" and mae.optim.betas == (0.9, 0.95)


# ---------------------------------------------------------------------------------------------
# AdamW and the weight-decay schedule


def test_weight_decay_follows_dinos_cosine_from_start_to_end():
    cfg = load_config(None, ["optim.weight_decay=0.04", "optim.weight_decay_end=0.4"]).optim
    for progress in (0.0, 0.1, 0.5, 0.9, 1.0, 1.5):
        p = min(progress, 1.0)
        expected = 0.4 + 0.5 * (0.04 - 0.4) * (1 + math.cos(math.pi * p))  # DINO's cosine_scheduler
        assert weight_decay_at(cfg, progress) == pytest.approx(expected, abs=1e-12)
    assert weight_decay_at(load_config(None, ["optim.weight_decay=0.01"]).optim, 0.7) == 0.01


def test_adamw_decays_weights_only_and_the_schedule_leaves_norms_and_biases_alone():
    cfg = tiny_config("optim.name=adamw", "optim.lr=1e-3", "optim.weight_decay=0.04", "optim.betas=[0.9,0.95]")
    model = build_model(cfg)
    optimizer = build_optimizer(model, cfg.optim, 64)
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.param_groups[0]["betas"] == (0.9, 0.95)
    set_weight_decay(optimizer, 0.3)
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.3, 0.0]
    decayed = {id(p) for p in optimizer.param_groups[0]["params"]}
    for name, param in model.named_parameters():
        if name.endswith("bias") or param.ndim == 1:
            assert id(param) not in decayed, name


def test_vit_position_embeddings_and_class_token_are_not_decayed():
    class TinyViT(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.class_token = torch.nn.Parameter(torch.zeros(1, 1, 4))
            self.pos_embedding = torch.nn.Parameter(torch.zeros(1, 5, 4))
            self.proj = torch.nn.Linear(4, 4)

    model = TinyViT()
    decay, no_decay = parameter_groups(model, 0.05)
    assert decay["params"] == [model.proj.weight]
    assert {id(p) for p in no_decay["params"]} == {id(model.class_token), id(model.pos_embedding), id(model.proj.bias)}


DINO_ADAMW = ("method=dino", "dino.hidden_dim=64", "dino.bottleneck_dim=16", "dino.output_dim=128",
              "optim.name=adamw", "optim.lr=1e-3", "optim.weight_decay=0.04", "optim.weight_decay_end=0.4",
              "optim.grad_clip=3.0", "dino.freeze_last_layer_fraction=0.5")


def dino_args(out, *extra):
    settings = ["data.max_images=128", "data.num_workers=0", "augment.input_size=16", "augment.min_scale=0.25",
                "model.backbone=smallconv", "train.precision=fp32", "optim.warmup_epochs=0",
                "train.checkpoint_every_steps=1", "train.log_every_steps=1", *DINO_ADAMW]
    return ["--data", "builtin:digits:train", "--out", str(out), "--epochs", "2", "--batch-size", "64",
            "--no-progress", *[part for s in settings for part in ("--set", s)], *extra]


def test_dino_with_adamw_and_the_decay_schedule_resumes_bit_exactly(tmp_path, monkeypatch):
    """The weight decay is set from the training's progress before every step, and the optimiser's
    moments travel in the checkpoint: a kill mid-epoch and a resume give the uninterrupted run."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert cli.main(dino_args(straight)) == 0
    undo = kill_after_checkpoint(monkeypatch, 3)
    assert cli.main(dino_args(killed)) == 130
    undo()
    assert cli.main(dino_args(killed, "--resume")) == 0
    a = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(killed / "checkpoints" / "last.pt", weights_only=True)
    assert [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])] == []
    # the schedule reached the end of training: 4 steps of 4, progress 3/4 at the last step
    assert a["optimizer"]["param_groups"][0]["weight_decay"] == pytest.approx(
        weight_decay_at(load_config(None, list(DINO_ADAMW)).optim, 3 / 4))


def test_dinos_last_layer_is_frozen_for_its_fraction_of_training():
    cfg = tiny_config(*DINO_ADAMW)
    model = build_model(cfg)
    last = [p for p in model.projection_head.last_layer.parameters()]
    assert last
    for param in model.parameters():
        param.grad = torch.ones_like(param)
    model.before_optimizer_step(0.2)  # in the frozen fraction
    assert all(p.grad is None for p in last)
    assert model.backbone.features[0].weight.grad is not None
    for param in last:
        param.grad = torch.ones_like(param)
    model.before_optimizer_step(0.5)  # the fraction is over
    assert all(p.grad is not None for p in last)


# ---------------------------------------------------------------------------------------------
# Collapse


def test_the_methods_name_their_known_collapse():
    cfg = tiny_config("method=dino", "dino.output_dim=1024", "dino.hidden_dim=32", "dino.bottleneck_dim=16")
    model = build_model(cfg)
    assert "uniform" in model.collapse_message(math.log(1024))
    assert "dino.teacher_temperature 0.04" in model.collapse_message(math.log(1024))
    assert "uniform" in model.collapse_message(6.9308)  # the collapsed CIFAR-10 run's second epoch
    assert model.collapse_message(5.0) is None
    for module in (byol, simsiam):
        method = build_model(tiny_config(f"method={module.NAME}"))
        assert "collapse" in method.collapse_message(-0.99995)
        assert method.collapse_message(-0.8) is None
    assert build_model(tiny_config()).collapse_message(0.0) is None  # simclr: no known signature


def test_a_collapsed_run_warns_once_from_its_second_epoch(tmp_path, caplog, monkeypatch):
    """A method that reports a collapse: one warning naming where the fixes are, every collapsed
    epoch marked in the metrics, the run goes on to its end."""
    monkeypatch.setattr(Method, "collapse_message", lambda self, loss: f"the loss is {loss:.4f} (collapse)")
    out = tmp_path / "run"
    args = ["--data", "builtin:digits:train", "--out", str(out), "--epochs", "3", "--batch-size", "64",
            "--no-progress", "--set", "data.max_images=128", "--set", "data.num_workers=0", "--set",
            "augment.input_size=16", "--set", "model.backbone=smallconv", "--set", "train.precision=fp32"]
    with caplog.at_level(logging.WARNING):
        assert cli.main(args) == 0
    warnings = [r.getMessage() for r in caplog.records if "collapse" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("epoch 2:") and "recipes:" in warnings[0]
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "loss_mean" in line]
    assert [record.get("collapsed", False) for record in epochs] == [False, True, True]
