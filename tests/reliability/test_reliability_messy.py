"""A folder nobody cleaned (``badinput.make_messy_folder``), through pretraining and evaluation.

Every good image must be used, every bad one skipped and named with its reason, nothing may
crash, and entries that are not image files (link loops, a FIFO, dangling links) are never read.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from ssl_pretrain import train as train_module
from ssl_pretrain.checkpoint import load_checkpoint
from ssl_pretrain.cli import main as pretrain_main
from ssl_pretrain.data import UnreadableImage, image_folder_source, load_image, open_source

from badinput import make_messy_folder, privilege_drop_prefix, restore_permissions

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--set", "model.backbone=smallconv", "--set", "augment.input_size=16", "--set", "augment.min_scale=0.25",
        "--set", "simclr.hidden_dim=64", "--set", "simclr.output_dim=32", "--set", "data.num_workers=0",
        "--set", "optim.warmup_epochs=0", "--set", "train.threads=1", "--seed", "0", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    folder = make_messy_folder(tmp_path_factory.mktemp("messy") / "images")
    yield folder
    restore_permissions(folder.root)


@pytest.fixture(scope="module")
def uniform_messy(tmp_path_factory):
    """The same trouble, but every good image a 16x16 digit: what the in-memory pipeline takes."""
    folder = make_messy_folder(tmp_path_factory.mktemp("uniform") / "images", unusual=False)
    yield folder
    restore_permissions(folder.root)


def as_logged(text: str) -> str:
    """How ``train.log`` (UTF-8, backslash escapes) writes a name with undecodable bytes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def test_every_file_decodes_to_rgb_or_raises_unreadable_with_its_reason(messy):
    for name in messy.good:
        image = load_image(os.path.join(messy.root, name))
        assert image.mode == "RGB", name
        assert image.size == messy.sizes.get(name, (16, 16)), name  # EXIF rotation applied
    for name, fragment in messy.bad.items():
        with pytest.raises(UnreadableImage) as caught:
            load_image(os.path.join(messy.root, name))
        assert fragment.lower() in str(caught.value).lower(), (name, str(caught.value))


def test_scanning_lists_every_image_file_once_and_nothing_else(messy):
    unlabelled = open_source(str(messy.root))
    names = [unlabelled.name(index) for index in range(len(unlabelled))]
    assert sorted(names) == sorted(messy.scanned)  # no duplicates through 9/loop -> ..
    labelled = image_folder_source(messy.root)
    found = {labelled.name(index): int(labelled.labels[index]) for index in range(len(labelled))}
    assert len(found) == len(labelled) and set(found) == messy.scanned
    assert all(found[name] == messy.labels[name] for name in found)  # nothing filed under a second class
    assert not messy.ignored & set(found)


def _pretrain_on(folder, out: Path, batch_size: int, *extra: str, monkeypatch) -> list[int]:
    """Run ``ssl-pretrain`` in process; returns the number of images in each training step."""
    batch_sizes = []
    real_step = train_module.train_step

    def counting_step(step, views):
        batch_sizes.append(len(views[0]))
        return real_step(step, views)

    monkeypatch.setattr(train_module, "train_step", counting_step)
    code = pretrain_main(["--data", str(folder.root), "--out", str(out), "--epochs", "2",
                          "--batch-size", str(batch_size), *TINY, *extra])
    assert code == 0
    return batch_sizes


def _assert_skips_reported(folder, out: Path) -> None:
    log = (out / "train.log").read_text(encoding="utf-8")
    assert "Logging error" not in log and "Traceback" not in log
    skipped_lines = [line for line in log.splitlines() if "skipped unreadable image" in line]
    assert len(skipped_lines) == len(folder.bad)  # each named once, not once per epoch
    for name, fragment in folder.bad.items():
        line = next((line for line in skipped_lines if f"image {as_logged(name)}: " in line), None)
        assert line is not None, f"{name!r} not reported in train.log"
        assert fragment.lower() in line.lower(), line
    assert f"{len(folder.bad)} unreadable files skipped" in log
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert set(state["skipped"]) == set(folder.bad)  # names survive the checkpoint exactly
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "loss_mean" in line]
    assert [record["skipped_files"] for record in epochs] == [len(folder.bad)] * 2
    assert all(np.isfinite(record["loss_mean"]) for record in epochs)
    assert (out / "backbone.safetensors").is_file()


def test_pretraining_uses_every_good_image_and_names_every_bad_one(messy, tmp_path, monkeypatch):
    # One batch holds the whole folder, so each step must see exactly the good images. (As root
    # the mode-000 file is readable, hence good: see the slow test below for the real thing.)
    sizes = _pretrain_on(messy, tmp_path / "run", len(messy.scanned), "--set", "data.pipeline=pil",
                         monkeypatch=monkeypatch)
    assert sizes == [len(messy.good)] * 2
    _assert_skips_reported(messy, tmp_path / "run")


def test_in_memory_pipeline_uses_every_good_image_and_names_every_bad_one(uniform_messy, tmp_path, monkeypatch):
    pytest.importorskip("kornia")
    sizes = _pretrain_on(uniform_messy, tmp_path / "run", len(uniform_messy.good), "--set", "data.pipeline=tensor",
                         monkeypatch=monkeypatch)
    assert sizes == [len(uniform_messy.good)] * 2
    _assert_skips_reported(uniform_messy, tmp_path / "run")


@pytest.fixture(scope="module")
def random_run(tmp_path_factory) -> Path:
    from digit_files import export_random_backbone

    return export_random_backbone(tmp_path_factory.mktemp("run"))


def _evaluate_on(folder, random_run: Path, out: Path) -> None:
    pytest.importorskip("linear_probe.cli")
    from linear_probe.cli import main as evaluate_main
    from linear_probe.embeddings import load_embeddings

    code = evaluate_main(["--checkpoint", str(random_run), "--train", str(folder.root), "--test-fraction", "0.3",
                          "--out", str(out), "--methods", "knn,logreg,finetune", "--label-fractions", "1.0",
                          "--seeds", "1", "--linear-epochs", "2", "--finetune-epochs", "1", "--device", "cpu",
                          "--finetune-max-fraction", "1.0", "--quiet"])
    assert code == 0
    # Every kind of features (ssl, random init, pixels) saw every good image and named every bad one.
    cached = sorted((out / "embeddings").glob("*-train-*.npy"))
    cached = [path for path in cached if path.name.count(".") == 1]  # not the .labels.npy beside them
    assert {path.name.split("-")[0] for path in cached} == {"ssl", "random_init", "pixels"}
    for path in cached:
        embeddings = load_embeddings(path)
        assert set(embeddings.names) == folder.good and len(embeddings.names) == len(folder.good)
        reasons = dict(embeddings.skipped)
        assert set(reasons) == set(folder.bad)
        for name, fragment in folder.bad.items():
            assert fragment.lower() in reasons[name].lower(), (name, reasons[name])
        assert [folder.labels[name] for name in embeddings.names] == list(embeddings.labels)
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert {row["method"] for row in rows} == {"knn", "logreg", "finetune"}
    assert all(0.0 <= row["top1"] <= 1.0 for row in rows)


def test_evaluation_uses_every_good_image_and_names_every_bad_one(tmp_path, random_run):
    folder = make_messy_folder(tmp_path / "images", non_utf8=False)
    try:
        _evaluate_on(folder, random_run, tmp_path / "eval")
    finally:
        restore_permissions(folder.root)


def test_evaluation_survives_file_names_that_are_not_utf8(tmp_path, random_run):
    folder = make_messy_folder(tmp_path / "images")
    try:
        _evaluate_on(folder, random_run, tmp_path / "eval")
    finally:
        restore_permissions(folder.root)


@pytest.mark.slow
def test_a_file_without_read_permission_is_skipped_for_real(tmp_path):
    """As root, chmod 000 protects nothing; run the command with the file-access override
    capabilities dropped (``setpriv``), so the mode-000 file really cannot be opened."""
    prefix = privilege_drop_prefix()
    if prefix is None:
        pytest.skip("running as root and cannot drop CAP_DAC_OVERRIDE (no setpriv?)")
    folder = make_messy_folder(tmp_path / "images").without_read_override()
    try:
        out = tmp_path / "run"
        command = prefix + [sys.executable, "-m", "ssl_pretrain", "--data", str(folder.root), "--out", str(out),
                            "--epochs", "2", "--batch-size", str(len(folder.scanned)),
                            "--set", "data.pipeline=pil", *TINY]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        _assert_skips_reported(folder, out)
        assert "Permission denied" in (out / "train.log").read_text()
    finally:
        restore_permissions(folder.root)


def test_a_path_list_naming_a_fifo_or_a_device_skips_them_without_blocking(tmp_path, messy):
    """A ``.txt`` list is not scanned, so its entries may be anything: opening a FIFO would wait
    for a writer forever, ``/dev/zero`` would never end; a folder is no image either."""
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    good = os.path.join(messy.root, sorted(name for name in messy.good if "/digit_" in name)[0])
    listing = tmp_path / "list.txt"
    listing.write_text(f"{fifo}\n/dev/zero\n{tmp_path}\n{good}\n")
    source = open_source(str(listing))
    outcomes = {}

    def load_all():
        for index in range(len(source)):
            try:
                outcomes[source.name(index)] = source.load(index).mode
            except UnreadableImage as error:
                outcomes[source.name(index)] = str(error)

    worker = threading.Thread(target=load_all, daemon=True)
    worker.start()
    worker.join(timeout=30)
    if worker.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # release the reader, then fail
        pytest.fail(f"loading blocked; done so far: {outcomes}")
    not_a_file = "not a regular file (a FIFO, device or folder)"
    assert outcomes == {str(fifo): not_a_file, "/dev/zero": not_a_file, str(tmp_path): not_a_file, good: "RGB"}
