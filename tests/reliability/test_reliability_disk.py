"""A filesystem that is really full: a small tmpfs mounted by the test (root only; skipped where
``mount`` is not permitted). ``test_checkpoint.py`` simulates the same with a patched ``fsync``;
here the ``OSError(ENOSPC)`` comes from the kernel, through ``torch.save``'s own writer.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import torch
import yaml

from ssl_pretrain.models.backbones import build_backbone
from ssl_pretrain.checkpoint import BackboneInfo, CheckpointError, export_backbone, load_checkpoint, save_checkpoint
from ssl_pretrain.cli import main as pretrain_main
from ssl_pretrain.engine.run_folder import RunFolder, RunFolderError

MEGABYTE = 1 << 20


@pytest.fixture
def mount_tmpfs(tmp_path):
    """``mount_tmpfs(size_bytes) -> folder``: a tmpfs of that size, unmounted afterwards."""
    mounted = []

    def mount(size: int) -> Path:
        mount_point = tmp_path / f"disk{len(mounted)}"
        mount_point.mkdir()
        try:
            done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755",
                                   f"ssl-test-{uuid.uuid4().hex[:8]}", str(mount_point)],
                                  capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError) as error:
            pytest.skip(f"cannot run mount: {error}")
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
        mounted.append(mount_point)
        return mount_point

    yield mount
    for mount_point in mounted:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True, timeout=30)


def _free_bytes(path: Path) -> int:
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def _fill(path: Path, leave: int) -> None:
    """Write a ballast file that leaves about ``leave`` bytes free."""
    with open(path / "ballast", "wb") as file:
        file.write(b"\0" * max(0, _free_bytes(path) - leave))


def test_a_checkpoint_into_a_really_full_filesystem(mount_tmpfs):
    small_disk = mount_tmpfs(12 * MEGABYTE)
    path = small_disk / "checkpoints" / "last.pt"
    save_checkpoint(path, {"model": {"w": torch.randn(1_000_000)}, "epoch": 1})  # 4 MB
    _fill(small_disk, leave=2 * MEGABYTE)
    with pytest.raises(CheckpointError) as caught:
        save_checkpoint(path, {"model": {"w": torch.randn(1_000_000)}, "epoch": 2})
    message = str(caught.value)
    assert message == f"could not write {path} (disk full): {os.strerror(errno.ENOSPC)}; the previous file is intact"
    assert load_checkpoint(path)["epoch"] == 1
    assert os.listdir(path.parent) == ["last.pt"]  # the half-written temporary file is gone
    assert _free_bytes(small_disk) >= 2 * MEGABYTE - 64 * 1024  # ... and so is the space it took

    backbone, dim = build_backbone("resnet18", True)  # 45 MB of weights: cannot fit
    info = BackboneInfo("resnet18", True, dim, 32, (0.5,) * 3, (0.25,) * 3)
    with pytest.raises(CheckpointError, match=r"backbone.safetensors \(disk full\)"):
        export_backbone(small_disk / "backbone.safetensors", backbone, info)
    assert sorted(os.listdir(small_disk)) == ["ballast", "checkpoints"]


def test_metrics_and_config_into_a_full_filesystem(mount_tmpfs):
    disk = mount_tmpfs(MEGABYTE)
    with RunFolder(disk / "run") as run:
        run.prepare(resume=False, overwrite=False)
        run.write_config({"train": {"epochs": 1}})
        run.append_metrics({"step": 1, "loss": 4.0})
        with open(disk / "ballast", "wb", buffering=0) as ballast, pytest.raises(OSError):
            while True:  # to the last byte
                ballast.write(b"\0" * 4096)
        with pytest.raises(RunFolderError, match=r"could not write .*metrics.jsonl \(disk full\)"):
            run.append_metrics({"step": 2, "loss": 3.9, "padding": "x" * 20_000})
        with pytest.raises(CheckpointError, match=r"could not write .*config.yaml \(disk full\)"):
            run.write_config({"train": {"epochs": 2}, "padding": "x" * 20_000})
        assert yaml.safe_load(run.config_file.read_text()) == {"train": {"epochs": 1}}  # not half-written


@pytest.mark.slow
def test_a_run_whose_disk_fills_up_stops_cleanly_and_resumes_elsewhere(mount_tmpfs, tmp_path, capsys):
    argv = ["--data", "builtin:digits:train", "--epochs", "2", "--batch-size", "64", "--seed", "0", "--device", "cpu",
            "--no-progress", "--set", "data.max_images=256", "--set", "model.backbone=smallconv",
            "--set", "augment.input_size=16", "--set", "data.num_workers=0", "--set", "simclr.hidden_dim=128",
            "--set", "simclr.output_dim=32", "--set", "train.threads=1"]
    # A disk where the first checkpoint fits, but not a second one beside it (written, then renamed).
    probe = tmp_path / "probe"
    assert pretrain_main(argv + ["--out", str(probe), "--epochs", "1"]) == 0
    checkpoint_size = (probe / "checkpoints" / "last.pt").stat().st_size
    run = mount_tmpfs(int(checkpoint_size * 1.5)) / "run"
    capsys.readouterr()
    assert pretrain_main(argv + ["--out", str(run)]) == 2
    err = capsys.readouterr().err  # the log lines, then the error
    assert "Traceback" not in err and err.endswith("the previous file is intact\n")
    last_line = err.splitlines()[-1]
    assert last_line.startswith(f"ssl-pretrain: error: could not write {run / 'checkpoints' / 'last.pt'} (disk full): ")
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 1
    assert sorted(os.listdir(run / "checkpoints")) == ["last.pt"]
    # Moved to a disk with room, the run continues from its last checkpoint.
    moved = shutil.copytree(run, tmp_path / "moved")
    assert pretrain_main(argv + ["--out", str(moved), "--resume"]) == 0
    assert load_checkpoint(moved / "checkpoints" / "last.pt")["epoch"] == 2
    assert "resumed from" in (moved / "train.log").read_text()
