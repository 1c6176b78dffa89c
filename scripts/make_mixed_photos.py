"""A messy photo folder from a labelled image folder: the stand-in for "a folder of flower photos".

    python scripts/make_mixed_photos.py --src intel-scenes --out intel-mixed

Every image of ``SRC/{train,test}/<class>/`` is upscaled to a random width of 143-1,024 px with a
random aspect ratio (0.6-1.6), as camera and web photos of mixed sizes are; about 5% are saved as
grey JPEGs, 5% as PNG, 1% as RGBA PNG, the rest as RGB JPEG (quality 90). Each split also gets an
empty ``empty.jpg``, a ``truncated.jpg`` (the first 300 bytes of a JPEG) and a ``notes.txt`` in
its first class folder: files a real folder holds and the tools must skip with a count.
Deterministic (``--seed``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def make_mixed(src: Path, out: Path, seed: int = 0) -> dict[str, int]:
    rng = np.random.default_rng(seed)
    counts = {"jpeg": 0, "grey": 0, "png": 0, "rgba": 0, "bad": 0}
    for split in ("train", "test"):
        files = sorted(p for p in (src / split).rglob("*") if p.suffix.lower() in SUFFIXES)
        if not files:
            raise SystemExit(f"no images under {src / split}")
        for path in files:
            folder = out / split / path.parent.name
            folder.mkdir(parents=True, exist_ok=True)
            width = int(rng.integers(143, 1025))
            height = max(16, int(width / rng.uniform(0.6, 1.6)))
            image = Image.open(path).convert("RGB").resize((width, height), Image.BICUBIC)
            draw = rng.random()
            if draw < 0.05:
                image.convert("L").save(folder / f"{path.stem}.jpg", quality=90)
                counts["grey"] += 1
            elif draw < 0.10:
                image.save(folder / f"{path.stem}.png")
                counts["png"] += 1
            elif draw < 0.11:
                image.convert("RGBA").save(folder / f"{path.stem}.png")
                counts["rgba"] += 1
            else:
                image.save(folder / f"{path.stem}.jpg", quality=90)
                counts["jpeg"] += 1
        first = sorted(d for d in (out / split).iterdir() if d.is_dir())[0]
        (first / "empty.jpg").write_bytes(b"")
        (first / "truncated.jpg").write_bytes((first / next(
            p.name for p in sorted(first.iterdir()) if p.suffix == ".jpg" and p.stat().st_size > 300
        )).read_bytes()[:300])
        (first / "notes.txt").write_text("not an image\n")
        counts["bad"] += 3
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", type=Path, required=True, help="labelled folder with train/ and test/")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(make_mixed(args.src, args.out, args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
