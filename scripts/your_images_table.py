"""BENCHMARKS.md's "your own images" tables from the runs of ``scripts/bench_your_images.sh``.

    python scripts/your_images_table.py OUT

Reads ``OUT/<isa>_<set>.pretrain.log`` (the recipe's choices, images/s per epoch, /usr/bin/time's
wall clock and peak memory) and ``OUT/<isa>_<set>-eval/results.json`` (linear-probe's rows), and
prints two Markdown tables: the runs, and test top-1 (mean over the seeds) of the SSL features
against the best baseline of the same method (random init, pixels, scratch) per label budget,
with the gap; plus the 3-point goal at 10% labels for logistic regression and fine-tuning.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

METHODS = ("knn", "logreg", "linear", "finetune")
BUDGETS = ("1%", "10%", "100%")
BASELINES = ("random_init", "pixels", "scratch")


def read_pretrain(log: Path) -> dict:
    text = log.read_text(errors="replace")
    run: dict = {"choices": dict(re.findall(r"^  ([\w.]+) = (\S+):", text, re.M))}
    survey = re.search(r"^recipe from the data.*?: ([\d,]+) images; \d+ sampled: (.*?); (cpu|cuda)", text, re.M)
    run["images"], run["survey"] = (survey.group(1), survey.group(2)) if survey else ("?", "?")
    # "precision auto: fp32 on cpu (...)", or after a timing probe "precision auto: ...: bf16 autocast"
    precision = (re.search(r"^precision \w+: (.+?) on (?:cpu|cuda|mps)", text, re.M)
                 or re.search(r"^precision \w+: .*: (bf16 autocast|fp16 autocast|fp32)\s*$", text, re.M))
    run["precision"] = precision.group(1) if precision else "?"
    speeds = [float(v) for v in re.findall(r"^epoch \d+/\d+: loss \S+, ([\d.]+) images/s", text, re.M)]
    run["images_s"] = statistics.median(speeds) if speeds else None
    run["epochs"] = len(speeds)
    cap = re.search(r"^epoch \d+/(\d+):", text, re.M)
    run["epoch_cap"] = int(cap.group(1)) if cap else None
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", text)
    run["wall"] = wall.group(1) if wall else "?"
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    run["rss_gb"] = int(rss.group(1)) / 1e6 if rss else None
    run["skipped"] = re.search(r"done: .*?(\d+) unreadable files skipped", text)
    run["skipped"] = int(run["skipped"].group(1)) if run["skipped"] else None
    return run


def read_eval(results: Path) -> dict:
    """{(method, budget): {features: mean top-1 %}}"""
    rows = json.loads(results.read_text())["rows"]
    values: dict = defaultdict(lambda: defaultdict(list))
    for row in rows:
        values[(row["method"], row["label_budget"])][row["features"]].append(100 * row["top1"])
    return {key: {features: statistics.mean(v) for features, v in by.items()} for key, by in values.items()}


def main(argv: list[str] | None = None) -> int:
    out = Path((argv or sys.argv[1:])[0])
    runs = sorted(out.glob("*.pretrain.log"))
    print("| set | kernels | images (sampled) | input, network | precision | images/s (median epoch) | epochs "
          "(cap) | wall clock | peak RSS | skipped files |")
    print("|---|---|---|---|---|---:|---|---|---:|---:|")
    evals = {}
    for log in runs:
        name = log.name.removesuffix(".pretrain.log")
        isa, _, data = name.partition("_")
        run = read_pretrain(log)
        choices = run["choices"]
        speed = f"{run['images_s']:,.0f}" if run["images_s"] else "?"
        rss = f"{run['rss_gb']:.2f} GB" if run["rss_gb"] else "?"
        print(f"| {data} | {isa} | {run['images']} ({run['survey']}) | {choices.get('augment.input_size', '?')} px, "
              f"{choices.get('model.backbone', '?')} | {run['precision']} | {speed} | {run['epochs']} "
              f"({run['epoch_cap']}) | {run['wall']} | {rss} | {run['skipped']} |")
        results = out / f"{name}-eval" / "results.json"
        if results.exists():
            evals[(data, isa)] = read_eval(results)
    print()
    print("| set | kernels | method | 1%: ssl / best baseline (gap) | 10% | 100% |")
    print("|---|---|---|---|---|---|")
    goals = []
    for (data, isa), table in evals.items():
        for method in METHODS:
            cells = []
            for budget in BUDGETS:
                scores = table.get((method, budget))
                if not scores or "ssl" not in scores:
                    cells.append("–")
                    continue
                baselines = {k: v for k, v in scores.items() if k in BASELINES}
                if not baselines:
                    cells.append(f"{scores['ssl']:.1f}")
                    continue
                best = max(baselines, key=baselines.get)
                gap = scores["ssl"] - baselines[best]
                cells.append(f"{scores['ssl']:.1f} / {baselines[best]:.1f} {best} ({gap:+.1f})")
                if budget == "10%" and method in ("logreg", "finetune"):
                    goals.append((data, isa, method, gap))
            print(f"| {data} | {isa} | {method} | " + " | ".join(cells) + " |")
    print()
    for (data, isa), table in evals.items():
        for budget in BUDGETS:
            ssl = {m: v["ssl"] for (m, b), v in table.items() if b == budget and "ssl" in v}
            base = {(m, k): v[k] for (m, b), v in table.items() if b == budget for k in v if k in BASELINES}
            if ssl and base:
                m, (bm, bk) = max(ssl, key=ssl.get), max(base, key=base.get)
                print(f"- {data} ({isa}) at {budget}: best ssl {m} {ssl[m]:.1f} against the best baseline "
                      f"{bk} {bm} {base[(bm, bk)]:.1f} ({ssl[m] - base[(bm, bk)]:+.1f})")
    print()
    for data, isa, method, gap in goals:
        print(f"- {data} ({isa}) {method} at 10%: {gap:+.1f} points vs the best baseline: "
              f"{'met' if gap >= 3 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
