"""Approximate kNN (faiss IVF and HNSW): recall against a NumPy brute force on clustered data,
``auto`` choosing exact search below the threshold, the same accuracy as exact search on real
digits, and the recall / timing record that the evaluation writes."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits

import linear_probe.knn as knn_module
from linear_probe.cli import build_parser, settings_from_args
from linear_probe.errors import EvaluationError
from linear_probe.evaluate import EvaluationSettings
from linear_probe.knn import (
    EXACT_BELOW,
    build_index,
    evaluate_knn,
    exact_neighbours,
    ivf_nlist,
    knn_classify,
    recall_at_k,
    resolve_index,
    search_neighbours,
)


def gaussian_mixture(count: int, dim: int = 48, clusters: int = 40, seed: int = 0) -> np.ndarray:
    """Clustered features, like a backbone's: cluster centres plus noise of a third their scale."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    members = rng.integers(0, clusters, count)
    return centres[members] + 0.35 * rng.standard_normal((count, dim)).astype(np.float32)


def brute_force_neighbours(train: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Cosine similarity in float64, every training point ranked: the reference."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    return np.argsort(-(queries.astype(np.float64) @ train.T.astype(np.float64)), axis=1)[:, :k]


@pytest.fixture(scope="module")
def clustered():
    features = gaussian_mixture(12_200)
    return features[:12_000], features[12_000:]


@pytest.mark.parametrize("index", ["ivf", "hnsw"])
@pytest.mark.parametrize("k", [20, 200])
def test_approximate_indexes_find_the_exact_neighbours(clustered, index, k):
    train, queries = clustered
    _, found = search_neighbours(train, queries, k, index=index, nprobe=8)  # 8 of 307 lists (IVF)
    assert found.shape == (len(queries), k)
    assert recall_at_k(found.numpy(), brute_force_neighbours(train, queries, k)) >= 0.9


def test_ivf_settings_follow_the_size_and_are_deterministic(clustered):
    train, queries = clustered
    assert ivf_nlist(1_000_000) == 4000 and ivf_nlist(12_000) == 307 and ivf_nlist(10) == 1
    first, second = build_index(train, "ivf", nprobe=8, seed=3), build_index(train, "ivf", nprobe=8, seed=3)
    assert first.settings == {"nlist": 307, "nprobe": 8, "train_points": 12_000}
    np.testing.assert_array_equal(first.search(queries, 20)[1], second.search(queries, 20)[1])
    assert build_index(train[:500], "ivf", nprobe=1000).settings["nprobe"] == 12  # clamped to nlist


def test_streaming_exact_search_matches_brute_force(clustered, monkeypatch):
    train, queries = clustered
    monkeypatch.setattr(knn_module, "CHUNK_ROWS", 1000)  # several chunks to merge
    unit = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    assert recall_at_k(exact_neighbours(train, unit, 50), brute_force_neighbours(train, queries, 50)) == 1.0


def test_auto_is_exact_below_the_threshold():
    assert resolve_index("auto", EXACT_BELOW - 1) == "exact"
    # a million features but few queries: building the IVF index costs more than it saves
    assert resolve_index("auto", EXACT_BELOW, queries=10_000) == "exact"
    assert resolve_index("auto", EXACT_BELOW, queries=100_000) == "ivf"
    assert resolve_index("auto", EXACT_BELOW) == "ivf"
    assert resolve_index("auto", EXACT_BELOW, backend="torch") == "exact"  # torch has exact search only
    assert resolve_index("auto", EXACT_BELOW, device_type="cuda") == "exact"
    assert resolve_index("hnsw", 10) == "hnsw"
    with pytest.raises(ValueError, match="faiss index"):
        resolve_index("ivf", 10, backend="torch")
    with pytest.raises(ValueError, match="unknown kNN index"):
        resolve_index("annoy", 10)


def test_ivf_classifies_digits_as_well_as_exact_search():
    digits = load_digits()
    pixels, labels = digits.data.astype(np.float32), digits.target
    order = np.random.default_rng(0).permutation(len(labels))
    train, test = order[:1500], order[1500:]
    exact = knn_classify(pixels[train], labels[train], pixels[test], 10, k=20, temperature=0.07)
    approximate = knn_classify(pixels[train], labels[train], pixels[test], 10, k=20, temperature=0.07,
                               index="ivf", nprobe=4)  # 4 of 38 lists
    exact_accuracy = (exact.argmax(1) == labels[test]).mean()
    assert exact_accuracy > 0.95
    assert abs((approximate.argmax(1) == labels[test]).mean() - exact_accuracy) <= 0.01


def test_evaluation_records_recall_and_times_of_an_approximate_index(clustered, monkeypatch, caplog):
    train, queries = clustered
    labels = np.arange(len(train)) % 5
    test_labels = np.zeros(len(queries), dtype=np.int64)
    exact = evaluate_knn(train, labels, queries, test_labels, 5, k=20)
    assert exact.chosen == {"k": 20, "temperature": 0.1}  # below the threshold: exact, as before
    monkeypatch.setattr(knn_module, "EXACT_BELOW", 10_000)
    monkeypatch.setattr(knn_module, "IVF_FROM_QUERIES", 100)
    caplog.set_level("INFO", logger="linear_probe.knn")
    result = evaluate_knn(train, labels, queries, test_labels, 5, k=20, recall_queries=150)
    chosen = result.chosen
    assert chosen["index"] == "ivf" and chosen["nlist"] == 307 and chosen["recall_queries"] == 150
    assert chosen["recall_at_k"] >= 0.9 and chosen["build_seconds"] >= 0 and chosen["search_seconds"] >= 0
    assert "recall@20" in caplog.text
    # A recall that is too low is a warning that says what to do.
    evaluate_knn(train, labels, queries, test_labels, 5, k=200, index="ivf", nprobe=1)
    assert any(record.levelname == "WARNING" and "--knn-nprobe" in record.getMessage() for record in caplog.records)


def test_lists_too_small_for_k_leave_slots_that_do_not_vote():
    rng = np.random.default_rng(0)
    train = gaussian_mixture(400, clusters=10)
    labels = rng.integers(0, 3, 400)
    queries = train[:5] + 0.01
    similarities, indices = search_neighbours(train, queries, 200, index="ivf", nprobe=1)  # ~40 per list
    assert (indices < 0).any() and np.isneginf(similarities[indices < 0]).all()
    scores = knn_classify(train, labels, queries, 3, k=200, index="ivf", nprobe=1)
    found = indices[0][indices[0] >= 0].numpy()
    expected = np.zeros(3)
    np.add.at(expected, labels[found], np.exp(similarities[0][: len(found)].numpy() / 0.1))
    np.testing.assert_allclose(scores[0], expected, rtol=1e-5)


def test_index_options_reach_the_settings_from_the_command_line():
    args = build_parser().parse_args(["--checkpoint", "c", "--train", "t", "--out", "o", "--knn-index", "hnsw",
                                      "--knn-nprobe", "16"])
    settings = settings_from_args(args)
    assert settings.knn_index == "hnsw" and settings.knn_nprobe == 16
    assert EvaluationSettings().knn_index == "auto" and EvaluationSettings().knn_nprobe is None
    with pytest.raises(EvaluationError, match="needs the faiss back-end"):
        EvaluationSettings(knn_index="ivf", knn_backend="torch")
    with pytest.raises(EvaluationError, match="knn-nprobe"):
        EvaluationSettings(knn_nprobe=0)
