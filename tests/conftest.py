"""Fixtures every test folder shares: real digits as files, a random-init checkpoint, and
machine-independent answers to "is bf16 fast here?" and "is OpenVINO installed?".

Set-up that costs more than a moment is made once per test session and shared; tests that write
must write into their own ``tmp_path``, never into these.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

from ssl_classifier import runtimes
from ssl_pretrain.engine import hardware

from digit_files import export_random_backbone, write_digit_images, write_digits_folder

# The precision probe's answers go to a throw-away cache, never the user's ~/.cache (subprocesses
# started by tests inherit it).
os.environ["SSL_PRETRAIN_CACHE"] = tempfile.mkdtemp(prefix="ssl-pretrain-cache-")
atexit.register(shutil.rmtree, os.environ["SSL_PRETRAIN_CACHE"], ignore_errors=True)  # gone with the session

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def cpu_without_native_bf16(monkeypatch):
    """Every test sees a CPU without bf16 instructions unless it says otherwise (the hardware
    tests patch this back): presets resolve to the same variant on every machine, and no test
    pays for the real precision probe, which times the preset's network in both precisions
    (tens of seconds for a ResNet-18 on 2 cores)."""
    monkeypatch.setattr(hardware, "cpu_bf16_instructions", lambda: False)


@pytest.fixture(autouse=True)
def no_openvino_in_process(monkeypatch):
    """Tests run the saved classifier in onnxruntime or torch, as on a machine without OpenVINO
    (CI installs the dev extra only), so the suite behaves the same wherever it runs. OpenVINO's
    own tests load it in a subprocess: its thread pool in the pytest process does not survive the
    forks later tests make (data-loader and decode workers)."""
    installed = runtimes.is_installed
    monkeypatch.setattr(runtimes, "is_installed", lambda name: name != "openvino" and installed(name))


@pytest.fixture(scope="session")
def digits_folder(tmp_path_factory) -> Path:
    """200 real digits as 16x16 PNG files in class subfolders."""
    folder = tmp_path_factory.mktemp("digits")
    write_digit_images(folder, 200)
    return folder


@pytest.fixture(scope="session")
def digits_folders(tmp_path_factory) -> tuple[Path, Path]:
    """``(train, test)`` folders: 30 and 10 real digits per class, disjoint."""
    root = tmp_path_factory.mktemp("digits-split")
    return write_digits_folder(root / "train", 30), write_digits_folder(root / "test", 10, offset=30)


@pytest.fixture(scope="session")
def random_checkpoint(tmp_path_factory) -> Path:
    """A run folder holding a random-init smallconv exported at 16 px."""
    return export_random_backbone(tmp_path_factory.mktemp("random-run"))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
