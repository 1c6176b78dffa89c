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

import platform
import sys
import warnings

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from linear_probe.embeddings import extract_embeddings
from ssl_pretrain.data.decoding import decoded_in_memory
from ssl_curate.selection import select
from ssl_pretrain.checkpoint import load_backbone
from ssl_pretrain.data import open_source
from ssl_pretrain.augment.transforms import build_eval_transform

import benchmarking


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
    parser = benchmarking.argument_parser(__doc__)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--train", required=True)
    parser.add_argument("--test", required=True)
    parser.add_argument("--budgets", default="10,20,50,100")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--strategies", default="typiclust,kcenter,random")
    args = parser.parse_args(argv)
    budgets = [int(b) for b in args.budgets.split(",")]
    strategies = args.strategies.split(",")
    (train_x, train_y), embed_train = benchmarking.timed(embed, args.checkpoint, args.train)
    (test_x, test_y), embed_test = benchmarking.timed(embed, args.checkpoint, args.test)
    scores = {(s, b): [] for s in strategies for b in budgets}
    seconds = {(s, b): [] for s in strategies for b in budgets}
    classes = {(s, b): [] for s in strategies for b in budgets}
    for budget in budgets:
        for seed in range(args.seeds):
            for strategy in strategies:
                selection, select_seconds = benchmarking.timed(select, train_x, budget, strategy, seed)
                chosen = selection.indices
                seconds[(strategy, budget)].append(select_seconds)
                classes[(strategy, budget)].append(len(np.unique(train_y[chosen])))
                scores[(strategy, budget)].append(logreg_top1(train_x[chosen], train_y[chosen], test_x, test_y))
    print("\n" + benchmarking.header(__file__, argv, f"Python {platform.python_version()}"))
    print(f"embeddings: {len(train_x):,} train images in {embed_train:.1f} s, + {len(test_x):,} test "
          f"in {embed_test:.1f} s ({train_x.shape[1]}-d)")
    print("classifier: scikit-learn LogisticRegression, standardised features, fixed C=1.0 (no validation)\n")
    gap_columns = [f"{s} − random" for s in strategies if s != "random"] if "random" in strategies else []
    print(benchmarking.table_header("labels", *(f"{s} top-1 (%)" for s in strategies), *gap_columns,
                                    f"classes covered ({', '.join(strategies)})",
                                    f"select s ({', '.join(strategies)})", left=0))
    for budget in budgets:
        cells = [f"{100 * np.mean(scores[(s, budget)]):.1f} ± {100 * np.std(scores[(s, budget)]):.1f}" for s in strategies]
        gaps = [f"{100 * (np.mean(scores[(s, budget)]) - np.mean(scores[('random', budget)])):+.1f}"
                for s in strategies if s != "random"] if "random" in strategies else []
        covered = ", ".join(f"{np.mean(classes[(s, budget)]):.1f}" for s in strategies)
        timing = ", ".join(f"{np.mean(seconds[(s, budget)]):.2f}" for s in strategies)
        print(benchmarking.table_row(budget, *cells, *gaps, covered, timing))
    print(f"\nmean ± std over seeds 0..{args.seeds - 1}; time to embed {len(train_x):,} images + select 100 "
          f"with typiclust: {embed_train + np.mean(seconds.get(('typiclust', budgets[-1]), [0])):.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
