"""How much choosing hyper-parameters outside the label budget inflates few-label figures, what
choosing inside it costs, and whether ``ssl-finetune`` reproduces the report's classifier.

    python scripts/bench_protocols.py --checkpoint RUN --train DATA/train --test DATA/test \\
        --out /tmp/protocols --budgets 1pc,10pc,100pc --seeds 3 [--methods knn,logreg,linear] \\
        [--classifier-check 10pc,100pc [--ways own,median,default] [--reuse]]

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
``--reuse`` takes both protocols' rows from an earlier run's ``OUT/protocols.json`` instead of
evaluating again, and ``--ways`` runs only some of the three (the others are read from that
file): after a change to ``ssl-finetune``'s defaults, ``--reuse --ways default`` checks them alone.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from linear_probe.evaluate import evaluate
from linear_probe.inputs import EvaluationSettings
from linear_probe.report import best_classifier, classifier_arguments, summarise
from linear_probe.splits import parse_label_budgets

import benchmarking


def protocol_settings(args, protocol: str) -> EvaluationSettings:
    return EvaluationSettings(label_budgets=parse_label_budgets(args.budgets), seeds=args.seeds,
                              methods=tuple(args.methods.split(",")), validation=protocol, plots=False,
                              progress=False, leak_check=False, finetune_max_fraction=args.finetune_max_fraction,
                              device="cpu")


def run_protocol(args, protocol: str, out: Path) -> tuple[list[dict], float]:
    settings = protocol_settings(args, protocol)
    start = time.perf_counter()
    result = evaluate(args.checkpoint, args.train, out, test=args.test, settings=settings)
    return result.rows, time.perf_counter() - start


WAYS = ("own", "median", "default")


def classifier_check(args, settings: EvaluationSettings, rows: list[dict], budget: str, out: Path,
                     earlier: dict | None = None) -> dict:
    """``ssl-finetune`` at ``budget`` on every seed's labelled images (the report's), three ways:

    - ``own``: the report's flags (``classifier_arguments``) with the epochs chosen for that seed's
      images (the command results.md gives a user whose labelled set is that seed's);
    - ``median``: the one command results.md prints for this run (the seeds' median epochs);
    - ``default``: ``ssl-finetune``'s defaults (``--mode auto``, chosen by cross-validation inside
      the labels), what a user who never ran the report gets.
    Mean test top-1 of each beside the report's row. Ways outside ``args.ways`` are copied from
    ``earlier`` (the same budget's check in a reused protocols.json).
    """
    from ssl_classifier.cli import finetune_main

    label_budget = parse_label_budgets(budget)[0]
    best = best_classifier(rows, label_budget.label)
    ways = args.ways.split(",")
    scores: dict[str, list[float]] = {name: [] for name in WAYS}
    modes, seconds = [], []
    for seed, own in enumerate(best["seed_epochs"]):
        common = ["--checkpoint", str(args.checkpoint), "--train", args.train, "--test", args.test,
                  "--labels-per-class", str(label_budget.per_class), "--seed", str(seed), "--device", "cpu",
                  "--overwrite", "--quiet"]
        runs = {"own": classifier_arguments({**best, "epochs": own}, asdict(settings)),
                "median": classifier_arguments(best, asdict(settings)), "default": []}
        for name, flags in runs.items():
            if name not in ways:
                continue
            if name == "median" and own == best["epochs"] and "own" in ways:
                scores[name].append(scores["own"][-1])  # the same command
                continue
            model_dir = out / f"classifier-{budget}-{seed}-{name}"
            start = time.perf_counter()
            if finetune_main(common + flags + ["--out", str(model_dir)]) != 0:
                raise SystemExit(f"ssl-finetune failed for {budget}, seed {seed} ({name})")
            if name == "default":
                seconds.append(time.perf_counter() - start)
            info = json.loads((model_dir / "classifier.json").read_text())
            scores[name].append(info["test"]["top1"])
            if name == "default":
                modes.append(info["mode"])
    for name in WAYS:
        if name not in ways:
            if not earlier or name not in earlier.get("ssl_finetune_seeds", {}):
                raise SystemExit(f"--ways leaves out {name} at {budget}, but no earlier check of it to reuse")
            scores[name] = earlier["ssl_finetune_seeds"][name]
    if "default" not in ways:
        modes, seconds = earlier.get("default_modes", []), earlier.get("default_seconds", [])
    return {**best, "default_modes": modes, "default_seconds": seconds, "ssl_finetune_seeds": scores,
            **{f"ssl_finetune_{name}": float(np.mean(values)) for name, values in scores.items()}}


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
    parser.add_argument("--ways", default=",".join(WAYS), help="which ssl-finetune runs the check makes (own, median, "
                        "default); the others are read from a reused protocols.json")
    parser.add_argument("--reuse", action="store_true", help="read both protocols' rows from OUT/protocols.json")
    args = parser.parse_args(argv)
    unknown = set(args.ways.split(",")) - set(WAYS)
    if unknown:
        parser.error(f"unknown ways {', '.join(sorted(unknown))}: choose from {', '.join(WAYS)}")
    out = Path(args.out)
    print(benchmarking.header("bench_protocols.py", None))
    earlier: dict = {}
    if args.reuse:
        if not (out / "protocols.json").is_file():
            parser.error(f"--reuse: no {out / 'protocols.json'} from an earlier run")
        earlier = json.loads((out / "protocols.json").read_text())
        rows_cv, rows_pool = earlier["cv"], earlier["pool"]
        seconds_cv, seconds_pool = earlier["seconds"]["cv"], earlier["seconds"]["pool"]
    else:
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
    budgets = [budget.strip() for budget in args.classifier_check.split(",") if budget.strip()]
    earlier_checks = {check["budget"]: check for check in earlier.get("checks", [])}
    checks = [classifier_check(args, protocol_settings(args, "cv"), rows_cv, budget, out,
                               earlier_checks.get(parse_label_budgets(budget)[0].label)) for budget in budgets]
    if checks:
        print("\n| labels | report's best row | report top-1 | ssl-finetune, each seed's own epochs | "
              "the printed command (median epochs) | ssl-finetune defaults (auto, cv) |")
        print("|---|---|---:|---:|---:|---:|")
    for check in checks:
        cells = [f"{100 * check[f'ssl_finetune_{name}']:.1f} ({100 * (check[f'ssl_finetune_{name}'] - check['mean']):+.1f})"
                 for name in ("own", "median", "default")]
        print(f"| {check['budget']} | {check['method']}, epochs {check['seed_epochs']} (median {check['epochs']}) "
              f"| {100 * check['mean']:.1f} | {' | '.join(cells)} |  modes chosen by default: "
              f"{','.join(check['default_modes'])}"
              + (f"; defaults' seconds a seed: {', '.join(f'{value:.0f}' for value in check['default_seconds'])}"
                 if check.get("default_seconds") else ""))
    kept = [check for label, check in earlier_checks.items() if label not in {check["budget"] for check in checks}]
    (out / "protocols.json").write_text(json.dumps({**record, "checks": kept + checks}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
