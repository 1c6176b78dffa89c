"""Embeddings on disk as ``.npy``: memory-mapped when loaded (a million 512-d rows are not read),
written atomically, and a read-only memory map flows through kNN, logistic regression, the linear
probe and ``Embeddings.take`` without being written to. Old ``.npz`` caches are converted; broken
or half-written caches are extracted again."""

from __future__ import annotations

import hashlib
import logging
import warnings

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from digit_files import DIGITS_MEAN, DIGITS_STD, write_digits_folder

import linear_probe.embeddings as embeddings_module
from linear_probe.embeddings import (
    Embeddings,
    cache_path,
    cached_embeddings,
    fingerprint_module,
    fingerprint_source,
    load_embeddings,
    save_embeddings,
)
from linear_probe.errors import EvaluationError
from linear_probe.knn import knn_classify
from linear_probe.linear import evaluate_linear
from linear_probe.logreg import evaluate_logreg
from linear_probe.splits import LabelBudget, sample_label_subset
from ssl_pretrain.checkpoint import CheckpointError
from ssl_pretrain.data import open_source
from ssl_pretrain.augment.transforms import build_eval_transform

TRANSFORM = build_eval_transform(16, DIGITS_MEAN, DIGITS_STD)


def sample_embeddings(count: int = 6) -> Embeddings:
    rng = np.random.default_rng(0)
    return Embeddings(rng.standard_normal((count, 5)).astype(np.float32), rng.integers(0, 3, count),
                      [f"{i % 3}/img{i}.png" for i in range(count - 1)] + ["1/caf\udce9.png"],  # not UTF-8
                      [("2/broken.png", "not an image")], indices=np.arange(count) * 2, classes=["a", "b", "c"])


def file_digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_round_trip_is_memory_mapped_and_equal(tmp_path):
    original = sample_embeddings()
    save_embeddings(tmp_path / "e.npy", original)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["e.indices.npy", "e.json", "e.labels.npy", "e.npy"]
    loaded = load_embeddings(tmp_path / "e.npy")
    assert isinstance(loaded.features, np.memmap) and not loaded.features.flags.writeable
    np.testing.assert_array_equal(loaded.features, original.features)
    np.testing.assert_array_equal(loaded.labels, original.labels)
    np.testing.assert_array_equal(loaded.indices, original.indices)
    assert loaded.names == original.names and loaded.skipped == original.skipped and loaded.classes == original.classes
    assert load_embeddings(tmp_path / "e.json").names == original.names  # the description names the set too
    # The features file is a plain .npy: any tool reads it, and without pickle.
    np.testing.assert_array_equal(np.load(tmp_path / "e.npy", allow_pickle=False), original.features)


def test_a_large_set_is_mapped_not_read(tmp_path):
    features = np.lib.format.open_memmap(tmp_path / "big.npy", mode="w+", dtype=np.float32, shape=(200_000, 512))
    features[-1] = 1.0  # 400 MB, sparse on disk: only the pages touched are written
    del features
    loaded = load_embeddings(tmp_path / "big.npy")  # a lone .npy: features only
    assert isinstance(loaded.features, np.memmap) and loaded.labels is None and len(loaded) == 200_000
    assert loaded.features[-1].sum() == 512 and loaded.names[-1] == "199999"
    # A run of rows stays a view of the map; scattered rows are copied, and only those.
    assert isinstance(loaded.take(np.arange(1000, 5000)).features, np.memmap)
    assert not isinstance(loaded.take(np.array([5, 3])).features, np.memmap)


def test_a_read_only_map_flows_through_the_probes_unchanged(tmp_path):
    digits = load_digits()
    save_embeddings(tmp_path / "digits.npy", Embeddings(digits.data, digits.target, [str(i) for i in range(1797)]))
    before = file_digest(tmp_path / "digits.npy")
    embeddings = load_embeddings(tmp_path / "digits.npy")
    train = embeddings.take(np.arange(0, 1200))
    val, test = embeddings.take(np.arange(1200, 1500)), embeddings.take(np.arange(1500, 1797))
    assert isinstance(train.features, np.memmap) and not train.features.flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. torch's "the given NumPy array is not writable"
        for options in ({"backend": "faiss"}, {"backend": "torch"}, {"index": "ivf"}, {"index": "hnsw"}):
            scores = knn_classify(train.features, train.labels, test.features, 10, k=20, **options)
            assert (scores.argmax(1) == test.labels).mean() > 0.9, options
    labelled = train.take(sample_label_subset(train.labels, LabelBudget(fraction=0.5), seed=0))
    logreg = evaluate_logreg(labelled.features, labelled.labels, val.features, val.labels, test.features,
                             test.labels, 10)
    linear = evaluate_linear(train.features, train.labels, val.features, val.labels, test.features, test.labels,
                             10, epochs=5)
    assert logreg.top1 > 0.85 and linear.top1 > 0.8
    assert file_digest(tmp_path / "digits.npy") == before


def test_an_interrupted_save_reads_as_incomplete_not_mixed(tmp_path, monkeypatch):
    save_embeddings(tmp_path / "e.npy", sample_embeddings())
    real_save = np.save

    def disk_full_on_labels(file, array, **kwargs):
        if array.dtype == np.int64:
            raise OSError(28, "No space left on device")
        real_save(file, array, **kwargs)

    monkeypatch.setattr(embeddings_module.np, "save", disk_full_on_labels)
    with pytest.raises(CheckpointError, match="disk full"):
        save_embeddings(tmp_path / "e.npy", sample_embeddings(4))
    monkeypatch.undo()
    assert not [path for path in tmp_path.iterdir() if path.name.endswith(".tmp")]
    with pytest.raises(EvaluationError, match="incomplete") as error:
        load_embeddings(tmp_path / "e.npy")
    assert "\n" not in str(error.value)
    with pytest.raises(EvaluationError, match=r"\.npy or \.npz"):
        save_embeddings(tmp_path / "e.pt", sample_embeddings())


def test_odd_files_are_read_or_refused_in_one_line(tmp_path):
    with open(tmp_path / "zip.npy", "wb") as file:  # np.savez would add .npz to a name
        np.savez(file, features=np.ones((3, 2), np.float32), labels=np.array([0, 1, 0]))
    assert load_embeddings(tmp_path / "zip.npy").labels.tolist() == [0, 1, 0]  # a .npz by another name
    save_embeddings(tmp_path / "e.npy", sample_embeddings())
    for description, match in (("[1, 2]", "not a readable"), ('{"format": "other"}', "not an embeddings description")):
        (tmp_path / "e.json").write_text(description)
        with pytest.raises(EvaluationError, match=match) as error:
            load_embeddings(tmp_path / "e.npy")
        assert "\n" not in str(error.value)
    save_embeddings(tmp_path / "e.npy", sample_embeddings())
    np.save(tmp_path / "e.npy", np.zeros((2, 5), np.float32))  # features replaced behind the description's back
    with pytest.raises(EvaluationError, match="says"):
        load_embeddings(tmp_path / "e.npy")


@pytest.fixture
def cache_setup(tmp_path, monkeypatch):
    """A digits folder, a backbone, and ``run()``: ``cached_embeddings`` counting extractions."""
    folder = write_digits_folder(tmp_path / "data", 2, classes=[0, 1])
    source = open_source(str(folder), labelled=True)
    backbone = torch.nn.Flatten()
    calls = []
    real_extract = embeddings_module.extract_embeddings
    monkeypatch.setattr(embeddings_module, "extract_embeddings",
                        lambda *args, **kwargs: calls.append(1) or real_extract(*args, **kwargs))
    keys = (tmp_path / "cache", "ssl-train", fingerprint_module(backbone), fingerprint_source(source))

    def run() -> Embeddings:
        return cached_embeddings(*keys, backbone, source, TRANSFORM, progress=False)

    return run, calls, cache_path(*keys, TRANSFORM), real_extract(backbone, source, TRANSFORM, progress=False)


def test_an_old_npz_cache_is_converted_without_extracting(cache_setup, caplog):
    run, calls, path, expected = cache_setup
    save_embeddings(path.with_suffix(".npz"), expected)  # what earlier versions wrote
    caplog.set_level(logging.INFO, logger="linear_probe.embeddings")
    embeddings = run()
    assert calls == [] and "converting cached embeddings" in caplog.text
    assert isinstance(embeddings.features, np.memmap) and not path.with_suffix(".npz").exists()
    np.testing.assert_array_equal(embeddings.features, expected.features)
    assert embeddings.names == expected.names


@pytest.mark.parametrize("damage", ["truncated features", "unreadable npz", "no description"])
def test_a_broken_cache_is_extracted_again_with_a_log_line(cache_setup, caplog, damage):
    run, calls, path, expected = cache_setup
    if damage == "unreadable npz":
        path.parent.mkdir(parents=True)
        path.with_suffix(".npz").write_bytes(b"PK\x03\x04 not really a zip")
    else:
        run()
        if damage == "truncated features":
            path.write_bytes(path.read_bytes()[:200])
        else:
            path.with_suffix(".json").unlink()  # as a save killed before its last file leaves it
        calls.clear()
    caplog.set_level(logging.INFO, logger="linear_probe.embeddings")
    embeddings = run()
    assert calls == [1]
    if damage != "no description":
        assert "ignoring a broken cache file" in caplog.text and "extracting again" in caplog.text
    np.testing.assert_array_equal(embeddings.features, expected.features)
    calls.clear()
    assert isinstance(run().features, np.memmap) and calls == []  # repaired: reused from now on
