"""Real processes: ``python -m ssl_pretrain`` killed with SIGKILL at random moments (during a
checkpoint write too) and resumed, and two runs started into one folder at once.

Slow (several interpreter start-ups each); run with ``python -m pytest -m slow``.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ssl_pretrain.checkpoint import load_backbone, load_checkpoint

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
EPOCHS, STEPS_PER_EPOCH = 3, 4  # 256 digits in batches of 64
TINY = ["data.max_images=256", "augment.input_size=16", "augment.min_scale=0.25", "model.backbone=smallconv",
        "simclr.hidden_dim=128", "simclr.output_dim=32", "simclr.temperature=0.2", "optim.lr=0.5",
        "optim.warmup_epochs=0", "train.log_every_steps=1", "data.num_workers=0", "train.threads=1"]


def command(out: Path, *settings: str, epochs: int = EPOCHS) -> list[str]:
    argv = [sys.executable, "-m", "ssl_pretrain", "--data", "builtin:digits:train", "--out", str(out),
            "--epochs", str(epochs), "--batch-size", "64", "--seed", "0", "--device", "cpu", "--no-progress"]
    for setting in TINY + list(settings):
        argv += ["--set", setting]
    return argv


def start(argv: list[str], log_path: Path) -> subprocess.Popen:
    with open(log_path, "ab") as log:  # the child keeps its own handle
        return subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def temp_files(folder: Path, prefix: str) -> list[Path]:
    try:
        return [folder / name for name in os.listdir(folder) if name.startswith(prefix) and name.endswith(".tmp")]
    except FileNotFoundError:
        return []


def inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino  # every atomic rename brings a new inode
    except FileNotFoundError:
        return None


def wait_then_kill(process: subprocess.Popen, run: Path, moment: str, rng: random.Random) -> dict:
    """SIGKILL ``process`` at ``moment``; returns what was seen. Moments:

    - ``startup``: a random instant in the first 3 s (imports, data, model, first steps);
    - ``after-checkpoint``: a random instant up to 0.3 s after the next new ``last.pt``;
    - ``checkpoint-write``: as soon as a ``.last.pt.*.tmp`` exists (after one new ``last.pt``, so
      that every restart makes progress);
    - ``export``: as soon as the final ``.backbone.safetensors.*.tmp`` exists.
    """
    checkpoints, last = run / "checkpoints", run / "checkpoints" / "last.pt"
    first_inode, new_checkpoint_seen = inode(last), False
    deadline = time.monotonic() + (rng.uniform(0.2, 3.0) if moment == "startup" else 120)
    while process.poll() is None and time.monotonic() < deadline:
        if moment != "startup" and not new_checkpoint_seen and inode(last) not in (None, first_inode):
            new_checkpoint_seen = True
            if moment == "after-checkpoint":
                deadline = time.monotonic() + rng.uniform(0.0, 0.3)
        if moment == "checkpoint-write" and new_checkpoint_seen and temp_files(checkpoints, ".last.pt."):
            break
        if moment == "export" and temp_files(run, ".backbone.safetensors."):
            break
        time.sleep(0.002)
    finished_by_itself = process.poll() is not None
    if not finished_by_itself:
        process.send_signal(signal.SIGKILL)
    process.wait()
    return {
        "moment": moment,
        "killed": not finished_by_itself and process.returncode == -signal.SIGKILL,
        # A temporary file still there after the kill: the process died in the middle of writing it.
        "mid_write": bool(temp_files(checkpoints, ".last.pt.") or temp_files(run, ".backbone.safetensors.")),
    }


def assert_same_tensors(first: dict, second: dict, what: str) -> None:
    assert first.keys() == second.keys(), what
    for key in first:
        assert torch.equal(first[key], second[key]), f"{what}: {key}"


def step_records(run: Path) -> list[tuple[int, float, float]]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["lr"]) for r in records if "loss" in r]


def test_sigkill_at_random_moments_then_resume_is_bit_identical(tmp_path):
    seed = int(os.environ.get("KILL_TEST_SEED", time.time_ns() % 10_000))
    rng = random.Random(seed)
    settings = ("train.checkpoint_every_steps=1",)
    reference, run = tmp_path / "reference", tmp_path / "killed"
    uninterrupted = start(command(reference, *settings), tmp_path / "reference.out")  # runs alongside

    schedule = ["startup", "after-checkpoint", "checkpoint-write", "after-checkpoint", "checkpoint-write",
                "checkpoint-write", "export"]
    events, last_step = [], -1
    for moment in schedule:
        event = wait_then_kill(start(command(run, *settings) + ["--resume"], tmp_path / "killed.out"), run, moment, rng)
        if (run / "checkpoints" / "last.pt").exists():
            state = load_checkpoint(run / "checkpoints" / "last.pt")  # never unreadable
            assert state["global_step"] >= last_step, (seed, events)  # never goes back
            last_step = event["step"] = state["global_step"]
        events.append(event)
    final = subprocess.run(command(run, *settings) + ["--resume"], cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
    output = (tmp_path / "killed.out").read_text(errors="replace")
    assert final.returncode == 0, f"seed {seed}, {events}: {final.stderr[-1500:]}\n{output[-1500:]}"
    assert uninterrupted.wait(timeout=300) == 0, (tmp_path / "reference.out").read_text()[-2000:]

    kills = [event for event in events if event["killed"]]
    assert len(kills) >= 5, (seed, events)
    assert any(event["mid_write"] and event["moment"] == "checkpoint-write" for event in events), (seed, events)
    expected, resumed = (load_checkpoint(path / "checkpoints" / "last.pt") for path in (reference, run))
    assert resumed["epoch"] == EPOCHS and resumed["global_step"] == EPOCHS * STEPS_PER_EPOCH
    assert_same_tensors(expected["model"], resumed["model"], f"weights (seed {seed})")
    assert_same_tensors(expected["optimizer"]["state"][0], resumed["optimizer"]["state"][0], "momentum")
    expected_backbone, _ = load_backbone(reference)
    resumed_backbone, _ = load_backbone(run)
    assert_same_tensors(expected_backbone.state_dict(), resumed_backbone.state_dict(), "exported backbone")
    assert step_records(run) == step_records(reference)  # each step once, the same loss and rate
    assert not temp_files(run / "checkpoints", ".") and not temp_files(run, ".")  # leftovers cleaned up
    print(f"kill test seed {seed}: {events}")


def test_two_runs_into_one_folder_at_once(tmp_path):
    run = tmp_path / "run"
    first = start(command(run), tmp_path / "first.out")
    deadline = time.monotonic() + 120
    while not (run / "train.log").exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)  # train.log is opened once the folder's lock is held
    # Frozen (SIGSTOP) while holding the lock, so it is surely still running when the others try.
    first.send_signal(signal.SIGSTOP)
    try:
        attempts = [subprocess.Popen(command(run) + [flag], cwd=ROOT, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True) for flag in ("--resume", "--overwrite")]
        for second in attempts:
            _, stderr = second.communicate(timeout=120)
            assert second.returncode == 2, stderr
            assert stderr == f"ssl-pretrain: error: another process is already writing into {run}\n"
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=300) == 0, (tmp_path / "first.out").read_text()[-2000:]
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["epoch"] == EPOCHS and (run / "backbone.safetensors").is_file()
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "loss_mean" in line]
    assert [record["epoch"] for record in epochs] == list(range(1, EPOCHS + 1))  # --overwrite deleted nothing
