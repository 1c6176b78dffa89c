"""The raw-pixel baseline at each size, side by side in one run: accuracy and seconds of kNN (all
labels) and logistic regression (10% of the labels, C chosen on a validation split) on pixels
resized to each size, as ``linear-probe`` extracts them (its eval transform, then flattened).

    python scripts/bench_pixels.py --train /tmp/scratch/cifar10/train --test /tmp/scratch/cifar10/test

The figures behind ``linear_probe.evaluate.PIXEL_SIZE_CAP``: the baseline should be as strong as
raw pixels can be, and not the slowest part of the evaluation. Prints a Markdown table with the
CPU, date and command.
"""

from __future__ import annotations

import numpy as np
from torch import nn

from linear_probe.embeddings import extract_embeddings
from ssl_pretrain.data.decoding import decoded_in_memory
from linear_probe.knn import evaluate_knn
from linear_probe.logreg import evaluate_logreg
from linear_probe.splits import stratified_split
from ssl_pretrain.data import open_source
from ssl_pretrain.augment.transforms import build_eval_transform

import benchmarking

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)


def pixels(source, size: int) -> tuple[np.ndarray, np.ndarray]:
    embeddings = extract_embeddings(nn.Flatten(), source, build_eval_transform(size, CIFAR_MEAN, CIFAR_STD),
                                    batch_size=512, device="cpu", num_workers=0, progress=False)
    return np.asarray(embeddings.features), embeddings.labels


def main(argv=None) -> int:
    parser = benchmarking.argument_parser(__doc__)
    parser.add_argument("--train", required=True, help="labelled training images (class subfolders)")
    parser.add_argument("--test", required=True, help="labelled test images")
    parser.add_argument("--sizes", default="32,16,8", help="pixel sizes to compare")
    parser.add_argument("--fraction", type=float, default=0.1, help="labelled share of the pool for logistic regression")
    args = parser.parse_args(argv)
    train_source = decoded_in_memory(open_source(args.train, labelled=True))
    test_source = decoded_in_memory(open_source(args.test, labelled=True))
    num_classes = len(train_source.classes)
    print("\n" + benchmarking.header(__file__, argv) + "\n")
    print(benchmarking.table_header("pixels", "values", "kNN top-1 (all labels)", "kNN s",
                                    f"logreg top-1 ({args.fraction:.0%} labels)", "logreg s", "chosen C"))
    for size in (int(value) for value in args.sizes.split(",")):
        train_x, train_y = pixels(train_source, size)
        test_x, test_y = pixels(test_source, size)
        pool, val = stratified_split(train_y, 0.1, 1, "validation")
        labelled, _ = stratified_split(train_y[pool], 1 - args.fraction, 0, "labelled")
        labelled = pool[labelled]
        knn, knn_seconds = benchmarking.timed(evaluate_knn, train_x[pool], train_y[pool], test_x, test_y, num_classes,
                                              k=200, temperature=0.1)
        logreg, logreg_seconds = benchmarking.timed(evaluate_logreg, train_x[labelled], train_y[labelled],
                                                    train_x[val], train_y[val], test_x, test_y, num_classes)
        print(benchmarking.table_row(f"{size} px", f"{train_x.shape[1]:,}", f"{100 * knn.top1:.2f}%",
                                     f"{knn_seconds:.1f}", f"{100 * logreg.top1:.2f}%", f"{logreg_seconds:.1f}",
                                     f"{logreg.chosen['C']:g}"), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
