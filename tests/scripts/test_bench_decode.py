"""scripts/bench_decode.py end to end at a tiny size: every decoder agrees on the picture, and the
pretraining table has its three contenders."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # three models and two pipelines: about ten seconds on two cores
def test_decode_benchmark_times_each_decoder_and_the_pretraining_loops(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))  # bench_decode imports bench_throughput as the scripts do
    rng = np.random.default_rng(0)
    for index in range(8):
        pixels = rng.integers(0, 255, (90 + index, 120, 3), dtype=np.uint8)
        Image.fromarray(pixels).resize((240, 180 + index)).save(tmp_path / f"{index}.jpg")
    assert _load("bench_decode").main([
        "--data", str(tmp_path), "--images", "8", "--side", "32", "--rounds", "1", "--pretrain",
        "--config", "configs/demo_digits.yaml", "--set", "train.batch_size=4", "--set", "monitor.train=null",
        "--steps", "1", "--warmup", "1", "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert "| pil-draft |" in out and "| torchvision |" in out
    assert "| bare step |" in out and "| batch pipeline (decoded cache) |" in out and "| per-image PIL loader" in out
