"""How long finding the images takes, with and without the file index (and for tar shards).

    python scripts/bench_file_index.py                       # 100,000 files in 1,000 folders
    python scripts/bench_file_index.py --files 1000000 --dir /data/scratch

Writes N placeholder ``.jpg`` files (a few bytes: finding files never decodes them) into
class-like folders, then times ``open_source`` on the folder: without an index, the first open
with one (scan and write), and a later open (a stat per folder, then reading the index). Then the
same for WebDataset tar shards holding as many samples: indexing the headers, and a cached open.

The operating system's page cache is *not* dropped (that needs root and slows every other
process on the machine): the files were just written, so "cold" here means no index, with the
directory entries in memory. On a cold network disk the walk is slower, and the index's gain larger.
Prints a Markdown table.
"""

from __future__ import annotations

import io
import os
import platform
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from ssl_pretrain.data import open_source

import benchmarking


def write_files(root: Path, files: int, folders: int) -> None:
    """``files`` placeholder images spread over ``folders`` class folders."""
    for folder in range(folders):
        (root / f"class{folder:04d}").mkdir(parents=True)
    for index in range(files):
        path = root / f"class{index % folders:04d}" / f"image{index:07d}.jpg"
        descriptor = os.open(path, os.O_CREAT | os.O_WRONLY, 0o644)
        os.write(descriptor, b"\xff\xd8placeholder")
        os.close(descriptor)


def write_shards(root: Path, samples: int, shards: int) -> str:
    """WebDataset shards ``root/train-{000000..}.tar``: a placeholder ``.jpg`` and a ``.cls`` per
    sample. Returns the brace pattern naming them."""
    root.mkdir(parents=True)
    per_shard = -(-samples // shards)
    for shard in range(shards):
        with tarfile.open(root / f"train-{shard:06d}.tar", "w") as archive:
            for index in range(shard * per_shard, min(samples, (shard + 1) * per_shard)):
                for extension, data in (("jpg", b"\xff\xd8placeholder"), ("cls", str(index % 1000).encode())):
                    info = tarfile.TarInfo(f"sample{index:08d}.{extension}")
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
    return str(root / f"train-{{000000..{shards - 1:06d}}}.tar")


def age(root: Path) -> None:
    """Date everything an hour back, as for data written well before training (entries changed
    within seconds of a scan are not trusted by the index)."""
    past = time.time() - 3600
    for folder, _, names in os.walk(root):
        os.utime(folder, (past, past))
        for name in names:
            if name.endswith(".tar"):
                os.utime(os.path.join(folder, name), (past, past))


def timed(function) -> tuple[float, int]:
    """``(seconds, images found)`` of one ``open_source`` call."""
    found, seconds = benchmarking.timed(function)
    return seconds, len(found)


def main(argv=None) -> int:
    parser = benchmarking.argument_parser(__doc__)
    parser.add_argument("--files", type=int, default=100_000, help="images to write and find")
    parser.add_argument("--folders", type=int, default=1_000, help="class folders they are spread over")
    parser.add_argument("--shard-samples", type=int, default=100_000, help="samples in tar shards (0: skip)")
    parser.add_argument("--shards", type=int, default=10)
    parser.add_argument("--dir", default=None, help="where to write them (default: a temporary folder)")
    args = parser.parse_args(argv)

    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench_file_index.") as scratch:
        scratch = Path(scratch)
        with benchmarking.Stopwatch() as writing:
            write_files(scratch / "images", args.files, args.folders)
            pattern = write_shards(scratch / "shards", args.shard_samples, args.shards) if args.shard_samples else ""
            age(scratch)
        images, index = str(scratch / "images"), scratch / "run" / "file_index.txt"
        rows.append((f"folder, {args.files:,} files in {args.folders:,} folders", "scan, no index",
                     *timed(lambda: open_source(images))))
        rows.append(("", "first open: scan + write index", *timed(lambda: open_source(images, index_cache=index))))
        rows.append(("", f"cached open ({index.stat().st_size / 1e6:.1f} MB index)",
                     *timed(lambda: open_source(images, index_cache=index))))
        if pattern:
            shard_index = scratch / "run" / "shard_index.txt"
            where = f"{args.shards} tar shards, {args.shard_samples:,} samples"
            rows.append((where, "index headers, no cache", *timed(lambda: open_source(pattern))))
            rows.append(("", "first open: index + write", *timed(lambda: open_source(pattern, index_cache=shard_index))))
            rows.append(("", f"cached open ({shard_index.stat().st_size / 1e6:.1f} MB index)",
                         *timed(lambda: open_source(pattern, index_cache=shard_index))))

    print("\n" + benchmarking.header(__file__, argv, f"Python {platform.python_version()}",
                                     f"writing the data took {writing.seconds:.1f} s; page cache warm (not dropped)")
          + "\n")
    print(benchmarking.table_header("data", "step", "seconds", "images found", left=2))
    for data, step, seconds, count in rows:
        print(benchmarking.table_row(data, step, f"{seconds:.3f}", f"{count:,}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
