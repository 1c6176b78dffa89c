"""train.time_budget_minutes: the cosine ends at the budget, the run stops there (mid-epoch),
and a killed budgeted run resumes on the same clock.

Time is faked: the budget clock's ``perf_counter`` advances one second per reading, and the
clock reads once at the start and once before every step, so "seconds" are steps here.
"""

import json
import math
import types

import pytest
import torch

from ssl_pretrain.engine import optim as optim_module
from ssl_pretrain.checkpoint import load_checkpoint
from ssl_pretrain.config import ConfigError
from ssl_pretrain.engine.optim import BudgetClock, budget_cosine
from ssl_pretrain.train import pretrain

from tiny_runs import kill_after_checkpoint, tiny_config

# tiny_config: 256 images, batch 64 -> 4 steps per epoch; peak lr 0.5 * 64 / 256; no warm-up
PEAK_LR = 0.5 * 64 / 256
BUDGET = ("train.time_budget_minutes=0.15", "train.epochs=10")  # 9 fake seconds


@pytest.fixture
def fake_time(monkeypatch):
    ticks = {"now": 1000.0}

    def perf_counter():
        ticks["now"] += 1.0
        return ticks["now"]

    monkeypatch.setattr(optim_module, "time", types.SimpleNamespace(perf_counter=perf_counter))
    return ticks


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_the_run_stops_at_the_budget_mid_epoch_with_a_checkpoint_and_an_export(tmp_path, fake_time):
    run = tmp_path / "run"
    pretrain(tiny_config(*BUDGET), run, progress=False)
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    # Reading k (k = 1, 2, ...) is at k seconds; the step after reading 8 would end at 9 = budget.
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (1, 3, 7)
    assert state["clock"]["elapsed_s"] == 8.0 and state["clock"]["budget_s"] == 9.0
    assert (run / "backbone.safetensors").exists()
    # The lr logged after step k is the rate of step k + 1: the cosine over the budget, read at k.
    logged = {record["step"]: record["lr"] for record in _metrics(run) if "lr" in record}
    for k in range(1, 8):
        assert logged[k] == pytest.approx(PEAK_LR * 0.5 * (1 + math.cos(math.pi * k / 9)), rel=1e-9)
    assert "time budget of 0.15 min reached after 1 epochs and 3 steps" in (run / "train.log").read_text()


def test_budget_cosine_takes_the_earlier_end_of_steps_and_time():
    clock = BudgetClock(100.0)
    clock.warmup_end, clock.now = 10.0, 55.0  # half way through the time after the warm-up
    assert budget_cosine(20, 1000, 10, clock) == pytest.approx(0.5)       # time: 0.5, steps: 0.01
    assert budget_cosine(505, 1000, 10, clock) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert budget_cosine(900, 1000, 10, clock) == pytest.approx(0.5 * (1 + math.cos(math.pi * 890 / 990)))
    assert budget_cosine(4, 1000, 10, clock) == pytest.approx(0.5)       # warm-up: linear, by steps
    clock.now = 200.0
    assert budget_cosine(20, 1000, 10, clock) == 0.0                     # past the budget: 0, not negative


def test_a_killed_budgeted_run_resumes_on_the_same_clock(tmp_path, fake_time, monkeypatch):
    settings = (*BUDGET, "train.checkpoint_every_steps=1")
    straight = tmp_path / "straight"
    pretrain(tiny_config(*settings), straight, progress=False)

    killed = tmp_path / "killed"
    undo = kill_after_checkpoint(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        pretrain(tiny_config(*settings), killed, progress=False)
    undo()
    assert load_checkpoint(killed / "checkpoints" / "last.pt")["clock"]["elapsed_s"] == 3.0
    pretrain(tiny_config(*settings), killed, resume=True, progress=False)
    # Same clock readings, same learning rates, same stop: the same weights.
    for name, value in load_checkpoint(straight / "checkpoints" / "last.pt")["model"].items():
        torch.testing.assert_close(load_checkpoint(killed / "checkpoints" / "last.pt")["model"][name], value,
                                   rtol=0, atol=0)
    assert load_checkpoint(killed / "checkpoints" / "last.pt")["global_step"] == 7

    # Resuming a run whose budget is spent trains nothing more and exports again.
    before = (killed / "backbone.safetensors").read_bytes()
    (killed / "backbone.safetensors").unlink()
    pretrain(tiny_config(*settings), killed, resume=True, progress=False)
    assert load_checkpoint(killed / "checkpoints" / "last.pt")["global_step"] == 7
    assert (killed / "backbone.safetensors").read_bytes() == before


def test_the_epochs_still_cap_a_budgeted_run(tmp_path, fake_time):
    run = tmp_path / "run"
    pretrain(tiny_config("train.time_budget_minutes=10", "train.epochs=2"), run, progress=False)
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert (state["epoch"], state["step_in_epoch"]) == (2, 0)
    # The decay followed the steps (they end first): the last step ran at lr close to 0.
    last_lr = [record["lr"] for record in _metrics(run) if "lr" in record][-1]
    assert last_lr == pytest.approx(0.0, abs=1e-12)


def test_a_budget_must_be_positive_and_cannot_change_on_resume(tmp_path, fake_time):
    with pytest.raises(ConfigError, match="time_budget_minutes"):
        tiny_config("train.time_budget_minutes=0")
    run = tmp_path / "run"
    pretrain(tiny_config(*BUDGET), run, progress=False)
    with pytest.raises(ConfigError, match="cannot resume: 'train.time_budget_minutes'"):
        pretrain(tiny_config("train.time_budget_minutes=1", "train.epochs=10"), run, resume=True, progress=False)
