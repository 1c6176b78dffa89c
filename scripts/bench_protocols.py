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
those budgets the report's best ``linear`` / ``finetune`` configuration is trained with
``ssl-finetune`` (``--validation none``, the report's settings) for every seed on the same label
subsets, and its mean test top-1 is set beside the report's row.
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
                                  finetune_max_fraction=1.0, device="cpu")
    start = time.perf_counter()
    result = evaluate(args.checkpoint, args.train, out, test=args.test, settings=settings)
    return result.rows, time.perf_counter() - start


def classifier_check(args, rows: list[dict], budget: str, out: Path) -> dict:
    """ssl-finetune with the report's configuration at ``budget``, every seed; mean test top-1."""
    from ssl_classifier.train import FinetuneSettings, train_classifier

    label_budget = parse_label_budgets(budget)[0]
    best = best_classifier(rows, label_budget.label)
    per_class = label_budget.per_class
    scores = []
    for seed in range(args.seeds):
        finetune = dict(mode=best["method"], epochs=best["epochs"], validation="none", seed=seed, device="cpu",
                        progress=False, overwrite=True, labels_per_class=per_class)
        if best["method"] == "linear":
            finetune.update(lr=0.1, batch_size=256)
        else:
            finetune.update(head_init="random", backbone_lr_scale=1.0, lr=0.05, batch_size=64)
        trained = train_classifier(args.checkpoint, args.train, out / f"classifier-{budget}-{seed}", test=args.test,
                                   settings=FinetuneSettings(**finetune))
        scores.append(trained.info.test["top1"])
    return {**best, "ssl_finetune": float(np.mean(scores)), "ssl_finetune_seeds": scores}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--train", required=True)
    parser.add_argument("--test", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--budgets", default="1pc,10pc,100pc")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--methods", default="knn,logreg,linear,finetune")
    parser.add_argument("--classifier-check", default="", help="budgets to train ssl-finetune at, e.g. 10pc,100pc")
    args = parser.parse_args()
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
    for check in checks:
        print(f"classifier at {check['budget']}: report {check['method']} {check['epochs']} epochs "
              f"{100 * check['mean']:.1f}%, ssl-finetune {100 * check['ssl_finetune']:.1f}% "
              f"({100 * (check['ssl_finetune'] - check['mean']):+.1f} points)")
    (out / "protocols.json").write_text(json.dumps({**record, "checks": checks}, indent=1))


if __name__ == "__main__":
    main()
