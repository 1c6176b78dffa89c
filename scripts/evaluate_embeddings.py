#!/usr/bin/env python
"""Evaluate embeddings you bring, from any model, on the same protocol as ``linear-probe``.

    python scripts/evaluate_embeddings.py --train train.npz --test test.npz
    python scripts/evaluate_embeddings.py --train train_x.npy --train-labels train_y.npy \\
        --test test_x.npy --test-labels test_y.npy --label-fractions 0.01,0.1,1.0 --seeds 3

A ``.npz`` holds ``features`` (N, D) and ``labels`` (N,) (``linear-probe``'s cached files in
``OUT/embeddings/`` are such files); a ``.npy`` holds features only, with labels in a second
``.npy``. Weighted kNN (k=200, T=0.1 or DINO's k=20, T=0.07) and logistic regression with C
chosen on validation (``--val`` or a stratified part of train); the test set is scored once.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from linear_probe.embeddings import Embeddings, load_embeddings
from linear_probe.errors import EvaluationError
from linear_probe.knn import KNN_PROTOCOLS, evaluate_knn
from linear_probe.linear import evaluate_linear
from linear_probe.logreg import evaluate_logreg
from linear_probe.report import format_table, make_row, write_report
from linear_probe.splits import parse_label_budgets, sample_label_subset, stratified_split

PROG = "evaluate_embeddings"
METHODS = ("knn", "logreg", "linear")


def read_labelled(features_path: str, labels_path: str | None, role: str) -> Embeddings:
    """Features (and labels) of one split from ``.npz``, or ``.npy`` features + ``.npy`` labels.

    Raises:
        EvaluationError: unreadable files, missing labels, or lengths that differ (one line).
    """
    embeddings = load_embeddings(features_path)
    if labels_path is not None:
        try:
            labels = np.load(labels_path, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise EvaluationError(f"--{role}-labels {labels_path}: {str(error).splitlines()[0]}") from None
        if len(labels) != len(embeddings):
            raise EvaluationError(f"--{role} has {len(embeddings)} feature rows but --{role}-labels "
                                  f"has {len(labels)} labels")
        embeddings = Embeddings(embeddings.features, labels, embeddings.names, classes=embeddings.classes)
    if embeddings.labels is None:
        raise EvaluationError(f"--{role} {features_path} has no labels: add 'labels' to the .npz or give --{role}-labels")
    if embeddings.labels.min() < 0:
        raise EvaluationError(f"--{role} labels must be class numbers 0, 1, 2... (found {embeddings.labels.min()})")
    return Embeddings(embeddings.features, embeddings.labels, embeddings.names, classes=embeddings.classes)


def check_compatible(train: Embeddings, others: dict[str, Embeddings]) -> None:
    for role, embeddings in others.items():
        if embeddings.features.shape[1] != train.features.shape[1]:
            raise EvaluationError(f"--{role} features have {embeddings.features.shape[1]} dimensions, "
                                  f"--train features {train.features.shape[1]}")
        unseen = sorted(set(embeddings.labels.tolist()) - set(train.labels.tolist()))
        if unseen:
            raise EvaluationError(f"--{role} has classes missing from --train: {', '.join(map(str, unseen[:8]))}")


def run_method(method: str, train: Embeddings, val: Embeddings, test: Embeddings, num_classes: int,
               args: argparse.Namespace, seed: int):
    if method == "knn":
        protocol = KNN_PROTOCOLS[args.knn_protocol]
        return evaluate_knn(train.features, train.labels, test.features, test.labels, num_classes,
                            k=args.knn_k or protocol.k, temperature=args.knn_t or protocol.temperature)
    if method == "logreg":
        return evaluate_logreg(train.features, train.labels, val.features, val.labels, test.features,
                               test.labels, num_classes, seed=seed)
    return evaluate_linear(train.features, train.labels, val.features, val.labels, test.features,
                           test.labels, num_classes, epochs=args.linear_epochs, seed=seed)


def subset(embeddings: Embeddings, rows: np.ndarray) -> Embeddings:
    return Embeddings(embeddings.features[rows], embeddings.labels[rows], [embeddings.names[row] for row in rows])


def evaluate_user_embeddings(args: argparse.Namespace) -> list[dict]:
    """Every (label budget, seed, method) on the given embeddings; one row each."""
    methods = tuple(method.strip() for method in args.methods.split(",") if method.strip())
    if not methods or set(methods) - set(METHODS):
        raise EvaluationError(f"--methods takes {', '.join(METHODS)}, got '{args.methods}'")
    train, test = read_labelled(args.train, args.train_labels, "train"), read_labelled(args.test, args.test_labels, "test")
    val = read_labelled(args.val, args.val_labels, "val") if args.val else None
    check_compatible(train, {"test": test, **({"val": val} if val is not None else {})})
    if val is None and set(methods) - {"knn"}:
        kept, held_out = stratified_split(train.labels, args.val_fraction, seed=1, what="validation")
        train, val = subset(train, kept), subset(train, held_out)
    num_classes = int(max(train.labels.max(), test.labels.max())) + 1
    rows = []
    for budget in parse_label_budgets(args.label_fractions):
        for seed in range(args.seeds):
            labelled = subset(train, sample_label_subset(train.labels, budget, seed))
            for method in methods:
                start = time.perf_counter()
                result = run_method(method, labelled, val, test, num_classes, args, seed)
                rows.append(make_row("embeddings", method, budget, seed, result, len(labelled), len(train),
                                     time.perf_counter() - start))
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0].strip())
    for role, need in (("train", True), ("test", True), ("val", False)):
        parser.add_argument(f"--{role}", required=need, help=f"{role} features: .npz (features, labels) or .npy")
        parser.add_argument(f"--{role}-labels", help=f"{role} labels as .npy, when --{role} is a .npy of features")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="without --val: stratified share of train "
                        "held out to choose logistic regression's C (default 0.1)")
    parser.add_argument("--methods", default="knn,logreg", help=f"comma-separated, from {', '.join(METHODS)}")
    parser.add_argument("--label-fractions", default="1.0", help="fractions of each class, or Npc for N per class")
    parser.add_argument("--seeds", type=int, default=1, help="label subsets per budget (default 1)")
    parser.add_argument("--knn-protocol", choices=sorted(KNN_PROTOCOLS), default="instdisc",
                        help="instdisc: k=200, T=0.1; dino: k=20, T=0.07")
    parser.add_argument("--knn-k", type=int, help="overrides the protocol's k")
    parser.add_argument("--knn-t", type=float, help="overrides the protocol's temperature")
    parser.add_argument("--linear-epochs", type=int, default=100, help="budget of the linear probe (default 100)")
    parser.add_argument("--out", help="folder for results.json and results.md")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.seeds < 1 or (args.knn_k is not None and args.knn_k < 1):
            raise EvaluationError("--seeds and --knn-k must be at least 1")
        rows = evaluate_user_embeddings(args)
    except EvaluationError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    if args.out:
        meta = {"data": {"train": args.train, "test": args.test, "val": args.val or f"{args.val_fraction} of train"}}
        write_report(Path(args.out), rows, meta)
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
