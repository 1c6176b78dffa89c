"""Weighted kNN: hand-placed points with known answers, and both back-ends against a slow NumPy
transcription of the InstDisc vote (and against lightly's ``knn_predict``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from linear_probe.knn import knn_classify, search_neighbours, topk_accuracy


def reference_knn_scores(train, train_labels, queries, num_classes, k, temperature):
    """InstDisc Section 3.4, one query at a time, in float64: normalise, rank every training
    point by cosine similarity, let the k best vote with exp(similarity / T)."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    scores = np.zeros((len(queries), num_classes))
    for row, query in enumerate(queries):
        similarities = train @ query
        for neighbour in np.argsort(-similarities)[: min(k, len(train))]:
            scores[row, train_labels[neighbour]] += np.exp(similarities[neighbour] / temperature)
    return scores


def test_hand_placed_points_vote_for_the_nearest_class():
    # Class 0 points east, class 1 north; a query a little north of east is class 0 with k=1,
    # and with k=3 the two close class-0 points outvote the one class-1 point.
    train = np.array([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [-1.0, 0.0]], dtype=np.float32)
    labels = np.array([0, 0, 1, 1])
    queries = np.array([[1.0, 0.3], [0.1, 1.0], [-1.0, -0.1]], dtype=np.float32)
    assert knn_classify(train, labels, queries, 2, k=1).argmax(1).tolist() == [0, 1, 1]
    scores = knn_classify(train, labels, queries, 2, k=3, temperature=0.1)
    assert scores.argmax(1).tolist() == [0, 1, 1]
    # Query 0's neighbours: (1, 0.1), (1, 0) of class 0 and (0, 1) of class 1 (cos ~0.29).
    query = queries[0] / np.linalg.norm(queries[0])
    expected_class1 = np.exp(query @ train[2] / 0.1)
    assert scores[0, 1] == pytest.approx(expected_class1, rel=1e-5)


def test_scaling_a_feature_does_not_change_the_vote():
    train = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    scores = knn_classify(train, np.array([0, 1]), np.array([[10.0, 1.0]], dtype=np.float32), 2, k=2)
    scaled = knn_classify(train * 7, np.array([0, 1]), np.array([[1.0, 0.1]], dtype=np.float32), 2, k=2)
    np.testing.assert_allclose(scores, scaled, rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "faiss"])
@pytest.mark.parametrize("k, temperature", [(200, 0.1), (20, 0.07), (1, 0.5)])
def test_backends_agree_with_brute_force(backend, k, temperature):
    rng = np.random.default_rng(k)
    train = rng.standard_normal((700, 24)).astype(np.float32)
    labels = rng.integers(0, 7, 700)
    queries = rng.standard_normal((130, 24)).astype(np.float32)
    expected = reference_knn_scores(train, labels, queries, 7, k, temperature)
    scores = knn_classify(train, labels, queries, 7, k=k, temperature=temperature, backend=backend,
                          batch_size=32)  # several query blocks
    np.testing.assert_allclose(scores, expected, rtol=2e-4, atol=1e-6)
    assert (scores.argmax(1) == expected.argmax(1)).all()


def test_k_larger_than_the_training_set_is_clamped():
    rng = np.random.default_rng(1)
    train, labels = rng.standard_normal((5, 4)).astype(np.float32), np.array([0, 1, 2, 0, 1])
    queries = rng.standard_normal((3, 4)).astype(np.float32)
    for backend in ("torch", "faiss"):
        scores = knn_classify(train, labels, queries, 3, k=200, backend=backend)
        np.testing.assert_allclose(scores, reference_knn_scores(train, labels, queries, 3, 200, 0.1), rtol=1e-4)


def test_torch_tensors_in_and_the_neighbours_out():
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]])
    similarities, indices = search_neighbours(train, torch.tensor([[1.0, 0.1]]), k=2)
    assert indices.tolist() == [[0, 2]]
    assert similarities[0, 0] > similarities[0, 1]
    scores = knn_classify(train, torch.tensor([0, 1, 1]), torch.tensor([[0.0, 1.0]]), 2, k=1)
    assert isinstance(scores, np.ndarray) and scores.argmax() == 1


def test_agrees_with_lightly_knn_predict():
    from lightly.utils.benchmarking import knn_predict

    rng = np.random.default_rng(3)
    train = torch.nn.functional.normalize(torch.from_numpy(rng.standard_normal((300, 16)).astype(np.float32)), dim=1)
    labels = torch.from_numpy(rng.integers(0, 5, 300))
    queries = torch.nn.functional.normalize(torch.from_numpy(rng.standard_normal((50, 16)).astype(np.float32)), dim=1)
    lightly_order = knn_predict(queries, train.T, labels, 5, knn_k=20, knn_t=0.1)
    scores = knn_classify(train, labels, queries, 5, k=20, temperature=0.1)
    assert (scores.argmax(1) == lightly_order[:, 0].numpy()).all()


def test_topk_accuracy_counts_the_true_class_among_the_best():
    scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5]])
    labels = np.array([1, 1, 0])
    assert topk_accuracy(scores, labels, 1) == pytest.approx(1 / 3)
    assert topk_accuracy(scores, labels, 2) == pytest.approx(2 / 3)
    assert topk_accuracy(scores, labels, 5) == 1.0  # k beyond the number of classes
    # A tie does not flatter: equal scores go to the lower class index.
    assert topk_accuracy(np.array([[1.0, 1.0]]), np.array([1]), 1) == 0.0
