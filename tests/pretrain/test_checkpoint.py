"""Checkpoints: atomic writes, a full disk, and files that are truncated, foreign or malicious."""

import errno
import os
import pickle
from pathlib import Path

import pytest
import torch

from ssl_pretrain import checkpoint as checkpoint_module
from ssl_pretrain.models.backbones import build_backbone
from ssl_pretrain.checkpoint import (
    BackboneInfo,
    CheckpointError,
    export_backbone,
    load_backbone,
    load_checkpoint,
    save_checkpoint,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _info(architecture="smallconv", dim=256):
    return BackboneInfo(architecture, True, dim, 16, (0.5, 0.5, 0.5), (0.2, 0.2, 0.2))


def test_save_and_load_round_trip(tmp_path):
    save_checkpoint(tmp_path / "c.pt", {"model": {"w": torch.ones(3)}, "epoch": 2})
    state = load_checkpoint(tmp_path / "c.pt")
    assert state["epoch"] == 2 and torch.equal(state["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left


def test_a_full_disk_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"epoch": 1})

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint_module.os, "fsync", no_space)
    with pytest.raises(CheckpointError, match=r"could not write .*last.pt \(disk full\).*previous file is intact"):
        save_checkpoint(path, {"epoch": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"kind": "ssl_pretrain/training-checkpoint", "format_version": 1, "x": _RunsCode()}, path)
    with pytest.raises(CheckpointError, match="refused.*posix.system.*could run code"):
        load_checkpoint(path)
    path.write_bytes(pickle.dumps(_RunsCode()))
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert not (tmp_path / "PWNED").exists()


def test_truncated_foreign_and_future_checkpoints(tmp_path):
    save_checkpoint(tmp_path / "good.pt", {"model": {"w": torch.randn(1000)}})
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "cut.pt")
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not an ssl_pretrain training checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    torch.save({"kind": "ssl_pretrain/training-checkpoint", "format_version": 99}, tmp_path / "new.pt")
    with pytest.raises(CheckpointError, match="format version 99.*reads up to 1"):
        load_checkpoint(tmp_path / "new.pt")
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_exported_backbone_round_trip_and_mismatches(tmp_path):
    backbone, dim = build_backbone("smallconv", True)
    backbone.eval()
    export_backbone(tmp_path / "b.safetensors", backbone, _info())
    loaded, info = load_backbone(tmp_path / "b.safetensors")
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(images), backbone(images))
    assert info == _info() and (tmp_path / "b.json").is_file()
    with pytest.raises(CheckpointError, match="holds a 'smallconv' backbone, but 'resnet18' was expected"):
        load_backbone(tmp_path / "b.safetensors", expect_architecture="resnet18")
    # Weights of one architecture under the name of another: a one-line mismatch.
    export_backbone(tmp_path / "lie.safetensors", backbone, _info("resnet18", 512))
    with pytest.raises(CheckpointError, match="does not match the model") as caught:
        load_backbone(tmp_path / "lie.safetensors")
    assert "\n" not in str(caught.value)
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_backbone(tmp_path / "junk.safetensors")
    with pytest.raises(CheckpointError, match="neither backbone.safetensors nor"):
        load_backbone(tmp_path)


def test_evaluation_and_fine_tuning_flip_as_pretraining_did(tmp_path, caplog):
    """A run that did not flip (digits, text) records it; linear-probe and ssl-finetune follow it
    unless --flip / --no-flip says otherwise; weights that do not say (foreign, older) are flipped."""
    import logging
    from dataclasses import replace

    from ssl_pretrain.checkpoint import resolve_hflip
    from ssl_pretrain.config import load_config
    from ssl_pretrain.resume import backbone_info

    glyphs = backbone_info(load_config(CONFIGS / "glyphs_cpu.yaml"), feature_dim=64)
    photos = backbone_info(load_config(CONFIGS / "cifar10_cpu.yaml"), feature_dim=64)
    assert glyphs.hflip is False and photos.hflip is True
    backbone = build_backbone("smallconv", small_stem=True)[0]
    export_backbone(tmp_path / "b.safetensors", backbone, replace(_info(dim=256), hflip=False))
    _, loaded = load_backbone(tmp_path / "b.safetensors")
    assert loaded.hflip is False
    log = logging.getLogger("test")
    with caplog.at_level(logging.INFO, logger="test"):
        assert resolve_hflip(None, loaded, log) is False
    assert "pretraining did not flip" in caplog.text and "--flip" in caplog.text
    assert resolve_hflip(True, loaded, log) is True
    assert resolve_hflip(None, _info(), log) is True and resolve_hflip(False, _info(), log) is False
