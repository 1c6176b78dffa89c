"""Precision chosen from the hardware, the time budget's forecast, and the GPU-recipe-on-CPU hint.

The hardware answer is faked (monkeypatched probes, ``ONEDNN_MAX_CPU_ISA``) so that every path
runs on any machine; nothing here depends on what the test machine has."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import yaml

from ssl_pretrain import hardware
from ssl_pretrain.config import load_config
from ssl_pretrain.optim import BudgetClock
from ssl_pretrain.train import FEW_EPOCHS, RunState, Step, forecast_budget, make_step, warn_large_backbone_on_cpu

from conftest import tiny_config

CPU = torch.device("cpu")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture
def bf16_cpu(monkeypatch):
    """A CPU with AMX / AVX512-BF16, and no cap on oneDNN."""
    monkeypatch.setattr(hardware, "cpu_bf16_instructions", lambda: True)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)


@pytest.fixture
def avx2_cpu(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_bf16_instructions", lambda: False)


def test_auto_is_bf16_only_where_native(bf16_cpu, monkeypatch, caplog):
    with caplog.at_level(logging.INFO, logger="ssl_pretrain"):
        assert hardware.resolve_precision("auto", CPU) is True
    assert "bf16 autocast" in caplog.text
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # oneDNN held to AVX2 emulates bf16: fp32
    assert hardware.resolve_precision("auto", CPU) is False
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx512_core_amx")
    assert hardware.resolve_precision("auto", CPU) is True
    assert hardware.resolve_precision("fp32", CPU) is False


def test_auto_is_fp32_without_bf16_instructions_and_forcing_bf16_warns(avx2_cpu, caplog):
    assert hardware.resolve_precision("auto", CPU) is False
    with caplog.at_level(logging.WARNING, logger="ssl_pretrain"):
        assert hardware.resolve_precision("bf16", CPU) is True  # runs as asked...
    assert "emulated" in caplog.text and "10-40x" in caplog.text and "precision=auto" in caplog.text


def test_the_training_step_follows_the_hardware_answer(bf16_cpu, monkeypatch):
    from ssl_pretrain.model import build_model
    from ssl_pretrain.optim import build_optimizer, build_scheduler

    cfg = tiny_config("train.precision=auto")
    model = build_model(cfg.model, True)
    optimizer = build_optimizer(model, cfg.optim, cfg.train.batch_size)
    step = make_step(cfg, model, optimizer, build_scheduler(optimizer, cfg.optim, 10, 1), CPU)
    with step.autocast():
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
    monkeypatch.setattr(hardware, "cpu_bf16_instructions", lambda: False)
    step = make_step(cfg, model, optimizer, build_scheduler(optimizer, cfg.optim, 10, 1), CPU)
    with step.autocast():
        assert not torch.is_autocast_enabled("cpu")


def test_no_preset_hard_codes_bf16():
    for path in CONFIGS.glob("*.yaml"):
        precision = (yaml.safe_load(path.read_text()).get("train") or {}).get("precision", "auto")
        assert precision in ("auto", "fp32"), f"{path.name} sets precision {precision}"


def _budget_step(cfg, minutes_used: float) -> Step:
    clock = BudgetClock(cfg.train.time_budget_minutes * 60, used=minutes_used * 60)
    return Step(None, None, None, None, CPU, None, False, None, clock=clock)


def test_a_budget_that_gives_few_epochs_warns_with_causes(avx2_cpu, caplog):
    cfg = load_config(CONFIGS / "cifar10_cpu.yaml", ["train.precision=bf16"])
    state = RunState()
    with caplog.at_level(logging.INFO, logger="ssl_pretrain"):
        # 35 images/s on 390 steps of 128: the AVX2 EPYC of issue #12 with bf16 forced
        epochs = forecast_budget(cfg, _budget_step(cfg, 0.1), state, rate=35.0, steps_per_epoch=390)
    assert epochs < FEW_EPOCHS and "35 images/s" in caplog.text and "about 0.6 epochs" in caplog.text
    assert "only about" in caplog.text and "bf16 forced on a CPU that emulates it" in caplog.text


def test_a_budget_that_gives_enough_epochs_only_informs(caplog):
    cfg = load_config(CONFIGS / "cifar10_cpu.yaml")
    with caplog.at_level(logging.INFO, logger="ssl_pretrain"):
        epochs = forecast_budget(cfg, _budget_step(cfg, 0.1), RunState(), rate=1300.0, steps_per_epoch=390)
    assert 22 < epochs < 24 and "WARNING" not in [record.levelname for record in caplog.records]


def test_a_resnet_on_a_cpu_names_the_cpu_preset(caplog):
    cfg = load_config(None)  # no --config: the ResNet-18 GPU recipe
    with caplog.at_level(logging.WARNING, logger="ssl_pretrain"):
        assert warn_large_backbone_on_cpu(cfg, CPU) is True
    assert "configs/cifar10_cpu.yaml" in caplog.text
    assert warn_large_backbone_on_cpu(cfg, torch.device("cuda")) is False
    assert warn_large_backbone_on_cpu(load_config(CONFIGS / "cifar10_cpu.yaml"), CPU) is False
