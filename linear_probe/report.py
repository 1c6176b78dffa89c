"""Rows -> ``results.json`` (every number, flat) and ``results.md`` (mean ± std over seeds, the
baselines beside the pretrained features, and the gap to the best baseline)."""

from __future__ import annotations

import json
import platform
from importlib import metadata
from pathlib import Path

import numpy as np

FEATURE_COLUMNS = ("ssl", "random_init", "pixels", "scratch")
COLUMN_TITLES = {"ssl": "ssl", "random_init": "random init", "pixels": "pixels", "scratch": "scratch"}


def make_row(features: str, method: str, budget, seed: int, result, n_train: int, pool_size: int,
             seconds: float) -> dict:
    """One flat row of ``results.json`` for one (features, method, label budget, seed).

    Args:
        budget: the ``LabelBudget``; a per-class budget reports the fraction of the training pool
            (``pool_size`` images) it amounted to as ``label_fraction``.
        result: the method's ``ProbeResult``.
    """
    fraction = budget.fraction if budget.fraction is not None else round(n_train / pool_size, 6)
    return {
        "features": features,
        "method": method,
        "label_fraction": fraction,
        "label_budget": budget.label,
        "seed": seed,
        "top1": result.top1,
        "top5": result.top5,
        "n_train": n_train,
        "n_test": len(result.predictions),
        "val_top1": result.val_top1,
        "chosen": result.chosen,
        "seconds": round(seconds, 3),
    }


def collect_versions() -> dict[str, str]:
    """Versions of what produced the numbers (torch, scikit-learn, faiss, this package...)."""
    versions = {"python": platform.python_version()}
    for package in ("torch", "torchvision", "scikit-learn", "faiss-cpu", "numpy", "lightly", "ssl-pretrain"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    if "faiss-cpu" not in versions:  # a faiss-gpu or conda build
        try:
            import faiss

            versions["faiss"] = faiss.__version__
        except ImportError:
            pass
    return versions


def _ordered_unique(values) -> list:
    return list(dict.fromkeys(values))


def summarise(rows: list[dict], metric: str = "top1") -> dict[tuple[str, str, str], dict]:
    """``(method, label budget, features) -> {mean, std, seeds, n_train}`` of ``metric`` over seeds."""
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["label_budget"], row["features"]), []).append(row)
    summary = {}
    for key, group in groups.items():
        values = np.array([row[metric] for row in group], dtype=np.float64)
        summary[key] = {
            "mean": float(values.mean()),
            "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
            "seeds": len(values),
            "n_train": int(round(np.mean([row["n_train"] for row in group]))),
        }
    return summary


def _cell(stats: dict | None) -> str:
    if stats is None:
        return "–"
    if stats["seeds"] > 1:
        return f"{100 * stats['mean']:.1f} ± {100 * stats['std']:.1f}"
    return f"{100 * stats['mean']:.1f}"


def _gap(cells: dict[str, dict | None]) -> str:
    """ssl mean minus the best baseline mean, in percentage points."""
    baselines = [stats["mean"] for kind, stats in cells.items() if stats and kind != "ssl"]
    if not cells.get("ssl") or not baselines:
        return "–"
    return f"{100 * (cells['ssl']['mean'] - max(baselines)):+.1f}"


def format_table(rows: list[dict], metric: str = "top1") -> str:
    """A Markdown table: one line per (method, label budget), one column per kind of features,
    and the pretrained features' lead over the best baseline in percentage points."""
    summary = summarise(rows, metric)
    present = _ordered_unique(row["features"] for row in rows)
    columns = [kind for kind in FEATURE_COLUMNS if kind in present] + [kind for kind in present if kind not in FEATURE_COLUMNS]
    with_gap = "ssl" in columns and len(columns) > 1
    header = (["method", "labels", "n_train"] + [COLUMN_TITLES.get(kind, kind) for kind in columns]
              + (["ssl − best baseline"] if with_gap else []))
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for method in _ordered_unique(row["method"] for row in rows):
        for budget in _ordered_unique(row["label_budget"] for row in rows if row["method"] == method):
            cells = {kind: summary.get((method, budget, kind)) for kind in columns}
            n_train = next(stats["n_train"] for stats in cells.values() if stats)
            line = [method, budget, str(n_train)] + [_cell(cells[kind]) for kind in columns]
            lines.append("| " + " | ".join(line + ([_gap(cells)] if with_gap else [])) + " |")
    return "\n".join(lines)


def _describe(meta: dict) -> str:
    """One sentence on what was evaluated: the checkpoint (when there is one) and the data."""
    data = meta.get("data", {})
    text = f"Train: `{data.get('train')}`, test: `{data.get('test')}`, validation: `{data.get('val')}`."
    checkpoint = meta.get("checkpoint")
    if checkpoint:
        text = (f"Checkpoint: `{checkpoint['path']}` ({checkpoint['architecture']}, "
                f"epoch {checkpoint['epoch']}). " + text)
    return text


def format_markdown(rows: list[dict], meta: dict) -> str:
    """``results.md``: what was evaluated, then top-1 and top-5 tables."""
    seeds = max((row["seed"] for row in rows), default=0) + 1
    return "\n".join([
        "# Evaluation",
        "",
        _describe(meta),
        "",
        f"Test accuracy in %, mean ± std over {seeds} seed(s). C and epochs were chosen on validation; "
        "the test set was scored once per configuration.",
        "",
        "## Top-1",
        "",
        format_table(rows, "top1"),
        "",
        "## Top-5",
        "",
        format_table(rows, "top5"),
        "",
    ])


def write_report(out_dir: str | Path, rows: list[dict], meta: dict) -> list[Path]:
    """Write ``results.json`` (``{"rows": [...], **meta, "versions": ...}``) and ``results.md``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {"rows": rows, **meta, "versions": collect_versions()}
    json_path, markdown_path = out_dir / "results.json", out_dir / "results.md"
    json_path.write_text(json.dumps(results, indent=2) + "\n")  # ASCII: names are escaped
    # A folder name that is not valid UTF-8 is written escaped rather than failing the report.
    markdown_path.write_text(format_markdown(rows, meta), encoding="utf-8", errors="backslashreplace")
    return [json_path, markdown_path]
