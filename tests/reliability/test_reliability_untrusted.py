"""Files handed to the tools as data never run code: a YAML config, a cached embeddings file, a
"backbone" that is really a pickle, and a checkpoint run folder whose ``last.pt`` is one.
(``test_checkpoint.py`` covers ``load_checkpoint`` itself.)
"""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from ssl_pretrain.checkpoint import CheckpointError, load_backbone
from ssl_pretrain.cli import main as pretrain_main
from ssl_pretrain.config import ConfigError, load_config


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    assert not (tmp_path / "PWNED").exists(), "code in a data file was run"


def test_a_config_with_python_tags_is_refused(in_tmp, capsys):
    evil = in_tmp / "evil.yaml"
    evil.write_text("train: !!python/object/apply:os.system ['touch PWNED']\n")
    with pytest.raises(ConfigError):
        load_config(evil)
    assert pretrain_main(["--config", str(evil), "--data", "builtin:digits", "--out", str(in_tmp / "run")]) == 2
    assert capsys.readouterr().err.startswith("ssl-pretrain: error: ")


def test_cached_embeddings_holding_a_pickle_are_refused(in_tmp):
    pytest.importorskip("linear_probe.embeddings")
    from linear_probe.embeddings import load_embeddings
    from linear_probe.errors import EvaluationError

    evil = np.empty(1, dtype=object)
    evil[0] = _RunsCode()
    np.savez(in_tmp / "evil.npz", features=np.zeros((1, 4), np.float32), names=evil)
    with pytest.raises(EvaluationError, match="not a readable"):
        load_embeddings(in_tmp / "evil.npz")


def test_a_pickle_posing_as_a_backbone_or_checkpoint_is_refused(in_tmp):
    (in_tmp / "backbone.safetensors").write_bytes(pickle.dumps(_RunsCode()))
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_backbone(in_tmp / "backbone.safetensors")
    run = in_tmp / "run"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"kind": "ssl_pretrain/training-checkpoint", "format_version": 1, "model": _RunsCode()},
               run / "checkpoints" / "last.pt")
    with pytest.raises(CheckpointError, match="could run code"):
        load_backbone(run)  # a run folder without an export falls back to last.pt
