"""Pretraining end to end on real digits: learning, exact resume, divergence, run-folder safety."""

import json
import shutil

import pytest
import torch

from ssl_pretrain import train as train_module
from ssl_pretrain.checkpoint import load_backbone, load_checkpoint
from ssl_pretrain.config import ConfigError
from ssl_pretrain.data import DataError
from ssl_pretrain.engine.run_folder import RunFolder, RunFolderError
from ssl_pretrain.diagnostics import DivergenceError
from ssl_pretrain.train import pretrain

from tiny_runs import kill_after_checkpoint, tiny_config


def _epoch_losses(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss_mean"] for r in records if "loss_mean" in r]


@pytest.mark.parametrize("pipeline", ["pil", "tensor"])
def test_a_few_dozen_steps_lower_the_loss(tmp_path, pipeline):
    cfg = tiny_config("train.epochs=4", "train.batch_size=32", f"data.pipeline={pipeline}")  # 32 steps
    pretrain(cfg, tmp_path / "run", progress=False)
    losses = _epoch_losses(tmp_path / "run")
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.3


def test_run_folder_layout_and_exported_backbone_reproduces_features(tmp_path):
    run = tmp_path / "run"
    exported = pretrain(tiny_config(), run, progress=False)
    for name in ("config.yaml", "metrics.jsonl", "train.log", "checkpoints/last.pt", "backbone.safetensors"):
        assert (run / name).is_file(), name
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["config"]["model"]["backbone"] == "smallconv" and state["epoch"] == 1
    images = torch.randn(4, 3, 16, 16)
    from_export, info = load_backbone(exported)
    from_checkpoint, _ = load_backbone(run / "checkpoints" / "last.pt")
    from_folder, _ = load_backbone(run)
    assert (info.architecture, info.input_size, info.feature_dim) == ("smallconv", 16, 256)
    with torch.no_grad():
        reference = from_export(images)
        assert torch.equal(reference, from_checkpoint(images)) and torch.equal(reference, from_folder(images))


def _weights(run_dir):
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]


def _assert_same_weights(first, second):
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


@pytest.mark.parametrize("pipeline", ["pil", "tensor"])
def test_resume_after_an_epoch_is_bit_identical(tmp_path, pipeline):
    straight = tmp_path / "straight"
    pretrain(tiny_config("train.epochs=2", "train.keep_every_epochs=1", f"data.pipeline={pipeline}"), straight,
             progress=False)
    # A run killed after its first checkpoint holds exactly epoch-0001.pt as last.pt.
    killed = tmp_path / "killed"
    (killed / "checkpoints").mkdir(parents=True)
    shutil.copy(straight / "checkpoints" / "epoch-0001.pt", killed / "checkpoints" / "last.pt")
    pretrain(tiny_config("train.epochs=2", f"data.pipeline={pipeline}"), killed, resume=True, progress=False)
    _assert_same_weights(_weights(straight), _weights(killed))
    assert len(_epoch_losses(killed)) == 1


@pytest.mark.parametrize("pipeline", ["pil", "tensor"])
def test_resume_mid_epoch_is_bit_identical(tmp_path, monkeypatch, pipeline):
    settings = ("train.epochs=2", "train.checkpoint_every_steps=2", f"data.pipeline={pipeline}")
    straight = tmp_path / "straight"
    pretrain(tiny_config(*settings), straight, progress=False)
    killed = tmp_path / "killed"
    undo = kill_after_checkpoint(monkeypatch, 6)  # epoch 2 of 4 steps each, half way
    with pytest.raises(KeyboardInterrupt):
        pretrain(tiny_config(*settings), killed, progress=False)
    undo()
    assert load_checkpoint(killed / "checkpoints" / "last.pt")["step_in_epoch"] == 2
    pretrain(tiny_config(*settings), killed, resume=True, progress=False)
    _assert_same_weights(_weights(straight), _weights(killed))


def test_a_diverging_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real_step = train_module.train_step
    calls = {"n": 0}

    def step_that_diverges(step, views):
        calls["n"] += 1
        loss = real_step(step, views)
        return loss * float("nan") if calls["n"] == 6 else loss

    monkeypatch.setattr(train_module, "train_step", step_that_diverges)
    run = tmp_path / "run"
    with pytest.raises(DivergenceError, match=r"loss became nan at epoch 2, step 2.*lower optim.lr"):
        pretrain(tiny_config("train.epochs=3"), run, progress=False)
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["epoch"] == 1 and all(torch.isfinite(v.float()).all() for v in state["model"].values())
    assert not (run / "backbone.safetensors").exists()


def test_a_huge_learning_rate_is_caught(tmp_path):
    with pytest.raises(DivergenceError, match="loss became"):
        pretrain(tiny_config("optim.lr=1e12", "optim.weight_decay=0", "train.epochs=2"), tmp_path / "r", progress=False)


def test_an_existing_run_is_never_overwritten_by_accident(tmp_path):
    run = tmp_path / "run"
    pretrain(tiny_config(), run, progress=False)
    with pytest.raises(RunFolderError, match="already holds a run: pass --resume"):
        pretrain(tiny_config(), run, progress=False)
    pretrain(tiny_config(), run, overwrite=True, progress=False)
    assert len(_epoch_losses(run)) == 1
    with pytest.raises(ConfigError, match="cannot resume: 'optim.lr' is 0.1 now but the run was started with 0.5"):
        pretrain(tiny_config("optim.lr=0.1", "train.epochs=2"), run, resume=True, progress=False)


def test_resume_without_a_checkpoint_starts_fresh(tmp_path):
    pretrain(tiny_config(), tmp_path / "new", resume=True, progress=False)
    assert (tmp_path / "new" / "backbone.safetensors").exists()


def test_two_runs_cannot_write_one_folder(tmp_path):
    with RunFolder(tmp_path) as first:
        first.prepare(resume=False, overwrite=False)
        with pytest.raises(RunFolderError, match="another process is already writing"):
            pretrain(tiny_config(), tmp_path, resume=True, progress=False)


def test_data_errors_before_training(tmp_path):
    with pytest.raises(DataError, match="fewer than one batch"):
        pretrain(tiny_config("train.batch_size=512"), tmp_path / "a", progress=False)
    with pytest.raises(ConfigError, match="no data given"):
        pretrain(tiny_config("data.source=null"), tmp_path / "b", progress=False)


def test_images_of_several_sizes_train_in_the_batch_pipeline_at_the_storage_side(tmp_path):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for index, size in enumerate([(20, 20), (30, 20), (20, 20)] * 30):
        Image.new("RGB", size, (index, 0, 0)).save(folder / f"{index:03d}.png")
    pretrain(tiny_config("data.pipeline=tensor", source=str(folder)), tmp_path / "tensor", progress=False)
    assert "90 images of 64x64 px (shorter side resized" in (tmp_path / "tensor" / "train.log").read_text()
    pretrain(tiny_config(source=str(folder)), tmp_path / "auto", progress=False)  # a later run reuses the pixels
    assert "read from the cache file" in (tmp_path / "auto" / "train.log").read_text()


def test_threads_setting_applies_to_the_run_only(tmp_path):
    before = torch.get_num_threads()
    pretrain(tiny_config("train.threads=1"), tmp_path / "run", progress=False)
    assert torch.get_num_threads() == before
