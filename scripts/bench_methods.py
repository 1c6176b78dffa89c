"""Every pretraining method at one CPU time budget, side by side (BENCHMARKS.md, "Methods at one CPU budget").

Each method pretrains with the CPU preset (``configs/cifar10_cpu.yaml``, its heads for that method)
for the same wall-clock budget on 90% of the labelled training folder; the other 10% is the
validation split. Per method: kNN (k=200, T=0.1) on validation, then the test set scored once;
logistic regression on 10% of the training labels (C chosen on validation), test scored once.

    python scripts/bench_methods.py --train /data/cifar10/train --test /data/cifar10/test \\
        --methods simclr,byol,dino --budget 15 --out runs/methods

The runs are sequential (each alone on the machine), or with ``--lanes N`` N at a time, each
pinned to its own core with one thread (N methods per budget; every row then had one core, and the
same neighbours' load). The table gives each method's figures and their ratio to the first
method's. ``--set KEY=VALUE`` passes settings to every pretraining.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from queue import Queue
from typing import Optional

import numpy as np
import torch

from linear_probe.embeddings import extract_embeddings
from linear_probe.knn import knn_classify, topk_accuracy
from linear_probe.logreg import evaluate_logreg
from linear_probe.splits import parse_label_budgets, sample_label_subset, stratified_split
from ssl_pretrain.augment.transforms import build_eval_transform
from ssl_pretrain.checkpoint import load_backbone
from ssl_pretrain.data import SubsetSource, open_source

import benchmarking

REPO = Path(__file__).resolve().parents[1]


def split_training_folder(train: str, out: Path, val_fraction: float, seed: int):
    """(pretraining path list, train source, validation source): a stratified split of the
    labelled folder; pretraining reads the train part through a text file of paths."""
    source = open_source(train, labelled=True)
    train_rows, val_rows = stratified_split(source.labels, val_fraction, seed)
    paths = out / "pretrain_paths.txt"
    root = Path(train).resolve()
    paths.write_text("".join(f"{root / source.name(int(row))}\n" for row in train_rows))  # names are relative
    return paths, SubsetSource(source, train_rows), SubsetSource(source, val_rows)


def pretrain(method: str, paths: Path, out: Path, budget: float, overrides: list[str],
             core: Optional[int] = None) -> float:
    """Run ``ssl-pretrain`` for ``method`` (on CPU ``core`` alone, one thread, if given); returns its
    wall-clock seconds. A run that fails (a divergence stop, say) is reported and evaluated as it
    stands."""
    command = [sys.executable, "-m", "ssl_pretrain", "--data", str(paths), "--config",
               str(REPO / "configs" / "cifar10_cpu.yaml"), "--method", method, "--time-budget", str(budget),
               "--out", str(out), "--overwrite", "--no-progress"]
    env = None
    if core is not None:
        command += ["--set", "train.threads=1"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for override in overrides:
        command += ["--set", override]
    log = (out.parent / f"{method}.log").open("w") if core is not None else None
    result, seconds = benchmarking.timed(
        subprocess.run, command, env=env, stdout=log, stderr=subprocess.STDOUT if log else None,
        preexec_fn=(lambda: os.sched_setaffinity(0, {core})) if core is not None else None)
    if log:
        log.close()
    if result.returncode:
        print(f"{method}: ssl-pretrain exited with {result.returncode}", flush=True)
    return seconds


def evaluate(run: Path, train_source, val_source, test_source, seed: int) -> dict:
    backbone, info = load_backbone(run / "backbone.safetensors")
    transform = build_eval_transform(info.input_size, info.mean, info.std)
    device = torch.device("cpu")
    extract = lambda source: extract_embeddings(backbone, source, transform, 512, device, progress=False)  # noqa: E731
    train, val, test = extract(train_source), extract(val_source), extract(test_source)
    classes = int(train.labels.max()) + 1
    knn = lambda queries: topk_accuracy(  # noqa: E731
        knn_classify(train.features, train.labels, queries.features, classes, k=200, temperature=0.1),
        queries.labels, 1)
    labelled = sample_label_subset(train.labels, parse_label_budgets("0.1")[0], seed)
    logreg = evaluate_logreg(train.features[labelled], train.labels[labelled], val.features, val.labels,
                             test.features, test.labels, classes, seed=seed)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [record for record in metrics if "loss_mean" in record]
    return {"knn_val": knn(val), "knn_test": knn(test), "logreg10_val": logreg.val_top1,
            "logreg10_test": logreg.top1, "epochs": len(epochs),
            "steps": max(record["step"] for record in metrics),
            "images_per_s": float(np.mean([record["images_per_s"] for record in epochs])) if epochs else None}


def table(rows: dict[str, dict], first: str) -> str:
    lines = [benchmarking.table_header("method", "steps (epochs)", "images/s", "kNN val", "kNN test", "ratio",
                                       "logreg 10% val", "logreg 10% test", "ratio")]
    base = rows[first]
    for name, row in rows.items():
        if row.get("failed"):
            lines.append(benchmarking.table_row(name, "stopped without an export (see its log)", *[""] * 7))
            continue
        lines.append(benchmarking.table_row(
            name, f"{row['steps']} ({row['epochs']})", f"{row['images_per_s']:.0f}", f"{row['knn_val']:.2%}",
            f"{row['knn_test']:.2%}", f"{row['knn_test'] / base['knn_test']:.3f}", f"{row['logreg10_val']:.2%}",
            f"{row['logreg10_test']:.2%}", f"{row['logreg10_test'] / base['logreg10_test']:.3f}"))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = benchmarking.argument_parser(__doc__)
    parser.add_argument("--train", required=True, help="labelled training folder (class subfolders)")
    parser.add_argument("--test", required=True, help="labelled test folder")
    parser.add_argument("--methods", default="simclr,moco,byol,simsiam,barlowtwins,vicreg,dino")
    parser.add_argument("--budget", type=float, default=15.0, help="minutes of pretraining per method")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    benchmarking.add_settings(parser, "a setting for every pretraining, repeatable")
    parser.add_argument("--lanes", type=int, default=1,
                        help="methods pretrained at a time, each pinned to its own core with one thread")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths, train_source, val_source = split_training_folder(args.train, out, args.val_fraction, args.seed)
    test_source = open_source(args.test, labelled=True)
    methods = [name.strip() for name in args.methods.split(",") if name.strip()]
    rows: dict[str, dict] = {}
    if args.lanes > 1:
        if not hasattr(os, "sched_getaffinity"):
            parser.error("--lanes pins each run to a core, which needs Linux")
        cores = sorted(os.sched_getaffinity(0))[: args.lanes]
        if len(cores) < args.lanes:
            parser.error(f"--lanes {args.lanes} needs as many cores; this process may use {len(cores)}")
        free: Queue = Queue()
        for core in cores:
            free.put(core)

        def lane(method: str) -> float:
            core = free.get()
            try:
                return pretrain(method, paths, out / method, args.budget, args.overrides, core)
            finally:
                free.put(core)

        with ThreadPoolExecutor(args.lanes) as pool:
            seconds = dict(zip(methods, pool.map(lane, methods)))
    for method in methods:
        if args.lanes <= 1:
            seconds = {method: pretrain(method, paths, out / method, args.budget, args.overrides)}
        if not (out / method / "backbone.safetensors").is_file():  # stopped without an export: say so
            rows[method] = {"pretrain_s": seconds[method], "failed": True}
            continue
        rows[method] = {"pretrain_s": seconds[method], **evaluate(out / method, train_source, val_source,
                                                                  test_source, args.seed)}
        print(json.dumps({"method": method, **rows[method]}), flush=True)
        (out / "results.json").write_text(json.dumps(rows, indent=1))
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    lanes = (f"{args.lanes} methods at a time, each on one core with one thread" if args.lanes > 1
             else "one method at a time")
    print("\n" + benchmarking.header(__file__, argv, lanes, f"commit {commit}",
                                     f"budget {args.budget:g} min per method") + "\n")
    first = next((name for name, row in rows.items() if not row.get("failed")), None)
    if first:
        print(table(rows, first))
    return 0


if __name__ == "__main__":
    sys.exit(main())
