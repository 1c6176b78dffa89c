"""Write scikit-learn's bundled digits as PNG files, to try the tools on real files offline.

    python scripts/digits_to_folder.py --split test --out digits-test            # digits-test/<class>/<n>.png
    python scripts/digits_to_folder.py --split test --out inbox --flat --csv inbox.csv

``--flat`` writes one folder of unlabelled images (what ``ssl-predict`` is pointed at);
``--csv FILE`` also writes ``path,label`` lines (``ssl-finetune --train FILE``; ``ssl-predict FILE``
then reports accuracy).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ssl_pretrain.data import digits_source


def write_digits(out: Path, split: str = "test", flat: bool = False, csv_file: Path | None = None,
                 size: int = 16) -> int:
    """Write the digits of ``split`` upscaled to ``size`` px; returns how many were written."""
    from PIL import Image

    source = digits_source(split)
    lines = ["path,label"]
    for index in range(len(source)):
        label = source.classes[source.labels[index]]
        folder = out if flat else out / label
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{index:04d}.png"
        source.load(index).resize((size, size), Image.BICUBIC).save(path)
        lines.append(f"{path.resolve()},{label}")
    if csv_file is not None:
        csv_file.write_text("\n".join(lines) + "\n")
    return len(source)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="folder to write")
    parser.add_argument("--split", choices=("train", "test", "all"), default="test")
    parser.add_argument("--flat", action="store_true", help="no class subfolders")
    parser.add_argument("--csv", type=Path, help="also write path,label lines here")
    parser.add_argument("--size", type=int, default=16, help="side in pixels (the 8x8 digits upscaled, bicubic)")
    args = parser.parse_args(argv)
    count = write_digits(args.out, args.split, args.flat, args.csv, args.size)
    print(f"{count} digits -> {args.out}" + (f", labels in {args.csv}" if args.csv else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
