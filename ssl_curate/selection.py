"""Which images to label first when there are no labels yet (cold-start selection).

Every strategy reads an ``(N, D)`` float32 embedding matrix (a pretrained backbone's features,
L2-normalised) and never a label; each is seeded and deterministic:

- ``typiclust``: Hacohen, Dekel & Weinshall, "Active Learning on a Budget: Opposite Strategies
  Suit High and Low Budgets" (ICML 2022), TypiClust. k-means into as many clusters as labels
  (capped so a cluster holds at least ``MIN_CLUSTER_SIZE`` points on average); from the cluster
  with the fewest picks so far (the largest first) take its most *typical* point, typicality =
  1 / mean L2 distance to the point's ``TYPICALITY_K`` nearest neighbours in its cluster. Clusters
  smaller than ``MIN_CLUSTER_SIZE`` are skipped, as in the paper, until nothing else is left.
- ``kcenter``: Sener & Savarese, "Active Learning for Convolutional Neural Networks: A Core-Set
  Approach" (ICLR 2018), k-center greedy: from a seeded random point, repeatedly take the point
  farthest from everything taken. One distance pass per pick, memory O(N).
- ``kmeans``: the point nearest each k-means centroid (a common cold-start baseline, e.g. in the
  TypiClust paper).
- ``random``: a seeded uniform sample, the baseline every other strategy must beat.

k-means is faiss's (``faiss.Kmeans``, seeded), as is the neighbour search.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

from ssl_pretrain.errors import SSLError

STRATEGIES = ("typiclust", "kcenter", "kmeans", "random")
TYPICALITY_K = 20
"""Neighbours of TypiClust's typicality (the paper's k=20)."""
MIN_CLUSTER_SIZE = 5
"""TypiClust skips clusters smaller than this (the paper's 5): a tiny cluster is an outlier group."""
KMEANS_ITERATIONS = 20
"""faiss's default k-means iterations; the TypiClust code runs scikit-learn's KMeans to convergence."""
DISTANCE_CHUNK = 1 << 16
"""Rows of one distance pass of k-center greedy (16 MB at 256-d): bounds extra memory."""


class SelectionError(SSLError, ValueError):
    """A selection that cannot run as asked (bad budget or strategy); one-line message."""


@dataclass
class Selection:
    """The chosen rows and why each was chosen.

    Attributes:
        indices: ``(budget,)`` unique row positions, in the order they were picked.
        clusters: ``(budget,)`` k-means cluster of each pick (-1 where the strategy has none).
        scores: ``(budget,)`` typicality (``typiclust``), distance to the nearest earlier pick
            (``kcenter``, inf for the first), distance to the centroid (``kmeans``), NaN (``random``).
        score_name: what ``scores`` holds.
    """

    indices: np.ndarray
    clusters: np.ndarray
    scores: np.ndarray
    score_name: str


def check_request(count: int | None, budget: int, strategy: str) -> None:
    """Raise ``SelectionError`` for an unknown strategy or a budget outside ``[1, count]``
    (``count`` None: not known yet, only ``budget >= 1`` is checked)."""
    if strategy not in STRATEGIES:
        raise SelectionError(f"unknown selection strategy '{strategy}': choose from {', '.join(STRATEGIES)}")
    if count is None and budget < 1:
        raise SelectionError(f"budget must be at least 1, got {budget}")
    if count is None:
        return
    if not 1 <= budget <= count:
        raise SelectionError(f"budget must be between 1 and the number of images ({count}), got {budget}")


def select(embeddings: np.ndarray, budget: int, strategy: str, seed: int = 0) -> Selection:
    """Choose ``budget`` rows of ``embeddings`` to label, without looking at any label.

    Args:
        embeddings: ``(N, D)`` features, L2-normalised (any float array; used as float32).
        budget: how many rows, 1 to N.
        strategy: one of ``STRATEGIES``.
        seed: seeds k-means, k-center's first point and the random sample.

    Raises:
        SelectionError: a bad budget or strategy, or features that are not a 2-D array.
    """
    features = np.ascontiguousarray(embeddings, dtype=np.float32)
    if features.ndim != 2:
        raise SelectionError(f"embeddings must be a 2-D array (images x dims), got shape {features.shape}")
    check_request(len(features), budget, strategy)
    if strategy == "random":
        indices = np.random.default_rng(seed).choice(len(features), budget, replace=False)
        return Selection(indices.astype(np.int64), np.full(budget, -1), np.full(budget, np.nan), "none")
    if strategy == "kcenter":
        indices, distances = kcenter_greedy(features, budget, seed)
        return Selection(indices, np.full(budget, -1), distances, "distance")
    if strategy == "kmeans":
        return nearest_to_centroids(features, budget, seed)
    return typiclust(features, budget, seed)


def select_indices(embeddings: np.ndarray, budget: int, strategy: str, seed: int = 0) -> np.ndarray:
    """``select(...).indices``: ``(budget,)`` unique int64 row positions."""
    return select(embeddings, budget, strategy, seed).indices


def kmeans_clusters(features: np.ndarray, n_clusters: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(centroids (K, D), assignment (N,))`` of seeded faiss k-means (one thread: deterministic)."""
    kmeans = faiss.Kmeans(features.shape[1], n_clusters, niter=KMEANS_ITERATIONS, seed=seed, verbose=False,
                          max_points_per_centroid=1 << 30, min_points_per_centroid=1)  # every point; few is fine
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # multi-threaded sums may differ in the last bit between runs
    try:
        kmeans.train(features)
        _, assignment = kmeans.index.search(features, 1)
    finally:
        faiss.omp_set_num_threads(previous)
    return kmeans.centroids, assignment[:, 0].astype(np.int64)


def kcenter_greedy(features: np.ndarray, budget: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sener & Savarese's k-center greedy from a seeded random first point.

    Returns:
        ``(indices, distances)``, each ``(budget,)``: the picks in order and each pick's distance
        to the nearest earlier one (inf for the first), which is the covering radius just before it.
    """
    squared_norms = np.einsum("nd,nd->n", features, features, dtype=np.float64)
    first = int(np.random.default_rng(seed).integers(len(features)))
    nearest = np.full(len(features), np.inf)
    indices, distances = [first], [np.inf]
    for _ in range(budget - 1):
        _update_nearest(features, squared_norms, indices[-1], nearest)
        pick = int(np.argmax(nearest))
        indices.append(pick)
        distances.append(float(np.sqrt(nearest[pick])))
    return np.asarray(indices, dtype=np.int64), np.asarray(distances)


def _update_nearest(features: np.ndarray, squared_norms: np.ndarray, centre: int, nearest: np.ndarray) -> None:
    """``nearest = min(nearest, squared distance to features[centre])``, in chunks, in place."""
    vector = features[centre]  # float32 product: a float64 one would copy every chunk first
    for start in range(0, len(features), DISTANCE_CHUNK):
        part = slice(start, start + DISTANCE_CHUNK)
        squared = squared_norms[part] - 2.0 * (features[part] @ vector).astype(np.float64) + squared_norms[centre]
        np.minimum(nearest[part], np.maximum(squared, 0.0), out=nearest[part])
    nearest[centre] = 0.0  # exactly, whatever the rounding


def nearest_to_centroids(features: np.ndarray, budget: int, seed: int) -> Selection:
    """The point nearest each of ``budget`` k-means centroids (the next nearest if already taken)."""
    centroids, assignment = kmeans_clusters(features, budget, seed)
    index = faiss.IndexFlatL2(features.shape[1])
    index.add(features)
    squared, candidates = index.search(centroids, budget)  # at most budget - 1 taken before
    taken, indices, scores = set(), [], []
    for cluster in range(budget):
        column = next(column for column in range(budget) if candidates[cluster, column] not in taken)
        taken.add(int(candidates[cluster, column]))
        indices.append(int(candidates[cluster, column]))
        scores.append(float(np.sqrt(max(squared[cluster, column], 0.0))))
    indices = np.asarray(indices, dtype=np.int64)
    return Selection(indices, assignment[indices], np.asarray(scores), "distance")


def typicality(features: np.ndarray, k: int = TYPICALITY_K) -> np.ndarray:
    """TypiClust's typicality of each row among the rows given: ``1 / mean L2 distance to its k
    nearest neighbours`` (itself excluded); ``(M,)``, zero for a single row."""
    if len(features) < 2:
        return np.zeros(len(features))
    neighbours = min(k, len(features) - 1)
    index = faiss.IndexFlatL2(features.shape[1])
    index.add(features)
    squared, _ = index.search(features, neighbours + 1)  # the first hit is the row itself
    mean_distance = np.sqrt(np.maximum(squared[:, 1:], 0.0)).mean(axis=1)
    return 1.0 / (mean_distance + 1e-12)


def typiclust(features: np.ndarray, budget: int, seed: int) -> Selection:
    """TypiClust (Hacohen et al. 2022, Algorithm 1) without earlier labels: ``budget`` clusters
    (at most ``N / MIN_CLUSTER_SIZE``), then the most typical unpicked point of the cluster with
    the fewest picks, larger clusters first; clusters below ``MIN_CLUSTER_SIZE`` come last."""
    n_clusters = max(1, min(budget, len(features) // MIN_CLUSTER_SIZE))
    _, assignment = kmeans_clusters(features, n_clusters, seed)
    members = [np.flatnonzero(assignment == cluster) for cluster in range(n_clusters)]
    # Each cluster's points, most typical first (stable: ties go to the lower row).
    ranked = []
    for rows in members:
        scores = typicality(features[rows])
        order = np.argsort(-scores, kind="stable")
        ranked.append((rows[order], scores[order]))
    picks = np.zeros(n_clusters, dtype=np.int64)
    indices, clusters, scores = [], [], []
    for _ in range(budget):
        open_clusters = [c for c in range(n_clusters) if picks[c] < len(members[c])]
        cluster = min(open_clusters, key=lambda c: (len(members[c]) < MIN_CLUSTER_SIZE, picks[c],
                                                    -len(members[c]), c))
        rows, typical = ranked[cluster]
        indices.append(int(rows[picks[cluster]]))
        scores.append(float(typical[picks[cluster]]))
        clusters.append(cluster)
        picks[cluster] += 1
    return Selection(np.asarray(indices, dtype=np.int64), np.asarray(clusters), np.asarray(scores), "typicality")
