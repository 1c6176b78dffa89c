"""Exact and near-duplicate images, and test images that leak from the training set.

Three questions, one module:

- **exact duplicates**: files with the same bytes (SHA-256 of their contents, read in blocks, and
  only for files whose size is shared by another file: a unique size cannot have a twin);
- **near duplicates**: images whose L2-normalised embeddings have cosine similarity >= a
  threshold. Pairs come from a faiss ``IndexFlatIP`` range search (exact, all pairs above the
  threshold), run on blocks of queries so that 50,000+ images never need an N x N matrix; pairs
  are joined into groups with union-find (connected components: A~B and B~C put A, B, C in one
  group even when A and C are less similar, which the group's ``min_similarity`` shows);
- **leaks**: how many test images have a near duplicate in the training set (``find_leaks``),
  the check of Barz & Denzler 2020 ("Do we train on test data? Purging CIFAR of near-duplicates",
  the ciFAIR paper), who found 3.3% of CIFAR-10's test images duplicated in its training set.

``DEFAULT_THRESHOLD`` = 0.99, measured rather than guessed (BENCHMARKS.md, "Selection and
duplicates"). An image and its re-encoded copy score above it with every feature tried, while
SimCLR features come out of a ReLU, are all non-negative, and put *different* images close: with
a short CPU backbone on CIFAR-10, pairs at >= 0.99 were the same photograph by eye, pairs at 0.97
only the same kind of picture. A copy shifted by one pixel stays near only with a backbone
trained with crops (not with a random one, nor in pixels). A better backbone spreads different
images apart and may allow a lower threshold; look at ``duplicates.png`` before trusting a new
one.
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ssl_pretrain.errors import SSLError

DEFAULT_THRESHOLD = 0.99
QUERY_ROWS = 4096
"""Queries per range search: faiss's result lists of a block stay small unless the threshold is."""
MAX_PAIRS = 20_000_000
"""Near-duplicate pairs kept at most (about 400 MB); more means the threshold groups unrelated
images, and the search stops with an error rather than filling the memory."""
READ_BYTES = 1 << 20


class DuplicateError(SSLError, ValueError):
    """A duplicate search that cannot run as asked; the message is one line."""


@dataclass
class DuplicateGroup:
    """Images that are duplicates of one another.

    Attributes:
        members: positions of the images (rows of the features), ascending; the first is the
            group's reference.
        max_similarity, min_similarity: over all pairs of members (1.0 for exact copies).
        similarity_to_first: ``len(members)`` cosine similarities to ``members[0]``.
        exact: per member, whether another member has the same bytes.
    """

    members: list[int]
    max_similarity: float
    min_similarity: float
    similarity_to_first: list[float]
    exact: list[bool] = field(default_factory=list)

    def to_dict(self, names: list[str] | None = None) -> dict[str, Any]:
        rows = [{"index": member, "similarity": round(similarity, 6), "exact": exact}
                for member, similarity, exact in zip(self.members, self.similarity_to_first, self.exact)]
        if names is not None:
            for row in rows:
                row["path"] = names[row["index"]]
        return {"size": len(self.members), "max_similarity": round(self.max_similarity, 6),
                "min_similarity": round(self.min_similarity, 6), "members": rows}


# ---------------------------------------------------------------------------------------------
# Exact duplicates


def file_digest(path: str | Path, block: int = READ_BYTES) -> str:
    """SHA-256 of a file's contents, read ``block`` bytes at a time (memory stays flat)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def find_exact_duplicates(paths: list[str]) -> tuple[list[list[int]], list[tuple[str, str]]]:
    """Groups of files with identical contents.

    Only files whose size another file shares are hashed. Empty files are never grouped (they are
    unreadable as images, not copies of each other).

    Returns:
        ``(groups, skipped)``: each group the ascending positions of identical files (two or
        more), groups ordered by their first position; ``skipped`` the ``(path, reason)`` of files
        that could not be read.
    """
    by_size: dict[int, list[int]] = defaultdict(list)
    skipped: list[tuple[str, str]] = []
    for position, path in enumerate(paths):
        try:
            size = os.stat(path).st_size
        except OSError as error:
            skipped.append((path, f"{type(error).__name__}: {error.strerror or error}"))
            continue
        if size == 0:
            skipped.append((path, "empty file (0 bytes)"))
            continue
        by_size[size].append(position)
    by_digest: dict[str, list[int]] = defaultdict(list)
    for positions in by_size.values():
        if len(positions) < 2:
            continue
        for position in positions:
            try:
                by_digest[file_digest(paths[position])].append(position)
            except OSError as error:
                skipped.append((paths[position], f"{type(error).__name__}: {error.strerror or error}"))
    groups = sorted(sorted(group) for group in by_digest.values() if len(group) > 1)
    return groups, skipped


# ---------------------------------------------------------------------------------------------
# Near duplicates


def normalised(features: np.ndarray, rows: int = QUERY_ROWS) -> np.ndarray:
    """``(N, D)`` features -> float32 copy with unit rows (a zero row stays zero); the input
    may be a read-only memory map and is never written."""
    features = np.asarray(features)
    if features.ndim != 2:
        raise DuplicateError(f"features must be a 2-D array (images x dims), got shape {features.shape}")
    out = np.empty(features.shape, dtype=np.float32)
    for start in range(0, len(features), rows):
        chunk = np.asarray(features[start : start + rows], dtype=np.float32)
        norms = np.linalg.norm(chunk, axis=1, keepdims=True)
        out[start : start + rows] = chunk / np.maximum(norms, 1e-12)
    return out


def check_threshold(threshold: float) -> float:
    """``threshold`` as a float in (0, 1], else ``DuplicateError``."""
    if not (isinstance(threshold, (int, float)) and 0 < threshold <= 1):
        raise DuplicateError(f"threshold must be in (0, 1] (a cosine similarity), got {threshold}")
    return float(threshold)


def _flat_index(unit: np.ndarray):
    import faiss

    index = faiss.IndexFlatIP(unit.shape[1])
    index.add(unit)
    return index


def near_duplicate_pairs(features: np.ndarray, threshold: float = DEFAULT_THRESHOLD,
                         query_rows: int = QUERY_ROWS, max_pairs: int = MAX_PAIRS
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs ``i < j`` with cosine similarity >= ``threshold``.

    Args:
        features: ``(N, D)`` embeddings (normalised here).
        query_rows: queries per faiss range search.
        max_pairs: stop with ``DuplicateError`` past this many pairs.

    Returns:
        ``(first, second, similarity)``: ``(P,)`` int64, int64, float32, sorted by ``(first, second)``.
    """
    threshold = check_threshold(threshold)
    unit = normalised(features)
    index = _flat_index(unit)
    # faiss keeps inner products strictly above the radius; a hair lower, then >= exactly here.
    radius = np.float32(threshold) - np.float32(1e-6)
    firsts, seconds, similarities, total = [], [], [], 0
    for start in range(0, len(unit), query_rows):
        limits, values, found = index.range_search(unit[start : start + query_rows], float(radius))
        queries = start + np.repeat(np.arange(len(limits) - 1), np.diff(limits).astype(np.int64))
        keep = (found > queries) & (values >= np.float32(threshold))
        firsts.append(queries[keep]), seconds.append(found[keep].astype(np.int64)), similarities.append(values[keep])
        total += int(keep.sum())
        if total > max_pairs:
            raise DuplicateError(f"more than {max_pairs} pairs are above similarity {threshold}: the threshold "
                                 "joins unrelated images with these embeddings; raise it")
    if not firsts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    first, second, similarity = np.concatenate(firsts), np.concatenate(seconds), np.concatenate(similarities)
    order = np.lexsort((second, first))
    return first[order], second[order], similarity[order].astype(np.float32)


def connected_groups(count: int, edges: Iterable[tuple[int, int]]) -> list[list[int]]:
    """Union-find (path halving, union by size): groups of two or more positions, each ascending,
    ordered by their first position."""
    parent = list(range(count))
    size = [1] * count

    def root(node: int) -> int:
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for a, b in edges:
        ra, rb = root(int(a)), root(int(b))
        if ra == rb:
            continue
        if size[ra] < size[rb]:
            ra, rb = rb, ra
        parent[rb], size[ra] = ra, size[ra] + size[rb]
    members: dict[int, list[int]] = defaultdict(list)
    for node in range(count):
        if size[root(node)] > 1:
            members[root(node)].append(node)
    return sorted(members.values())


def _group_stats(unit: np.ndarray, members: list[int], block: int = 2048) -> tuple[float, float, np.ndarray]:
    """``(max, min)`` pairwise similarity of the members and their similarity to the first one."""
    rows = unit[members]
    to_first = rows @ rows[0]
    high, low = -np.inf, np.inf
    for start in range(0, len(rows), block):
        block_sims = rows[start : start + block] @ rows.T
        upper = np.triu(np.ones(block_sims.shape, dtype=bool), k=start + 1)
        if upper.any():
            high, low = max(high, float(block_sims[upper].max())), min(low, float(block_sims[upper].min()))
    return high, low, to_first


def find_near_duplicates(features: np.ndarray, threshold: float = DEFAULT_THRESHOLD,
                         exact_groups: list[list[int]] = (), query_rows: int = QUERY_ROWS,
                         max_pairs: int = MAX_PAIRS) -> list[DuplicateGroup]:
    """Groups of near-duplicate images, largest first, then most similar.

    Args:
        features: ``(N, D)`` embeddings of the images.
        threshold: cosine similarity from which two images are duplicates.
        exact_groups: groups of byte-identical images (``find_exact_duplicates``), joined into
            the groups and marked ``exact``.

    Returns:
        ``DuplicateGroup`` list, sorted by size (descending), then max and min similarity.
    """
    first, second, _ = near_duplicate_pairs(features, threshold, query_rows, max_pairs)
    edges = list(zip(first.tolist(), second.tolist()))
    edges += [(group[0], member) for group in exact_groups for member in group[1:]]
    return describe_groups(normalised(features), connected_groups(len(features), edges), exact_groups)


def describe_groups(unit: np.ndarray | None, groups: list[list[int]],
                    exact_groups: list[list[int]] = ()) -> list[DuplicateGroup]:
    """``DuplicateGroup`` of each group, sorted; without features (``unit`` None, exact search
    only) every similarity is 1.0."""
    exact_members = {member for group in exact_groups for member in group}
    described = []
    for members in groups:
        if unit is None:
            high, low, to_first = 1.0, 1.0, np.ones(len(members))
        else:
            high, low, to_first = _group_stats(unit, members)
        described.append(DuplicateGroup(members, high, low, [float(value) for value in to_first],
                                        [member in exact_members for member in members]))
    described.sort(key=lambda group: (-len(group.members), -group.max_similarity, -group.min_similarity,
                                      group.members[0]))
    return described


# ---------------------------------------------------------------------------------------------
# Leaks between a training and a test set


@dataclass
class LeakReport:
    """Test images with a near duplicate in the training set.

    Attributes:
        count: test images whose most similar training image has similarity >= ``threshold``.
        fraction: ``count / n_test``.
        pairs: ``(test index, train index, similarity)`` of each such test image and its most
            similar training image, most similar first.
    """

    count: int
    fraction: float
    pairs: list[tuple[int, int, float]]
    threshold: float
    n_test: int
    n_train: int

    def to_dict(self, max_pairs: int | None = 1000) -> dict[str, Any]:
        """Plain values for ``results.json``; at most ``max_pairs`` pairs listed (None: all)."""
        listed = self.pairs if max_pairs is None else self.pairs[:max_pairs]
        return {"count": self.count, "fraction": self.fraction, "threshold": self.threshold,
                "n_test": self.n_test, "n_train": self.n_train, "pairs_listed": len(listed),
                "pairs": [{"test": test, "train": train, "similarity": round(similarity, 6)}
                          for test, train, similarity in listed]}


def find_leaks(train_features: np.ndarray, test_features: np.ndarray,
               threshold: float = DEFAULT_THRESHOLD, query_rows: int = QUERY_ROWS) -> LeakReport:
    """How many test images have a near duplicate (cosine >= ``threshold``) among the training images.

    Exact search: each test image's most similar training image (faiss ``IndexFlatIP``, k=1,
    queries in blocks); memory is the normalised training features plus one block.

    Args:
        train_features: ``(N_train, D)`` embeddings (a read-only memory map is fine).
        test_features: ``(N_test, D)`` embeddings of the same backbone.
    """
    threshold = check_threshold(threshold)
    train_unit, test_unit = normalised(train_features), normalised(test_features)
    if len(train_unit) and len(test_unit) and train_unit.shape[1] != test_unit.shape[1]:
        raise DuplicateError(f"train features have {train_unit.shape[1]} dimensions, test features "
                             f"{test_unit.shape[1]}: not from the same backbone")
    if len(train_unit) == 0 or len(test_unit) == 0:
        return LeakReport(0, 0.0, [], threshold, len(test_unit), len(train_unit))
    index = _flat_index(train_unit)
    best_similarity = np.empty(len(test_unit), dtype=np.float32)
    best_train = np.empty(len(test_unit), dtype=np.int64)
    for start in range(0, len(test_unit), query_rows):
        similarities, found = index.search(test_unit[start : start + query_rows], 1)
        best_similarity[start : start + len(found)], best_train[start : start + len(found)] = similarities[:, 0], found[:, 0]
    leaked = np.flatnonzero(best_similarity >= np.float32(threshold))
    leaked = leaked[np.argsort(-best_similarity[leaked], kind="stable")]
    pairs = [(int(test), int(best_train[test]), float(best_similarity[test])) for test in leaked]
    return LeakReport(len(pairs), len(pairs) / len(test_unit), pairs, threshold, len(test_unit), len(train_unit))
