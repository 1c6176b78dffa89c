"""How much choosing hyper-parameters outside the label budget inflates few-label figures, what
choosing inside it costs, and whether ``ssl-finetune`` reproduces the report's classifier.

    python scripts/bench_protocols.py --checkpoint RUN --train DATA/train --test DATA/test \\
        --out /tmp/protocols --budgets 1pc,10pc,100pc --seeds 3 [--methods knn,logreg,linear] \\
        [--classifier-check 10pc,100pc]

The same checkpoint is evaluated by ``linear-probe`` twice, ``--validation cv`` (the default:
k-fold cross-validation inside each budget) and ``--validation pool`` (a validation share of the
whole labelled pool, outside the budget), the pool run reusing the cv run's cached embeddings so
that the two times compare the methods alone. Printed: a table of mean test top-1 for every
(method, budget, features) under both protocols and the difference (pool - cv: the inflation),
then the seconds of each protocol's rows and their ratio. With ``--classifier-check``, for each of
those budgets ``ssl-finetune`` trains on every seed's labelled images (the report's): with the
report's best ``linear`` / ``finetune`` configuration and that seed's own epochs, with the one
command results.md prints (the seeds' median epochs), and with its own defaults (``--mode auto``,
cross-validation inside the labels); each mean test top-1 is set beside the report's row.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np

from linear_probe.evaluate import evaluate
from linear_probe.inputs import EvaluationSettings
from linear_probe.report import best_classifier, summarise
from linear_probe.splits import parse_label_budgets

import benchmarking


def run_protocol(args, protocol: str, out: Path) -> tuple[list[dict], float]:
    settings = EvaluationSettings(label_budgets=parse_label_budgets(args.budgets), seeds=args.seeds,
                                  methods=tuple(args.methods.split(",")),
                                  validation=protocol, plots=False, progress=False, leak_check=False,
                                  finetune_max_fraction=args.finetune_max_fraction, device="cpu")
    start = time.perf_counter()
    result = evaluate(args.checkpoint, args.train, out, test=args.test, settings=settings)
    return result.rows, time.perf_counter() - start


def _seed_epochs(rows: list[dict], best: dict, seed: int) -> int:
    """The epochs the report chose for ``seed``'s labelled images (its row of the best method)."""
    row = next(row for row in rows if row["features"] == "ssl" and row["method"] == best["method"]
               and row["label_budget"] == best["budget"] and row["seed"] == seed)
    chosen = row.get("chosen") or {}
    return int(chosen.get("epochs", chosen.get("best_epoch")))


def classifier_check(args, rows: list[dict], budget: str, out: Path) -> dict:
    """``ssl-finetune`` at ``budget`` on every seed's labelled images (the report's), three ways:

    - ``own``: the report's configuration with the epochs chosen for that seed's images (the
      command results.md gives a user whose labelled set is that seed's);
    - ``median``: the one command results.md prints for this run (the seeds' median epochs);
    - ``default``: ``ssl-finetune``'s defaults (``--mode auto``, chosen by cross-validation inside
      the labels), what a user who never ran the report gets.
    Mean test top-1 of each beside the report's row.
    """
    from ssl_classifier.train import FinetuneSettings, train_classifier

    label_budget = parse_label_budgets(budget)[0]
    best = best_classifier(rows, label_budget.label)
    per_class = label_budget.per_class
    scores: dict[str, list[float]] = {"own": [], "median": [], "default": []}
    epochs_seen = []
    for seed in range(args.seeds):
        common = dict(seed=seed, device="cpu", progress=False, overwrite=True, labels_per_class=per_class)
        report_like = dict(mode=best["method"], validation="none", **common)
        if best["method"] == "linear":
            report_like.update(lr=0.1, batch_size=256)
        else:
            report_like.update(head_init="random", backbone_lr_scale=1.0, lr=0.05, batch_size=64)
        own = _seed_epochs(rows, best, seed)
        epochs_seen.append(own)
        runs = {"own": dict(report_like, epochs=own), "median": dict(report_like, epochs=best["epochs"]),
                "default": dict(common)}
        for name, finetune in runs.items():
            if name == "median" and own == best["epochs"]:
                scores[name].append(scores["own"][-1])  # the same command
                continue
            trained = train_classifier(args.checkpoint, args.train, out / f"classifier-{budget}-{seed}-{name}",
                                       test=args.test, settings=FinetuneSettings(**finetune))
            scores[name].append(trained.info.test["top1"])
            if name == "default":
                best.setdefault("default_modes", []).append(trained.info.mode)
    return {**best, "seed_epochs": epochs_seen, **{f"ssl_finetune_{name}": float(np.mean(values))
                                                   for name, values in scores.items()},
            "ssl_finetune_seeds": scores}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--train", required=True)
    parser.add_argument("--test", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--budgets", default="1pc,10pc,100pc")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--methods", default="knn,logreg,linear,finetune")
    parser.add_argument("--finetune-max-fraction", type=float, default=EvaluationSettings.finetune_max_fraction,
                        help="fine-tune at budgets up to this share of the pool (linear-probe's default)")
    parser.add_argument("--classifier-check", default="", help="budgets to train ssl-finetune at, e.g. 10pc,100pc")
    args = parser.parse_args(argv)
    out = Path(args.out)
    print(benchmarking.header("bench_protocols.py", None))
    rows_cv, seconds_cv = run_protocol(args, "cv", out / "cv")
    shutil.copytree(out / "cv" / "embeddings", out / "pool" / "embeddings", dirs_exist_ok=True)
    rows_pool, seconds_pool = run_protocol(args, "pool", out / "pool")
    cv, pool = summarise(rows_cv), summarise(rows_pool)
    print("\n| method | labels | features | cv (inside the budget) | pool (outside) | inflation, points |")
    print("|---|---|---|---:|---:|---:|")
    for key in cv:
        if key in pool:
            method, budget, features = key
            print(f"| {method} | {budget} | {features} | {100 * cv[key]['mean']:.1f} | {100 * pool[key]['mean']:.1f} "
                  f"| {100 * (pool[key]['mean'] - cv[key]['mean']):+.1f} |")
    method_cv = sum(row["seconds"] for row in rows_cv)
    method_pool = sum(row["seconds"] for row in rows_pool)
    print(f"\nmethods' seconds: cv {method_cv:.0f}, pool {method_pool:.0f} (cv / pool {method_cv / method_pool:.2f}x); "
          f"wall: cv {seconds_cv:.0f} s (embeddings extracted), pool {seconds_pool:.0f} s (embeddings cached)")
    record = {"cv": rows_cv, "pool": rows_pool, "seconds": {"cv": seconds_cv, "pool": seconds_pool}}
    (out / "protocols.json").write_text(json.dumps(record, indent=1))
    checks = [classifier_check(args, rows_cv, budget.strip(), out) for budget in args.classifier_check.split(",")
              if budget.strip()]
    if checks:
        print("\n| labels | report's best row | report top-1 | ssl-finetune, each seed's own epochs | "
              "the printed command (median epochs) | ssl-finetune defaults (auto, cv) |")
        print("|---|---|---:|---:|---:|---:|")
    for check in checks:
        cells = [f"{100 * check[f'ssl_finetune_{name}']:.1f} ({100 * (check[f'ssl_finetune_{name}'] - check['mean']):+.1f})"
                 for name in ("own", "median", "default")]
        print(f"| {check['budget']} | {check['method']}, epochs {check['seed_epochs']} (median {check['epochs']}) "
              f"| {100 * check['mean']:.1f} | {' | '.join(cells)} |  modes chosen by default: "
              f"{','.join(check.get('default_modes', []))}")
    (out / "protocols.json").write_text(json.dumps({**record, "checks": checks}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
