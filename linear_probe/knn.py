"""Weighted k-nearest-neighbour classification on frozen features.

The protocol of InstDisc (Wu et al. 2018, "Unsupervised Feature Learning via Non-Parametric
Instance Discrimination", Section 3.4), as in lightly's ``knn_predict`` and DINO's ``eval_knn.py``:
cosine similarity (inner product of L2-normalised features), the ``k`` most similar training
images vote for their class with weight ``exp(similarity / T)``. k=200, T=0.1 are InstDisc's and
lightly's benchmark values; DINO uses k=20, T=0.07.

Two search back-ends give the same neighbours:

- ``torch``: blocks of queries times all training features (one matrix product) and
  ``torch.topk``; the default on a GPU, where the features already are.
- ``faiss``: ``faiss.IndexFlatIP``, exact; the default on the CPU, where faiss 1.15 measured
  faster than the torch product here (1.8 s against 2.5 s for 50,000 x 10,000, 512-d, k=200 on
  2 cores; ``scripts/bench_knn.py``; earlier faiss releases were reported several times slower
  with large k, which is why both stay selectable).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from linear_probe.scoring import ProbeResult, score_test, topk_accuracy

__all__ = ["KNN_PROTOCOLS", "KnnProtocol", "evaluate_knn", "knn_classify", "search_neighbours", "topk_accuracy"]

BLOCK_ELEMENTS = 1 << 26
"""Similarity entries per query block (256 MB of float32): bounds memory whatever the data size."""


@dataclass(frozen=True)
class KnnProtocol:
    k: int
    temperature: float


KNN_PROTOCOLS = {
    "instdisc": KnnProtocol(k=200, temperature=0.1),  # Wu et al. 2018; lightly's benchmarks
    "dino": KnnProtocol(k=20, temperature=0.07),  # Caron et al. 2021, eval_knn.py
}


def _normalised(features, device: torch.device | str | None) -> torch.Tensor:
    """``(N, D)`` array or tensor -> float32 tensor with unit rows (a zero row stays zero)."""
    tensor = torch.as_tensor(features)
    if device is not None:
        tensor = tensor.to(device)
    return torch.nn.functional.normalize(tensor.float(), dim=1)


def _search_torch(train: torch.Tensor, queries: torch.Tensor, k: int, batch_size: int | None):
    block = batch_size or max(1, BLOCK_ELEMENTS // max(1, len(train)))
    similarities, indices = [], []
    for start in range(0, len(queries), block):
        block_similarities = queries[start : start + block] @ train.T  # (B, N)
        values, positions = block_similarities.topk(k, dim=1)
        similarities.append(values)
        indices.append(positions)
    return torch.cat(similarities), torch.cat(indices)


def _search_faiss(train: torch.Tensor, queries: torch.Tensor, k: int):
    import faiss

    index = faiss.IndexFlatIP(train.shape[1])
    index.add(np.ascontiguousarray(train.cpu().numpy()))
    similarities, indices = index.search(np.ascontiguousarray(queries.cpu().numpy()), k)
    return (
        torch.from_numpy(similarities).to(queries.device),
        torch.from_numpy(indices.astype(np.int64)).to(queries.device),
    )


def search_neighbours(train_features, query_features, k: int, backend: str = "auto",
                      batch_size: int | None = None, device: str | None = None):
    """The ``k`` training features most cosine-similar to each query.

    Args:
        train_features: ``(N, D)`` array or tensor; normalised here.
        query_features: ``(Q, D)``.
        k: neighbours per query, clamped to ``N``.
        backend: ``auto`` (faiss on the CPU, torch on a GPU), ``torch`` (matrix product +
            top-k) or ``faiss`` (``IndexFlatIP``). Measured on 2 CPU cores, 50,000 x 10,000
            queries, 512-d, k=200: faiss 1.8 s, torch 2.5 s (``scripts/bench_knn.py``).
        batch_size: queries per block for ``torch``; default keeps a block under 256 MB.
        device: where to compute; default: where ``train_features`` already is.

    Returns:
        ``(similarities, indices)``, two ``(Q, min(k, N))`` tensors, most similar first.
    """
    if backend not in ("auto", "torch", "faiss"):
        raise ValueError(f"unknown kNN backend '{backend}' (auto, torch or faiss)")
    if device is None and isinstance(train_features, torch.Tensor):
        device = train_features.device
    train = _normalised(train_features, device)
    queries = _normalised(query_features, train.device)
    if len(train) == 0:
        raise ValueError("kNN needs at least one training feature")
    k = min(k, len(train))
    if backend == "faiss" or (backend == "auto" and train.device.type == "cpu"):
        return _search_faiss(train, queries, k)
    return _search_torch(train, queries, k, batch_size)


def knn_classify(train_features, train_labels, query_features, num_classes: int, k: int = 200,
                 temperature: float = 0.1, batch_size: int | None = None, backend: str = "auto",
                 device: str | None = None) -> np.ndarray:
    """Class scores of each query by similarity-weighted votes of its k nearest training images.

    ``score[q, c] = sum over the k neighbours n of q with label c of exp(cos(q, n) / T)``
    (InstDisc, Section 3.4; lightly's ``knn_predict``). ``k`` larger than the training set is
    clamped to its size.

    Args:
        train_features: ``(N, D)`` NumPy array or torch tensor (any device).
        train_labels: ``(N,)`` integer classes in ``[0, num_classes)``.
        query_features: ``(Q, D)``.
        num_classes: number of columns of the result.
        k, temperature: neighbours that vote and the softness of their weights.
        batch_size, backend, device: see ``search_neighbours``.

    Returns:
        ``(Q, num_classes)`` float32 NumPy scores; ``argmax`` per row is the prediction.
    """
    similarities, indices = search_neighbours(
        train_features, query_features, k, backend=backend, batch_size=batch_size, device=device
    )
    labels = torch.as_tensor(train_labels).to(indices.device, torch.int64)
    votes = (similarities / temperature).exp()
    scores = torch.zeros(len(indices), num_classes, device=indices.device)
    scores.scatter_add_(1, labels[indices], votes)
    return scores.cpu().numpy()


def evaluate_knn(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray,
                 test_labels: np.ndarray, num_classes: int, k: int = 200, temperature: float = 0.1,
                 backend: str = "auto", device: str | None = None) -> ProbeResult:
    """kNN top-1 / top-5 on the test set. Nothing is tuned, so no validation data is needed."""
    scores = knn_classify(train_features, train_labels, test_features, num_classes, k=k,
                          temperature=temperature, backend=backend, device=device)
    return score_test(scores, test_labels, {"k": min(k, len(train_labels)), "temperature": temperature})
