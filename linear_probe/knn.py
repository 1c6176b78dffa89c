"""Weighted k-nearest-neighbour classification on frozen features.

The protocol of InstDisc (Wu et al. 2018, "Unsupervised Feature Learning via Non-Parametric
Instance Discrimination", Section 3.4), as in lightly's ``knn_predict`` and DINO's ``eval_knn.py``:
cosine similarity (inner product of L2-normalised features), the ``k`` most similar training
images vote for their class with weight ``exp(similarity / T)``. k=200, T=0.1 are InstDisc's and
lightly's benchmark values; DINO uses k=20, T=0.07.

Two search back-ends give the same (exact) neighbours:

- ``torch``: blocks of queries times all training features (one matrix product) and
  ``torch.topk``; the default on a GPU, where the features already are.
- ``faiss``: ``faiss.IndexFlatIP``, exact; the default on the CPU, where faiss measured faster
  than the torch product (``scripts/bench_knn.py``; BENCHMARKS.md, "Evaluation"). Earlier faiss
  releases were reported several times slower with large k, which is why both stay selectable.

Above ``EXACT_BELOW`` training features, exact search stops being cheap (a million 512-d
features times 10,000 queries is 5e12 multiply-adds), and the ``index`` option can trade a little
recall for time with a faiss approximate index (Johnson et al. 2019, "Billion-scale similarity
search with GPUs"; Malkov & Yashunin 2018 for HNSW):

- ``ivf``: ``IndexIVFFlat`` with inner product on the normalised features; ``nlist`` =
  4·sqrt(N) lists (faiss's guideline), k-means (spherical, seeded) on a random sample of
  ``IVF_TRAIN_POINTS_PER_LIST``·nlist features; ``nprobe`` lists are scanned per query.
- ``hnsw``: ``IndexHNSWFlat`` (M=32), inner product; no training, slow to build on few cores.

The evaluation (``evaluate_knn``) measures what the approximation cost: recall@k of the
approximate neighbours against exact search on a random sample of queries, beside the build and
search times, all recorded in the result's ``chosen``. Training features are read in chunks
(``CHUNK_ROWS``), so a read-only memory-mapped array is normalised piece by piece into the index
and never copied whole.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from linear_probe.scoring import ProbeResult, score_test, topk_accuracy

__all__ = ["INDEXES", "KNN_PROTOCOLS", "KnnProtocol", "NeighbourIndex", "build_index", "evaluate_knn",
           "exact_neighbours", "knn_classify", "recall_at_k", "resolve_index", "search_neighbours",
           "topk_accuracy"]

log = logging.getLogger(__name__)

BLOCK_ELEMENTS = 1 << 26
"""Similarity entries per query block (256 MB of float32): bounds memory whatever the data size."""
CHUNK_ROWS = 1 << 15
"""Training features normalised at a time on their way into a faiss index (64 MB at 512-d)."""
INDEXES = ("auto", "exact", "ivf", "hnsw")
EXACT_BELOW = 1_000_000
IVF_FROM_QUERIES = 25_000
"""``index="auto"`` searches exactly below this many training features, with ``ivf`` from there."""
IVF_TRAIN_POINTS_PER_LIST = 64
"""k-means sample per IVF list; faiss asks for 39 to 256. 64 keeps the k-means, the dearest part
of building the index, at a quarter of what 256 would cost (``scripts/bench_ann.py``;
BENCHMARKS.md, "Scale")."""
DEFAULT_NPROBE = 64
"""IVF lists scanned per query, about sqrt(nlist) at a million features: several times faster
than exact search, with recall@200 a little under 0.9 on hard (overlapping) clusters
(``scripts/bench_ann.py``; BENCHMARKS.md, "Scale"). Raise it when the logged recall is too low."""
HNSW_M = 32
"""Neighbours per HNSW node (faiss's usual 32): more links, better recall, slower build."""
HNSW_EF_SEARCH = 128
"""HNSW candidates kept while searching; raised to ``2 k`` so that k=200 still finds 200."""
RECALL_QUERIES = 500
"""Queries whose approximate neighbours are checked against exact search (cheap: 500 x N)."""
RECALL_WARNING = 0.9
"""Below this recall@k the evaluation warns: the kNN numbers are then not the exact protocol's."""


@dataclass(frozen=True)
class KnnProtocol:
    k: int
    temperature: float


KNN_PROTOCOLS = {
    "instdisc": KnnProtocol(k=200, temperature=0.1),  # Wu et al. 2018; lightly's benchmarks
    "dino": KnnProtocol(k=20, temperature=0.07),  # Caron et al. 2021, eval_knn.py
}


# ---------------------------------------------------------------------------------------------
# Normalisation (never in place: the features may be a read-only memory map)


def _normalised(features, device: torch.device | str | None) -> torch.Tensor:
    """``(N, D)`` array or tensor -> float32 tensor with unit rows (a zero row stays zero)."""
    if isinstance(features, np.ndarray) and not features.flags.writeable:
        # torch refuses to share a read-only buffer: copy it chunk by chunk into one new tensor.
        tensor = torch.empty(features.shape, dtype=torch.float32, device=device or "cpu")
        for start, chunk in zip(range(0, len(features), CHUNK_ROWS), _normalised_chunks(features)):
            tensor[start : start + len(chunk)] = torch.from_numpy(chunk)
        return tensor
    tensor = torch.as_tensor(features)
    if device is not None:
        tensor = tensor.to(device)
    return torch.nn.functional.normalize(tensor.float(), dim=1)


def _normalised_chunks(features, rows: int = CHUNK_ROWS) -> Iterator[np.ndarray]:
    """Unit-row float32 C-contiguous copies of ``rows`` features at a time, for faiss.

    Shape: each ``(min(rows, N - start), D)``.
    """
    for start in range(0, len(features), rows):
        chunk = features[start : start + rows]
        if isinstance(chunk, torch.Tensor):
            tensor = chunk.detach().to("cpu", torch.float32)
        else:
            tensor = torch.from_numpy(np.array(chunk, dtype=np.float32))  # a copy, writable
        yield torch.nn.functional.normalize(tensor, dim=1).numpy()


def _normalised_array(features) -> np.ndarray:
    """All of ``features`` normalised, as one float32 array (for the queries, which are few)."""
    if len(features) == 0:
        return np.zeros((0, features.shape[1]), dtype=np.float32)
    return np.concatenate(list(_normalised_chunks(features)))


def _normalised_rows(features, rows: np.ndarray) -> np.ndarray:
    """Normalised copies of the given rows (sorted, so a memory map is read front to back)."""
    if isinstance(features, torch.Tensor):
        return _normalised_array(features[torch.from_numpy(rows)])
    return _normalised_array(np.asarray(features[rows], dtype=np.float32))


# ---------------------------------------------------------------------------------------------
# Indexes


@dataclass
class NeighbourIndex:
    """A faiss index over normalised training features, with what it took to build.

    Attributes:
        kind: ``exact``, ``ivf`` or ``hnsw``.
        index: the faiss index (inner product).
        build_seconds: training plus adding the features.
        settings: what was chosen (``nlist``, ``nprobe``, ``train_points``; ``M``, ``ef_search``).
    """

    kind: str
    index: Any
    build_seconds: float
    settings: dict[str, Any] = field(default_factory=dict)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(similarities, indices)``, each ``(Q, k)``, most similar first; an approximate index
        that finds fewer than ``k`` neighbours pads with index -1 and similarity -inf.

        Args:
            queries: ``(Q, D)`` float32, already L2-normalised.
        """
        if self.kind == "hnsw":
            self.index.hnsw.efSearch = max(self.settings["ef_search"], 2 * k)
        similarities, indices = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        indices = indices.astype(np.int64)
        similarities[indices < 0] = -np.inf
        return similarities, indices


def ivf_nlist(count: int) -> int:
    """4·sqrt(N) lists (faiss's guideline), but at least 39 training points per list."""
    return max(1, min(round(4 * math.sqrt(count)), count // 39))


def build_index(train_features, kind: str = "exact", nprobe: int | None = None, seed: int = 0,
                train_points_per_list: int = IVF_TRAIN_POINTS_PER_LIST) -> NeighbourIndex:
    """A faiss inner-product index over the L2-normalised training features, filled in chunks.

    Args:
        train_features: ``(N, D)`` array (a read-only memory map is fine), or tensor.
        kind: ``exact`` (``IndexFlatIP``), ``ivf`` (``IndexIVFFlat``) or ``hnsw`` (``IndexHNSWFlat``).
        nprobe: IVF lists scanned per query (default ``DEFAULT_NPROBE``, at most ``nlist``).
        seed: of the IVF training sample and of k-means, so the same features give the same index.
        train_points_per_list: k-means sample per IVF list (``IVF_TRAIN_POINTS_PER_LIST``).
    """
    import faiss

    count, dim = len(train_features), train_features.shape[1]
    start, settings = time.perf_counter(), {}
    if kind == "exact":
        index = faiss.IndexFlatIP(dim)
    elif kind == "ivf":
        nlist = ivf_nlist(count)
        index = faiss.index_factory(dim, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
        index.cp.seed, index.cp.spherical = seed, True  # unit centroids for cosine similarity
        sample = np.sort(np.random.default_rng(seed).choice(count, min(count, train_points_per_list * nlist),
                                                            replace=False))
        index.train(_normalised_rows(train_features, sample))
        index.nprobe = min(nprobe or DEFAULT_NPROBE, nlist)
        settings = {"nlist": nlist, "nprobe": index.nprobe, "train_points": len(sample)}
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        settings = {"M": HNSW_M, "ef_construction": index.hnsw.efConstruction, "ef_search": HNSW_EF_SEARCH}
    else:
        raise ValueError(f"unknown kNN index '{kind}' (exact, ivf or hnsw)")
    for chunk in _normalised_chunks(train_features):
        index.add(chunk)
    return NeighbourIndex(kind, index, time.perf_counter() - start, settings)


def resolve_index(index: str, count: int, backend: str = "auto", device_type: str = "cpu",
                  queries: int | None = None) -> str:
    """``auto`` -> ``ivf`` from ``EXACT_BELOW`` training features and ``IVF_FROM_QUERIES`` queries
    on the CPU, else ``exact``: building the IVF index of a million features costs about as much
    as searching 25,000 queries exactly (scripts/bench_ann.py), and a GPU (the torch back-end)
    searches a million exactly in seconds.

    Raises:
        ValueError: an unknown index, or an approximate one asked of the torch back-end.
    """
    if index not in INDEXES:
        raise ValueError(f"unknown kNN index '{index}' ({', '.join(INDEXES)})")
    on_torch = backend == "torch" or (backend == "auto" and device_type != "cpu")
    if index == "auto":
        few_queries = queries is not None and queries < IVF_FROM_QUERIES
        return "exact" if count < EXACT_BELOW or on_torch or few_queries else "ivf"
    if index != "exact" and backend == "torch":
        raise ValueError(f"the '{index}' index is a faiss index: use backend faiss or auto, not torch")
    return index


def exact_neighbours(train_features, queries: np.ndarray, k: int) -> np.ndarray:
    """Indices ``(Q, min(k, N))`` of the exactly most similar training features, streaming the
    training features in chunks (memory: Q x chunk similarities), for checking an approximate index.

    Args:
        queries: ``(Q, D)`` float32, already L2-normalised.
    """
    query_tensor = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
    best_values = torch.empty(len(queries), 0)
    best_indices = torch.empty(len(queries), 0, dtype=torch.int64)
    offset = 0
    for chunk in _normalised_chunks(train_features):
        similarities = query_tensor @ torch.from_numpy(chunk).T
        values, positions = similarities.topk(min(k, len(chunk)), dim=1)
        values, order = torch.cat([best_values, values], 1).topk(min(k, offset + len(chunk)), dim=1)
        best_indices = torch.cat([best_indices, positions + offset], 1).gather(1, order)
        best_values, offset = values, offset + len(chunk)
    return best_indices.numpy()


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean share of each query's exact ``k`` neighbours that the approximate search found.

    Shape: both ``(Q, k)``; -1 in ``found`` (nothing found) counts as a miss.
    """
    if len(exact) == 0:
        return float("nan")
    hits = [np.isin(row_exact, row_found[row_found >= 0]).mean() for row_found, row_exact in zip(found, exact)]
    return float(np.mean(hits))


# ---------------------------------------------------------------------------------------------
# Search and classification


def _search(train_features, query_features, k: int, backend: str, batch_size: int | None, device,
            index: str, nprobe: int | None, seed: int, recall_queries: int):
    """``search_neighbours`` plus what the search cost: ``(similarities, indices, report)``."""
    if backend not in ("auto", "torch", "faiss"):
        raise ValueError(f"unknown kNN backend '{backend}' (auto, torch or faiss)")
    if device is None and isinstance(train_features, torch.Tensor):
        device = train_features.device
    if len(train_features) == 0:
        raise ValueError("kNN needs at least one training feature")
    target = torch.device(device) if device is not None else torch.device("cpu")
    kind = resolve_index(index, len(train_features), backend, target.type, len(query_features))
    k = min(k, len(train_features))
    if kind == "exact" and (backend == "torch" or (backend == "auto" and target.type != "cpu")):
        train = _normalised(train_features, device)
        queries = _normalised(query_features, train.device)
        return *_search_torch(train, queries, k, batch_size), {"index": "exact"}
    queries = _normalised_array(query_features)
    built = build_index(train_features, kind, nprobe=nprobe, seed=seed)
    start = time.perf_counter()
    similarities, indices = built.search(queries, k)
    report = {"index": kind, **built.settings, "build_seconds": round(built.build_seconds, 3),
              "search_seconds": round(time.perf_counter() - start, 3)}
    if kind != "exact" and recall_queries > 0 and len(queries):
        sample = np.sort(np.random.default_rng(seed).choice(len(queries), min(recall_queries, len(queries)),
                                                            replace=False))
        exact = exact_neighbours(train_features, queries[sample], k)
        report.update(recall_at_k=round(recall_at_k(indices[sample], exact), 4), recall_queries=len(sample))
    return (torch.from_numpy(similarities).to(target), torch.from_numpy(indices).to(target), report)


def _search_torch(train: torch.Tensor, queries: torch.Tensor, k: int, batch_size: int | None):
    block = batch_size or max(1, BLOCK_ELEMENTS // max(1, len(train)))
    similarities, indices = [], []
    for start in range(0, len(queries), block):
        block_similarities = queries[start : start + block] @ train.T  # (B, N)
        values, positions = block_similarities.topk(k, dim=1)
        similarities.append(values)
        indices.append(positions)
    return torch.cat(similarities), torch.cat(indices)


def search_neighbours(train_features, query_features, k: int, backend: str = "auto",
                      batch_size: int | None = None, device: str | None = None, index: str = "exact",
                      nprobe: int | None = None, seed: int = 0):
    """The ``k`` training features most cosine-similar to each query.

    Args:
        train_features: ``(N, D)`` array or tensor; normalised here (a read-only memory map is
            read in chunks, never written).
        query_features: ``(Q, D)``.
        k: neighbours per query, clamped to ``N``.
        backend: ``auto`` (faiss on the CPU, torch on a GPU), ``torch`` (matrix product +
            top-k) or ``faiss`` (``IndexFlatIP``; the faster on a CPU, ``scripts/bench_knn.py``).
        batch_size: queries per block for ``torch``; default keeps a block under 256 MB.
        device: where to compute; default: where ``train_features`` already is.
        index: ``exact`` (the default here), ``ivf``, ``hnsw`` (faiss approximate indexes, see
            the module docstring) or ``auto`` (``resolve_index``).
        nprobe: IVF lists scanned per query (``DEFAULT_NPROBE``).
        seed: of the IVF training sample and k-means.

    Returns:
        ``(similarities, indices)``, two ``(Q, min(k, N))`` tensors, most similar first. An
        approximate index that finds fewer than ``k`` pads with index -1, similarity -inf.
    """
    similarities, indices, _ = _search(train_features, query_features, k, backend, batch_size, device,
                                       index, nprobe, seed, recall_queries=0)
    return similarities, indices


def _knn_scores(train_features, train_labels, query_features, num_classes: int, k: int, temperature: float,
                batch_size: int | None, backend: str, device, index: str, nprobe: int | None, seed: int,
                recall_queries: int) -> tuple[np.ndarray, dict]:
    """``knn_classify``'s scores and the search report of ``_search``."""
    similarities, indices, report = _search(train_features, query_features, k, backend, batch_size, device,
                                            index, nprobe, seed, recall_queries)
    labels = torch.as_tensor(train_labels).to(indices.device, torch.int64)
    found = indices >= 0  # an approximate index may find fewer than k: those slots do not vote
    votes = torch.where(found, (similarities / temperature).exp(), torch.zeros((), device=indices.device))
    scores = torch.zeros(len(indices), num_classes, device=indices.device)
    scores.scatter_add_(1, labels[indices.clamp(min=0)], votes)
    return scores.cpu().numpy(), report


def knn_classify(train_features, train_labels, query_features, num_classes: int, k: int = 200,
                 temperature: float = 0.1, batch_size: int | None = None, backend: str = "auto",
                 device: str | None = None, index: str = "exact", nprobe: int | None = None,
                 seed: int = 0) -> np.ndarray:
    """Class scores of each query by similarity-weighted votes of its k nearest training images.

    ``score[q, c] = sum over the k neighbours n of q with label c of exp(cos(q, n) / T)``
    (InstDisc, Section 3.4; lightly's ``knn_predict``). ``k`` larger than the training set is
    clamped to its size.

    Args:
        train_features: ``(N, D)`` NumPy array (memory maps too) or torch tensor (any device).
        train_labels: ``(N,)`` integer classes in ``[0, num_classes)``.
        query_features: ``(Q, D)``.
        num_classes: number of columns of the result.
        k, temperature: neighbours that vote and the softness of their weights.
        batch_size, backend, device, index, nprobe, seed: see ``search_neighbours``.

    Returns:
        ``(Q, num_classes)`` float32 NumPy scores; ``argmax`` per row is the prediction.
    """
    scores, _ = _knn_scores(train_features, train_labels, query_features, num_classes, k, temperature,
                            batch_size, backend, device, index, nprobe, seed, recall_queries=0)
    return scores


def evaluate_knn(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray,
                 test_labels: np.ndarray, num_classes: int, k: int = 200, temperature: float = 0.1,
                 backend: str = "auto", device: str | None = None, index: str = "auto",
                 nprobe: int | None = None, seed: int = 0, recall_queries: int = RECALL_QUERIES) -> ProbeResult:
    """kNN top-1 / top-5 on the test set. Nothing is tuned, so no validation data is needed.

    With an approximate index (``index`` ``ivf``, ``hnsw``, or ``auto`` above ``EXACT_BELOW``
    training features), ``chosen`` also records the index, its settings, ``build_seconds``,
    ``search_seconds`` and ``recall_at_k`` against exact search on ``recall_queries`` random
    test queries; a recall below ``RECALL_WARNING`` is logged as a warning.
    """
    scores, report = _knn_scores(train_features, train_labels, test_features, num_classes, k, temperature,
                                 None, backend, device, index, nprobe, seed, recall_queries)
    chosen: dict[str, Any] = {"k": min(k, len(train_labels)), "temperature": temperature}
    if report["index"] != "exact":
        chosen.update(report)
        recall = report.get("recall_at_k", float("nan"))
        level = logging.WARNING if recall < RECALL_WARNING else logging.INFO
        log.log(level, "kNN %s index over %d features: recall@%d %.3f on %d queries (exact search as "
                "reference), built in %.1f s, searched in %.1f s%s", report["index"], len(train_labels),
                chosen["k"], recall, report.get("recall_queries", 0), report["build_seconds"],
                report["search_seconds"], "; raise --knn-nprobe for more" if level == logging.WARNING else "")
    return score_test(scores, test_labels, chosen)
