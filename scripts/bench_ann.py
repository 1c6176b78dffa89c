#!/usr/bin/env python
"""Approximate kNN at scale: exact flat search against faiss IVF (and HNSW) on memory-mapped features.

    python scripts/bench_ann.py                       # 1,000,000 x 512 float32 (2 GB on disk), 10,000 queries
    python scripts/bench_ann.py --n 100000 --hnsw-n 100000

Synthetic clustered embeddings (``--clusters`` isotropic Gaussian clusters, points at distance
``--spread`` x the centres' scale) are generated in chunks straight into a ``.npy`` and read back
through ``linear_probe.embeddings.load_embeddings``, i.e. as a read-only memory map, the way the
evaluation reads a large cache. The indexes are the ones the evaluation builds
(``linear_probe.knn.build_index``). Exact search (``IndexFlatIP``) gives the reference neighbours;
recall@k is the share of them an approximate index finds (recall@20 is read off the first 20 of
the k=200 answers). HNSW builds slowly on few cores, so it runs on the first ``--hnsw-n`` features
only (0: skip), against its own exact reference. Prints a Markdown table.
"""

from __future__ import annotations

import resource
import sys
import tempfile
from pathlib import Path

import faiss
import numpy as np

from linear_probe.embeddings import load_embeddings
from linear_probe.knn import build_index, recall_at_k

import benchmarking


def write_clustered(path: Path, count: int, dim: int, centres: np.ndarray, spread: float, seed: int,
                    chunk: int = 50_000) -> None:
    """``count`` points around random ``centres``, written to a ``.npy`` a chunk at a time."""
    rng = np.random.default_rng(seed)
    features = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(count, dim))
    for start in range(0, count, chunk):
        size = min(chunk, count - start)
        members = rng.integers(0, len(centres), size)
        features[start : start + size] = centres[members] + spread * rng.standard_normal((size, dim), np.float32)
    features.flush()
    del features


def timed_search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """The neighbours' indices and the seconds the search took."""
    (_, found), seconds = benchmarking.timed(index.search, queries, k)
    return found, seconds


def row(name: str, count: int, build: float, search: float, queries: int, found: np.ndarray | None,
        exact: np.ndarray | None) -> str:
    recalls = ["1.000 (reference)"] * 2 if found is None else [
        f"{recall_at_k(found[:, :k], exact[:, :k]):.3f}" for k in (exact.shape[1], 20)]
    return benchmarking.table_row(name, f"{count:,}", f"{build:.1f}", f"{search:.1f}",
                                  f"{1000 * search / queries:.2f}", *recalls)


def main(argv: list[str] | None = None) -> int:
    parser = benchmarking.argument_parser(__doc__)
    parser.add_argument("--n", type=int, default=1_000_000, help="training features")
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--spread", type=float, default=1.0, help="noise scale relative to the centres' (1.0)")
    parser.add_argument("--k", type=int, default=200)
    parser.add_argument("--nprobe", default="16,64,128", help="IVF lists scanned per query, comma-separated")
    parser.add_argument("--hnsw-n", type=int, default=100_000, help="HNSW on the first N features (0: skip)")
    parser.add_argument("--dir", help="where the .npy goes (default: a temporary folder, removed afterwards)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(benchmarking.header(__file__, argv, f"faiss {faiss.__version__} ({faiss.omp_get_max_threads()} threads)")
          + "\n", flush=True)

    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        path = Path(folder) / "features.npy"
        centres = np.random.default_rng(args.seed).standard_normal((args.clusters, args.dim)).astype(np.float32)
        _, generate_seconds = benchmarking.timed(write_clustered, path, args.n, args.dim, centres, args.spread,
                                                 args.seed + 1)
        train = load_embeddings(path).features
        queries = np.random.default_rng(args.seed + 2).integers(0, args.clusters, args.queries)
        queries = centres[queries] + args.spread * np.random.default_rng(args.seed + 3).standard_normal(
            (args.queries, args.dim), np.float32)
        unit_queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
        print(f"{args.n:,} x {args.dim} float32 ({path.stat().st_size / 2**30:.2f} GiB) written in "
              f"{generate_seconds:.0f} s, read back as {type(train).__name__} (read-only: "
              f"{not train.flags.writeable}); {args.queries:,} queries, k={args.k}\n", flush=True)
        lines = benchmarking.table_header("index", "N", "build s", "search s", "ms / query", f"recall@{args.k}",
                                          "recall@20").splitlines()

        flat = build_index(train, "exact")
        exact, seconds = timed_search(flat, unit_queries, args.k)
        lines.append(row("exact (IndexFlatIP)", args.n, flat.build_seconds, seconds, args.queries, None, None))
        print(lines[-1], flush=True)
        del flat
        ivf = build_index(train, "ivf", seed=args.seed)
        name = f"IVF{ivf.settings['nlist']},Flat ({ivf.settings['train_points']:,} k-means points), nprobe %d"
        for nprobe in (int(value) for value in args.nprobe.split(",")):
            ivf.index.nprobe = nprobe
            found, seconds = timed_search(ivf, unit_queries, args.k)
            lines.append(row(name % nprobe, args.n, ivf.build_seconds, seconds, args.queries, found, exact))
            print(lines[-1], flush=True)
        del ivf
        if args.hnsw_n:
            subset = train[: args.hnsw_n]
            hnsw = build_index(subset, "hnsw")
            found, seconds = timed_search(hnsw, unit_queries, args.k)
            lines.append(row(f"HNSW{hnsw.settings['M']},Flat (efSearch {max(hnsw.settings['ef_search'], 2 * args.k)})",
                             len(subset), hnsw.build_seconds, seconds, args.queries, found,
                             build_index(subset, "exact").search(unit_queries, args.k)[1]))
            print(lines[-1], flush=True)
        del train
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print("\n" + "\n".join(lines) + f"\n\nPeak resident memory {peak_gb:.1f} GiB (an index holds its own copy of "
          "the normalised features; the memory map itself is not loaded).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
