"""kNN classification speed, side by side in one run, on the same random unit-norm features.

    python scripts/bench_knn.py                      # 50,000 x 10,000 queries, 512-d, k=200
    python scripts/bench_knn.py --train 5000 --queries 1000

Contenders: ``knn_classify`` (ours, the evaluation's default back-end: faiss on the CPU), a brute-force reference written
plainly in torch (one matrix product of all queries, ``topk``, weighted votes), faiss's flat
inner-product index, and scikit-learn's ``KNeighborsClassifier`` (brute force, cosine; its votes
are uniform, not exp(sim/T)-weighted, so its predictions may differ slightly). Each one's
top-1 predictions are compared with ours. Prints a Markdown table with ratios.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from linear_probe.knn import knn_classify, search_neighbours

import benchmarking


def torch_reference(train, labels, queries, classes, k, temperature):
    similarities, indices = (torch.from_numpy(queries) @ torch.from_numpy(train).T).topk(k, dim=1)
    weights = (similarities / temperature).exp()
    scores = torch.zeros(len(queries), classes)
    scores.scatter_add_(1, torch.from_numpy(labels)[indices], weights)
    return scores.numpy()


def faiss_flat(train, labels, queries, classes, k, temperature):
    similarities, indices = search_neighbours(train, queries, k, backend="faiss")
    weights = (similarities / temperature).exp()
    scores = torch.zeros(len(queries), classes)
    scores.scatter_add_(1, torch.from_numpy(labels)[indices], weights)
    return scores.numpy()


def sklearn_knn(train, labels, queries, classes, k, temperature):
    from sklearn.neighbors import KNeighborsClassifier

    model = KNeighborsClassifier(n_neighbors=k, algorithm="brute", metric="cosine", n_jobs=-1)
    return model.fit(train, labels).predict_proba(queries)


def main(argv=None) -> int:
    parser = benchmarking.argument_parser(__doc__)
    parser.add_argument("--train", type=int, default=50_000)
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--k", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.1)
    parser.add_argument("--skip-sklearn", action="store_true")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(args.classes, args.dim)).astype(np.float32)
    labels = rng.integers(0, args.classes, args.train)
    train = centres[labels] + 2.0 * rng.normal(size=(args.train, args.dim)).astype(np.float32)
    query_labels = rng.integers(0, args.classes, args.queries)
    queries = centres[query_labels] + 2.0 * rng.normal(size=(args.queries, args.dim)).astype(np.float32)
    train /= np.linalg.norm(train, axis=1, keepdims=True)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)

    contenders = {
        "ours (knn_classify)": lambda: knn_classify(train, labels, queries, args.classes, args.k, args.temperature),
        "torch brute force": lambda: torch_reference(train, labels, queries, args.classes, args.k, args.temperature),
        "faiss IndexFlatIP": lambda: faiss_flat(train, labels, queries, args.classes, args.k, args.temperature),
    }
    if not args.skip_sklearn:
        contenders["scikit-learn KNeighborsClassifier"] = lambda: sklearn_knn(
            train, labels, queries, args.classes, args.k, args.temperature)
    seconds, agreement = {}, {}
    reference = None
    for name, run in contenders.items():
        scores, seconds[name] = benchmarking.timed(run)
        predictions = scores.argmax(1)
        reference = predictions if reference is None else reference
        agreement[name] = float((predictions == reference).mean())

    ours = seconds["ours (knn_classify)"]
    print("\n" + benchmarking.header(__file__, argv, f"{args.train} x {args.queries} queries, {args.dim}-d, k={args.k}")
          + "\n")
    print(benchmarking.table_header("method", "seconds", "ours is faster by", "same top-1 as ours"))
    for name in contenders:
        print(benchmarking.table_row(name, f"{seconds[name]:.2f}", f"{seconds[name] / ours:.2f}x",
                                     f"{agreement[name]:.2%}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
