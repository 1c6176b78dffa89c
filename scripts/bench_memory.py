"""Peak memory of a pretraining epoch against the number of images, for both data pipelines.

    python scripts/bench_memory.py --data /tmp/cifar10/train --config configs/cifar10_cpu.yaml \\
        --images 10000,50000

Runs one epoch of ``ssl-pretrain`` per (pipeline, image count) in a fresh process, with no
data-loader workers so that one process holds everything, and reads that process's peak
resident set size from the kernel (``os.wait4``). Prints a Markdown table. The streaming PIL
pipeline should be flat in the number of images; the in-memory tensor pipeline holds the decoded
images (N x H x W x 3 bytes) on purpose, and nothing else should grow.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import benchmarking



def peak_rss_mb(command: list[str]) -> tuple[float, float, int]:
    """``(peak RSS in MB, seconds, exit status)`` of one child process."""
    with benchmarking.Stopwatch() as watch:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""
    if process.returncode:
        print(stderr[-2000:], file=sys.stderr)
    return usage.ru_maxrss / 1024, watch.seconds, process.returncode


def main(argv=None) -> int:
    parser = benchmarking.argument_parser(__doc__)
    parser.add_argument("--data", required=True)
    parser.add_argument("--config", default="configs/cifar10_cpu.yaml")
    parser.add_argument("--images", default="10000,50000", help="comma-separated image counts")
    parser.add_argument("--pipelines", default="tensor,pil")
    parser.add_argument("--batch-size", type=int, default=256)
    benchmarking.add_settings(parser)
    args = parser.parse_args(argv)

    rows = []
    for pipeline in args.pipelines.split(","):
        for count in [int(value) for value in args.images.split(",")]:
            with tempfile.TemporaryDirectory() as out:
                command = [sys.executable, "-m", "ssl_pretrain", "--data", args.data, "--config", args.config,
                           "--epochs", "1", "--batch-size", str(args.batch_size), "--out", out, "--no-progress",
                           "--set", f"data.max_images={count}", "--set", f"data.pipeline={pipeline}",
                           "--set", "data.num_workers=0"]
                for override in args.overrides:
                    command += ["--set", override]
                rss, seconds, code = peak_rss_mb(command)
            rows.append((pipeline, count, rss, seconds, code))
            print(f"{pipeline} {count}: {rss:.0f} MB, {seconds:.0f} s, exit {code}", file=sys.stderr, flush=True)

    print("\n" + benchmarking.header(__file__, argv) + "\n")
    print(benchmarking.table_header("pipeline", "images", "peak RSS (MB)", "vs the fewest images", "seconds", "exit"))
    for pipeline, count, rss, seconds, code in rows:
        first = next(r for r in rows if r[0] == pipeline)
        print(benchmarking.table_row(pipeline, f"{count:,}", f"{rss:.0f}", f"{rss - first[2]:+.0f} MB", f"{seconds:.0f}",
                                     code))
    return 0 if all(row[4] == 0 for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
