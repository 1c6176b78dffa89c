"""A recipe trial on the validation split: pretrain a few epochs (a fixed number of steps, so the
result does not depend on the machine's speed or load), then kNN top-1 on the held-out 10% of the
labelled training folder. Only the validation split is scored: recipes are chosen here, and the
test set is scored once per chosen recipe by ``scripts/bench_methods.py``.

    python scripts/trial_recipe.py --train /data/cifar10/train --out runs/trials --name dino_t004 \\
        --method dino --epochs 3 --set optim.lr=0.12 --set dino.teacher_temperature=0.04

The split is ``bench_methods``' (stratified, seed 0); the kNN memory is a fixed random subset of the
training part (``--memory``, 10,000 by default: a fifth of the extraction time of all 45,000).
Each trial appends a line to ``OUT/results.jsonl`` (name, method, settings, kNN, epoch losses).
``--threads 1`` runs a trial on one core, so two can share a 2-core machine. ``--pixels`` trains
nothing and scores raw pixels (at the preset's input size) on the same split: the reference a
recipe must beat on a new dataset. ``--k`` and ``--temperature`` set the kNN vote (200 and 0.1,
the CIFAR-10 protocol; a few thousand memory images call for a smaller k).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from linear_probe.embeddings import extract_embeddings
from linear_probe.knn import knn_classify, topk_accuracy
from ssl_pretrain.augment.transforms import build_eval_transform
from ssl_pretrain.checkpoint import load_backbone
from ssl_pretrain.config import load_config
from ssl_pretrain.data import SubsetSource

import benchmarking
from bench_methods import REPO, split_training_folder


def main(argv=None) -> int:
    parser = benchmarking.argument_parser(__doc__)
    parser.add_argument("--train", required=True, help="labelled training folder (class subfolders)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--name", required=True, help="the trial's folder under --out")
    parser.add_argument("--method", default="simclr")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--config", default=str(REPO / "configs" / "cifar10_cpu.yaml"))
    parser.add_argument("--memory", type=int, default=10_000, help="kNN memory images from the training part")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1: one core)")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    benchmarking.add_settings(parser)
    parser.add_argument("--k", type=int, default=200, help="kNN neighbours")
    parser.add_argument("--temperature", type=float, default=0.1, help="kNN vote temperature")
    parser.add_argument("--pixels", action="store_true", help="score raw pixels instead of pretraining")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths, train, val = split_training_folder(args.train, out, args.val_fraction, 0)
    command = [sys.executable, "-m", "ssl_pretrain", "--data", str(paths), "--config", args.config,
               "--method", args.method, "--epochs", str(args.epochs), "--set", "train.time_budget_minutes=null",
               "--out", str(out / args.name), "--overwrite", "--no-progress"]
    env = None
    if args.threads:
        command += ["--set", f"train.threads={args.threads}"]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        torch.set_num_threads(args.threads)
    for override in args.overrides:
        command += ["--set", override]
    with benchmarking.Stopwatch() as pretraining:
        if args.pixels:
            cfg = load_config(args.config, [f"data.source={paths}", f"method={args.method}", *args.overrides])
            backbone = torch.nn.Flatten()
            transform = build_eval_transform(cfg.augment.input_size, cfg.augment.mean, cfg.augment.std)
        elif subprocess.run(command, env=env).returncode:
            print(json.dumps({"name": args.name, "failed": True}))
            return 1
        else:
            backbone, info = load_backbone(out / args.name / "backbone.safetensors")
            transform = build_eval_transform(info.input_size, info.mean, info.std)
    rows = np.random.default_rng(0).choice(len(train), min(args.memory, len(train)), replace=False)
    memory = extract_embeddings(backbone, SubsetSource(train, rows), transform, 512, torch.device("cpu"), progress=False)
    queries = extract_embeddings(backbone, val, transform, 512, torch.device("cpu"), progress=False)
    classes = int(max(memory.labels.max(), queries.labels.max())) + 1
    top1 = topk_accuracy(knn_classify(memory.features, memory.labels, queries.features, classes, k=args.k,
                                      temperature=args.temperature), queries.labels, 1)
    metrics = out / args.name / "metrics.jsonl"
    records = [] if args.pixels else [json.loads(line) for line in metrics.read_text().splitlines()]
    result = {"name": args.name, "method": "pixels" if args.pixels else args.method,
              "epochs": 0 if args.pixels else args.epochs, "set": args.overrides,
              "knn_val": round(float(top1), 4), "memory": len(rows), "k": args.k,
              "losses": [round(r["loss_mean"], 4) for r in records if r.get("loss_mean") is not None],
              "collapsed": any(r.get("collapsed") for r in records), "seconds": round(pretraining.seconds)}
    print(json.dumps(result))
    with (out / "results.jsonl").open("a") as handle:
        handle.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
