"""Memory over a long run: resident and peak memory after every epoch of a pretraining run.

    python scripts/memory_soak.py --epochs 30 --out runs/soak [--set data.pipeline=pil ...]

Runs ``ssl_pretrain.train.pretrain`` in this process on the built-in digits (tiny model) and
reads ``/proc/self/status`` each time an epoch's summary is written: ``VmRSS`` (now), ``VmHWM``
(peak so far), and for the data-loader workers their summed ``VmRSS`` and private memory (from
``smaps_rollup``). Prints one JSON object: ``{"epochs": [{"epoch", "rss_mb", "peak_mb",
"workers_mb", "workers_private_mb"}...], "growth_mb": {...}}``.
Linux only (``/proc``). Memory that grows with the epoch count (logs kept in memory, caches,
leaked workers) shows as a rising ``rss_mb``; the first epoch includes one-off allocations, so
growth is measured from epoch 2.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

TINY = ["data.source=builtin:digits:train", "data.max_images=512", "augment.input_size=16",
        "augment.min_scale=0.25", "model.backbone=smallconv", "simclr.hidden_dim=128",
        "simclr.output_dim=32", "optim.warmup_epochs=0", "train.batch_size=64", "train.threads=1",
        "train.log_every_steps=1", "data.num_workers=0"]

KEYS = ("rss_mb", "peak_mb", "workers_mb", "workers_private_mb")


def status_mb(pid: str = "self") -> dict[str, float]:
    """``VmRSS`` and ``VmHWM`` of a process, in MB (empty when it has gone)."""
    values = {}
    try:
        with open(f"/proc/{pid}/status") as file:
            for line in file:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    values[key] = int(rest.split()[0]) / 1024
    except OSError:
        pass
    return values


def private_mb(pid: str) -> float:
    """Memory only this process holds (``Private_Clean + Private_Dirty``): for a forked worker,
    what it allocated or copied, without the pages it still shares with the main process."""
    total = 0.0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as file:
            for line in file:
                key, _, rest = line.partition(":")
                if key in ("Private_Clean", "Private_Dirty"):
                    total += int(rest.split()[0]) / 1024
    except OSError:
        pass
    return total


def children() -> list[str]:
    pids = []
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/children") as file:
                pids += file.read().split()
        except OSError:
            continue
    return pids


def sample(epoch: int) -> dict:
    own = status_mb()
    workers = children()
    return {"epoch": epoch, "rss_mb": round(own["VmRSS"], 1), "peak_mb": round(own["VmHWM"], 1),
            "workers_mb": round(sum(status_mb(pid).get("VmRSS", 0.0) for pid in workers), 1),
            "workers_private_mb": round(sum(private_mb(pid) for pid in workers), 1)}


def soak(epochs: int, out: Path, overrides: list[str]) -> dict:
    from ssl_pretrain.config import load_config
    from ssl_pretrain.engine.run_folder import RunFolder
    from ssl_pretrain.train import pretrain

    samples = []
    append = RunFolder.append_metrics

    def append_and_sample(self, record):
        if "loss_mean" in record:  # an epoch's summary: measure, and keep it in the metrics too
            samples.append(sample(record["epoch"]))
            record = {**record, **{key: samples[-1][key] for key in ("rss_mb", "peak_mb", "workers_mb")}}
        append(self, record)

    RunFolder.append_metrics = append_and_sample
    cfg = load_config(None, TINY + [f"train.epochs={epochs}"] + overrides)
    if out.exists():
        shutil.rmtree(out)
    pretrain(cfg, out, progress=False)
    base = samples[1] if len(samples) > 1 else samples[0]
    growth = {key: round(samples[-1][key] - base[key], 1) for key in KEYS}
    return {"epochs": samples, "growth_mb": growth, "settings": TINY + overrides}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--out", default="runs/memory-soak", help="run folder (replaced)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    if not os.path.exists("/proc/self/status"):
        print("memory_soak: needs Linux /proc", file=sys.stderr)
        return 2
    print(json.dumps(soak(args.epochs, Path(args.out), args.overrides)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
