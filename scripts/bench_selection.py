"""Which images to label: TypiClust / k-center / random selection at a few labels, scored by a linear classifier.

    nice -n 10 python scripts/bench_selection.py --checkpoint /tmp/avx2_15 \\
        --train /tmp/scratch/cifar10/train --test /tmp/scratch/cifar10/test

Embeds train and test once with the checkpoint's eval transform (timed); for every budget and
seed, each strategy picks that many training images from the embeddings alone (timed), then
logistic regression (scikit-learn, standardised features, fixed C=1.0: with 10 labels there is
nothing to validate on) learns from their labels and is scored once on the whole test set.
Prints a Markdown table: mean ± std top-1 over seeds, and the difference to random.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
import warnings
from datetime import date

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from linear_probe.embeddings import extract_embeddings
from linear_probe.evaluate import decoded_in_memory
from ssl_curate.selection import select
from ssl_pretrain.checkpoint import load_backbone
from ssl_pretrain.data import open_source
from ssl_pretrain.augment.transforms import build_eval_transform


def cpu_model() -> str:
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or platform.machine()


def embed(checkpoint: str, spec: str):
    backbone, info = load_backbone(checkpoint)
    transform = build_eval_transform(info.input_size, info.mean, info.std)
    source = decoded_in_memory(open_source(spec, labelled=True))
    embeddings = extract_embeddings(backbone, source, transform, batch_size=512, progress=False)
    features = embeddings.features / np.linalg.norm(embeddings.features, axis=1, keepdims=True).clip(1e-12)
    return features.astype(np.float32), embeddings.labels


def logreg_top1(train_x, train_y, test_x, test_y) -> float:
    if len(np.unique(train_y)) < 2:
        return float(np.mean(test_y == train_y[0]))
    scaler = StandardScaler().fit(train_x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = LogisticRegression(C=1.0, max_iter=1000).fit(scaler.transform(train_x), train_y)
    return float(np.mean(model.predict(scaler.transform(test_x)) == test_y))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--train", required=True)
    parser.add_argument("--test", required=True)
    parser.add_argument("--budgets", default="10,20,50,100")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--strategies", default="typiclust,kcenter,random")
    args = parser.parse_args(argv)
    budgets = [int(b) for b in args.budgets.split(",")]
    strategies = args.strategies.split(",")
    started = time.perf_counter()
    train_x, train_y = embed(args.checkpoint, args.train)
    embed_train = time.perf_counter() - started
    test_x, test_y = embed(args.checkpoint, args.test)
    embed_all = time.perf_counter() - started
    scores = {(s, b): [] for s in strategies for b in budgets}
    seconds = {(s, b): [] for s in strategies for b in budgets}
    classes = {(s, b): [] for s in strategies for b in budgets}
    for budget in budgets:
        for seed in range(args.seeds):
            for strategy in strategies:
                tic = time.perf_counter()
                chosen = select(train_x, budget, strategy, seed).indices
                seconds[(strategy, budget)].append(time.perf_counter() - tic)
                classes[(strategy, budget)].append(len(np.unique(train_y[chosen])))
                scores[(strategy, budget)].append(logreg_top1(train_x[chosen], train_y[chosen], test_x, test_y))
    print(f"\n{date.today()} | {cpu_model()}, torch {torch.__version__}, python {platform.python_version()}")
    print(f"command: {' '.join(['python'] + sys.argv)}")
    print(f"embeddings: {len(train_x):,} train images in {embed_train:.1f} s, + {len(test_x):,} test "
          f"in {embed_all - embed_train:.1f} s ({train_x.shape[1]}-d)")
    print("classifier: scikit-learn LogisticRegression, standardised features, fixed C=1.0 (no validation)\n")
    print("| labels | " + " | ".join(f"{s} top-1 (%)" for s in strategies) + " | "
          + " | ".join(f"{s} − random" for s in strategies if s != "random")
          + " | classes covered (" + ", ".join(strategies) + ") | select s (" + ", ".join(strategies) + ") |")
    print("| ---: " * (1 + 2 * len(strategies) - 1 + 2) + "|")
    for budget in budgets:
        cells = [f"{100 * np.mean(scores[(s, budget)]):.1f} ± {100 * np.std(scores[(s, budget)]):.1f}" for s in strategies]
        gaps = [f"{100 * (np.mean(scores[(s, budget)]) - np.mean(scores[('random', budget)])):+.1f}"
                for s in strategies if s != "random"] if "random" in strategies else []
        covered = ", ".join(f"{np.mean(classes[(s, budget)]):.1f}" for s in strategies)
        timing = ", ".join(f"{np.mean(seconds[(s, budget)]):.2f}" for s in strategies)
        print(f"| {budget} | " + " | ".join(cells + gaps) + f" | {covered} | {timing} |")
    print(f"\nmean ± std over seeds 0..{args.seeds - 1}; time to embed {len(train_x):,} images + select 100 "
          f"with typiclust: {embed_train + np.mean(seconds.get(('typiclust', budgets[-1]), [0])):.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
