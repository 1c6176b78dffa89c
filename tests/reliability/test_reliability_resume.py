"""What a kill leaves behind, in process and fast: the windows between two writes, a torn
metrics line, temporary files of a write that never finished, and who may read the files.

The real SIGKILL test is ``test_reliability_processes.py`` (slow); the first two tests below pin
the two bugs it found in ``train.py`` (an epoch-end checkpoint that resumed into an empty epoch,
and step records listed twice after a fresh ``--resume``).
"""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch

from ssl_pretrain import train as train_module
from ssl_pretrain.checkpoint import load_checkpoint
from ssl_pretrain.engine.run_folder import RunFolder
from ssl_pretrain.train import pretrain

from tiny_runs import tiny_config

FAST = ("train.threads=1",)


@pytest.fixture(autouse=True)
def keep_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _step_records(run) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def _weights(run) -> dict:
    return load_checkpoint(run / "checkpoints" / "last.pt")["model"]


def _kill_when(monkeypatch, name: str, condition) -> None:
    """Make ``train.<name>`` raise KeyboardInterrupt (our stand-in for SIGKILL) once ``condition``
    holds for the call's arguments, after the real call ran when it is ``write_checkpoint``."""
    real = getattr(train_module, name)

    def wrapper(*args):
        if name == "write_checkpoint":
            real(*args)
        if condition(*args):
            raise KeyboardInterrupt
        return None if name == "write_checkpoint" else real(*args)

    monkeypatch.setattr(train_module, name, wrapper)


def test_a_kill_between_the_last_step_checkpoint_and_the_epoch_checkpoint(tmp_path, monkeypatch):
    settings = ("train.epochs=2", "train.checkpoint_every_steps=1", *FAST)
    pretrain(tiny_config(*settings), tmp_path / "straight", progress=False)
    # Killed right after the first checkpoint at the end of epoch 1 (4 steps an epoch), as a
    # SIGKILL during the epoch-end write would leave it.
    _kill_when(monkeypatch, "write_checkpoint", lambda run, cfg, model, optimizer, scheduler, state, clock=None:
               state.global_step == 4)
    with pytest.raises(KeyboardInterrupt):
        pretrain(tiny_config(*settings), tmp_path / "killed", progress=False)
    monkeypatch.undo()
    pretrain(tiny_config(*settings), tmp_path / "killed", resume=True, progress=False)
    straight, killed = _weights(tmp_path / "straight"), _weights(tmp_path / "killed")
    assert all(torch.equal(straight[key], killed[key]) for key in straight)


def test_a_kill_before_the_first_checkpoint_lists_each_step_once(tmp_path, monkeypatch):
    calls = []
    _kill_when(monkeypatch, "train_step", lambda step, views: calls.append(1) or len(calls) == 3)
    with pytest.raises(KeyboardInterrupt):
        pretrain(tiny_config(*FAST), tmp_path / "run", progress=False)
    monkeypatch.undo()
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists() and _step_records(tmp_path / "run") == [1, 2]
    pretrain(tiny_config(*FAST), tmp_path / "run", resume=True, progress=False)
    assert _step_records(tmp_path / "run") == [1, 2, 3, 4]


def test_a_torn_last_metrics_line_does_not_stop_a_resume(tmp_path, monkeypatch):
    run = tmp_path / "run"
    settings = ("train.epochs=2", "train.checkpoint_every_steps=2", *FAST)
    _kill_when(monkeypatch, "write_checkpoint", lambda run, cfg, model, optimizer, scheduler, state, clock=None:
               state.global_step == 6)
    with pytest.raises(KeyboardInterrupt):
        pretrain(tiny_config(*settings), run, progress=False)
    monkeypatch.undo()
    with open(run / "metrics.jsonl", "a") as file:
        file.write('{"step": 7, "epoch": 2, "loss": 4.1')  # a kill (or a full disk) mid-line
    pretrain(tiny_config(*settings), run, resume=True, progress=False)
    assert _step_records(run) == list(range(1, 9))
    for line in (run / "metrics.jsonl").read_text().splitlines():
        json.loads(line)


def test_temporary_files_of_an_unfinished_write_are_removed_on_resume(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    stale = [tmp_path / "checkpoints" / ".last.pt.k1ll3d.tmp", tmp_path / ".backbone.safetensors.abc123.tmp"]
    for path in stale:
        path.write_bytes(b"\0" * 1000)
    keep = tmp_path / "checkpoints" / "notes.tmp"  # not one of ours: no leading dot
    keep.write_text("mine")
    with RunFolder(tmp_path) as run:
        run.prepare(resume=True, overwrite=False)
    assert not any(path.exists() for path in stale) and keep.exists()
    assert "left by a run stopped while writing it" in (tmp_path / "train.log").read_text()


def test_checkpoints_and_exports_are_readable_as_the_umask_allows(tmp_path):
    previous = os.umask(0o022)
    try:
        pretrain(tiny_config(*FAST), tmp_path / "run", progress=False)
    finally:
        os.umask(previous)
    for name in ("checkpoints/last.pt", "backbone.safetensors", "backbone.json", "config.yaml"):
        assert stat.S_IMODE(os.stat(tmp_path / "run" / name).st_mode) == 0o644, name  # not mkstemp's 0o600
