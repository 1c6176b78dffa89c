"""Precision chosen from the hardware, the time budget's forecast, and the GPU-recipe-on-CPU hint.

The hardware answer is faked (monkeypatched probes, ``ONEDNN_MAX_CPU_ISA``) so that every path
runs on any machine; nothing here depends on what the test machine has."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import yaml

from ssl_pretrain.engine import hardware
from ssl_pretrain.config import load_config
from ssl_pretrain.engine.optim import BudgetClock
from ssl_pretrain.diagnostics import FEW_EPOCHS, forecast_budget, warn_large_backbone_on_cpu
from ssl_pretrain.resume import RunState
from ssl_pretrain.train import Step, make_step

from tiny_runs import tiny_config

CPU = torch.device("cpu")
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture
def bf16_cpu(monkeypatch):
    """A CPU with AMX (and AVX512-BF16), and no cap on oneDNN."""
    monkeypatch.setattr(hardware, "cpu_bf16_instructions", lambda: True)
    monkeypatch.setattr(hardware, "cpu_amx", lambda: hardware.onednn_isa_cap() in (None, *hardware.AMX_ISAS))
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
    from ssl_pretrain.methods import build_model
    from ssl_pretrain.engine.optim import build_optimizer, build_scheduler

    cfg = tiny_config("train.precision=auto")
    model = build_model(cfg)
    optimizer = build_optimizer(model, cfg.optim, cfg.train.batch_size)
    step = make_step(cfg, model, optimizer, build_scheduler(optimizer, cfg.optim, 10, 1), CPU)
    with step.autocast():
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
    monkeypatch.setattr(hardware, "cpu_bf16_instructions", lambda: False)
    step = make_step(cfg, model, optimizer, build_scheduler(optimizer, cfg.optim, 10, 1), CPU)
    with step.autocast():
        assert not torch.is_autocast_enabled("cpu")


@pytest.fixture
def avx512_bf16_cpu(monkeypatch, tmp_path):
    """AVX512-BF16 without AMX tiles: the unclear case, decided by a probe; a fresh cache."""
    monkeypatch.setattr(hardware, "cpu_bf16_instructions", lambda: True)
    monkeypatch.setattr(hardware, "cpu_amx", lambda: False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setenv("SSL_PRETRAIN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "precision.json"


def test_without_amx_a_probe_decides_once_and_the_answer_is_cached(avx512_bf16_cpu, caplog):
    calls = []

    def probe(rates):
        return lambda: calls.append(rates) or rates

    with caplog.at_level(logging.INFO, logger="ssl_pretrain"):
        assert hardware.resolve_precision("auto", CPU, probe({"fp32": 800.0, "bf16": 650.0}), "net A") is False
    assert "not clear-cut" in caplog.text and "fp32 800 images/s, bf16 650" in caplog.text
    # The same machine and workload again: the cache answers, the probe is not run.
    assert hardware.resolve_precision("auto", CPU, probe({"fp32": 1.0, "bf16": 1e6}), "net A") is False
    assert len(calls) == 1 and "cached in" in caplog.text
    # Another workload is probed on its own; bf16 must win by the margin.
    assert hardware.resolve_precision("auto", CPU, probe({"fp32": 500.0, "bf16": 540.0}), "net B") is False
    assert hardware.resolve_precision("auto", CPU, probe({"fp32": 500.0, "bf16": 900.0}), "net C") is True
    assert len(calls) == 3 and len(json.loads(avx512_bf16_cpu.read_text())) == 3
    # No probe (a distributed run, where every rank must agree) and nothing cached: fp32.
    assert hardware.resolve_precision("auto", CPU, None, "net D") is False
    # A corrupt cache is only a missed shortcut.
    avx512_bf16_cpu.write_text("{not json")
    assert hardware.resolve_precision("auto", CPU, probe({"fp32": 500.0, "bf16": 900.0}), "net C") is True


def test_the_probe_times_the_run_network_and_leaves_the_run_untouched(avx512_bf16_cpu, monkeypatch):
    from ssl_pretrain import precision
    from ssl_pretrain.methods import build_model
    from ssl_pretrain.engine.optim import build_optimizer, build_scheduler
    from ssl_pretrain.precision import probe_precisions

    # one timed step of 8 images: where bf16 is emulated (AVX2-only CPUs) the default probe takes seconds
    monkeypatch.setattr(precision, "PROBE_STEPS", 1)
    cfg = tiny_config("train.precision=auto", "train.batch_size=8")
    model = build_model(cfg)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    torch.manual_seed(3)
    expected_next = torch.rand(3)
    torch.manual_seed(3)
    rates = probe_precisions(cfg, CPU, channels_last=True)
    assert set(rates) == {"fp32", "bf16"} and all(rate > 0 for rate in rates.values())
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())  # BN stats too
    assert torch.equal(torch.rand(3), expected_next)  # the run's random stream is not consumed
    optimizer = build_optimizer(model, cfg.optim, cfg.train.batch_size)
    make_step(cfg, model, optimizer, build_scheduler(optimizer, cfg.optim, 10, 1), CPU)
    assert len(json.loads(avx512_bf16_cpu.read_text())) == 1  # make_step probed and cached


def test_no_preset_hard_codes_bf16():
    for path in CONFIGS.glob("*.yaml"):
        precision = (yaml.safe_load(path.read_text()).get("train") or {}).get("precision", "auto")
        assert precision in ("auto", "fp32"), f"{path.name} sets precision {precision}"


def _budget_step(cfg, minutes_used: float) -> Step:
    clock = BudgetClock(cfg.train.time_budget_minutes * 60, used=minutes_used * 60)
    return Step(None, None, None, CPU, None, False, None, clock=clock)


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


def test_the_cpu_preset_picks_its_variant_by_hardware_and_set_still_wins(monkeypatch):
    preset = CONFIGS / "cifar10_cpu.yaml"
    monkeypatch.setattr(hardware, "fast_bf16", lambda device, *probe: True)  # AMX, or CUDA capability 8+
    cfg = load_config(preset)
    assert cfg.variant is None and cfg.model.backbone == "smallconv"
    devices = []
    monkeypatch.setattr(hardware, "fast_bf16", lambda device, *probe: devices.append(device) or False)  # fp32 hardware
    cfg = load_config(preset)
    assert cfg.variant == "no_fast_bf16" and cfg.model.backbone == "smallconv-xs"
    assert (cfg.augment.local_views, cfg.augment.local_size) == (4, 16)  # SimCLR's multi-crop there
    assert load_config(preset, ["method=byol"]).augment.local_views == 0  # the crops are SimCLR's recipe there
    assert load_config(preset, ["model.backbone=smallconv-s"]).model.backbone == "smallconv-s"
    load_config(preset, ["train.device=cuda:1"])
    assert devices == ["auto", "auto", "auto", "cuda:1"]  # the device the run will use decides


def test_fast_bf16_means_amx_cuda_8_or_a_winning_probe(monkeypatch, tmp_path):
    monkeypatch.setattr(hardware, "cpu_bf16_instructions", lambda: True)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(hardware, "cpu_amx", lambda: True)
    assert hardware.fast_bf16("auto") and hardware.fast_bf16("cpu")
    monkeypatch.setattr(hardware, "cpu_amx", lambda: False)  # AVX512-BF16 alone: not clear-cut
    monkeypatch.setenv("SSL_PRETRAIN_CACHE", str(tmp_path))
    assert not hardware.fast_bf16("auto") and not hardware.fast_bf16("mps")  # no probe, nothing cached
    assert hardware.fast_bf16("cpu", lambda: {"fp32": 500.0, "bf16": 900.0}, "net")  # the probe decides
    assert not hardware.fast_bf16("cpu", lambda: {"fp32": 900.0, "bf16": 500.0}, "other net")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert hardware.fast_bf16("auto") and hardware.fast_bf16("cuda:0")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert not hardware.fast_bf16("cuda")


@pytest.mark.parametrize("variants, message", [
    ("variants: {on_tuesdays: {model.backbone: smallconv}}", "unknown variant condition 'on_tuesdays'"),
    ("variants: [model.backbone]", "'variants' must map a condition"),
    ("variants: {no_fast_bf16: {model.colour: red}}", "unknown config key 'model.colour'"),
    ("variants: {no_fast_bf16: {recipes: {simclrr: {optim.lr: 0.1}}}}",
     "variant 'no_fast_bf16': unknown method 'simclrr' under recipes"),
    ("variants: {no_fast_bf16: {recipes: {simclr: 0.1}}}", "recipe 'simclr' must map dotted keys"),
])
def test_a_bad_variants_section_is_one_line(tmp_path, monkeypatch, variants, message):
    from ssl_pretrain.config import ConfigError

    monkeypatch.setattr(hardware, "fast_bf16", lambda device, *probe: False)
    path = tmp_path / "preset.yaml"
    path.write_text(variants + "\nmodel: {backbone: smallconv}\n")
    with pytest.raises(ConfigError, match=message) as error:
        load_config(path)
    assert "\n" not in str(error.value)


def test_a_variants_recipe_applies_to_its_method_after_the_presets_recipe(tmp_path, monkeypatch):
    path = tmp_path / "preset.yaml"
    path.write_text("optim: {lr: 0.3}\nrecipes: {simclr: {optim.lr: 0.2}, moco: {optim.lr: 0.12}}\n"
                    "variants: {no_fast_bf16: {optim.weight_decay: 0.001, recipes: {simclr: {optim.lr: 0.1}}}}\n")
    monkeypatch.setattr(hardware, "fast_bf16", lambda device, *probe: True)  # the variant does not apply
    assert load_config(path).optim.lr == 0.2
    monkeypatch.setattr(hardware, "fast_bf16", lambda device, *probe: False)
    cfg = load_config(path)
    assert (cfg.variant, cfg.recipe, cfg.optim.lr, cfg.optim.weight_decay) == ("no_fast_bf16", "simclr", 0.1, 0.001)
    assert cfg.recipe_sections == ["recipes.simclr", "variants.no_fast_bf16.recipes.simclr"]  # what the log names
    moco = load_config(path, ["method=moco"])
    assert (moco.optim.lr, moco.optim.weight_decay) == (0.12, 0.001)  # the variant's other settings still apply
    assert load_config(path, ["optim.lr=0.5"]).optim.lr == 0.5  # --set still wins


def test_without_amx_the_preset_network_is_probed_once_to_pick_the_variant(avx512_bf16_cpu, monkeypatch):
    from ssl_pretrain import precision

    timed = []
    monkeypatch.setattr(precision, "probe_precisions",
                        lambda cfg, device, channels_last: timed.append(cfg.model.backbone) or
                        {"fp32": 800.0, "bf16": 2000.0})
    preset = CONFIGS / "cifar10_cpu.yaml"
    cfg = load_config(preset)
    assert cfg.variant is None and cfg.model.backbone == "smallconv"  # bf16 wins here: the main network
    assert load_config(preset).model.backbone == "smallconv" and timed == ["smallconv"]  # cached
    monkeypatch.setenv("SSL_PRETRAIN_CACHE", str(avx512_bf16_cpu.parent / "other"))
    monkeypatch.setattr(precision, "probe_precisions", lambda *args: {"fp32": 800.0, "bf16": 650.0})
    assert load_config(preset).model.backbone == "smallconv-xs"  # fp32 wins: the fp32 variant


def test_a_resolved_run_config_loads_again(monkeypatch, tmp_path):
    monkeypatch.setattr(hardware, "fast_bf16", lambda device, *probe: False)
    cfg = load_config(CONFIGS / "cifar10_cpu.yaml")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    assert load_config(path) == cfg  # the variant's values and its name, no variants section
