"""Rows -> ``results.json`` (every number, flat) and ``results.md`` (mean ± std over seeds of
top-1, balanced accuracy, macro-F1, ROC AUC and, with more than 5 classes, top-5; the baselines
beside the pretrained features, and the gap to the best baseline)."""

from __future__ import annotations

import json
import platform
from importlib import metadata
from pathlib import Path

import numpy as np

from linear_probe.finetune import DEFAULT_LR as DEFAULT_FINETUNE_LR
from linear_probe.metrics import TOP5_ABOVE

FEATURE_COLUMNS = ("ssl", "random_init", "pixels", "scratch")
COLUMN_TITLES = {"ssl": "ssl", "random_init": "random init", "pixels": "pixels", "scratch": "scratch"}
BASELINE_FEATURES = ("random_init", "pixels", "scratch")
# The tables of results.md, in order; top-5 is left out with TOP5_ABOVE classes or fewer.
METRIC_TITLES = {"top1": "Top-1", "balanced_accuracy": "Balanced accuracy", "macro_f1": "Macro-F1",
                 "roc_auc": "ROC AUC", "top5": "Top-5"}


def make_row(features: str, method: str, budget, seed: int, result, n_train: int, pool_size: int,
             seconds: float) -> dict:
    """One flat row of ``results.json`` for one (features, method, label budget, seed).

    Args:
        budget: the ``LabelBudget``; a per-class budget reports the fraction of the training pool
            (``pool_size`` images) it amounted to as ``label_fraction``.
        result: the method's ``ProbeResult``; its ``metrics`` give balanced accuracy, macro-F1,
            ROC AUC and the per-class figures (``None`` where undefined, never NaN).
    """
    fraction = budget.fraction if budget.fraction is not None else round(n_train / pool_size, 6)
    return {
        "features": features,
        "method": method,
        "label_fraction": fraction,
        "label_budget": budget.label,
        "seed": seed,
        "top1": result.top1,
        "top5": result.top5,  # None with 5 classes or fewer
        "balanced_accuracy": result.metrics.get("balanced_accuracy"),
        "macro_f1": result.metrics.get("macro_f1"),
        "roc_auc": result.metrics.get("roc_auc"),
        "n_train": n_train,
        "n_test": len(result.predictions),
        "val_top1": result.val_top1,
        "chosen": result.chosen,
        "seconds": round(seconds, 3),
        "per_class": result.metrics.get("per_class"),
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
    """``(method, label budget, features) -> {mean, std, seeds, n_train}`` of ``metric`` over seeds.

    A ``None`` value (a metric undefined for that run, such as top-5 with 5 classes or fewer, or
    missing from an older ``results.json``) is left out; a group with no value gets no entry, and
    ``seeds`` counts the values that went into the mean.
    """
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["label_budget"], row["features"]), []).append(row)
    summary = {}
    for key, group in groups.items():
        values = np.array([row[metric] for row in group if row.get(metric) is not None], dtype=np.float64)
        if len(values) == 0:
            continue
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


def _n_train(rows: list[dict], method: str, budget: str, columns: list[str]) -> int:
    """Mean training-set size over the seeds of the first kind of features with rows; read from
    the rows rather than a summary, since a metric may be undefined in every cell of a line."""
    for kind in columns:
        sizes = [row["n_train"] for row in rows
                 if (row["method"], row["label_budget"], row["features"]) == (method, budget, kind)]
        if sizes:
            return int(round(np.mean(sizes)))
    raise ValueError(f"no rows for {method} at {budget} labels")


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
            n_train = _n_train(rows, method, budget, columns)
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
    leaks = meta.get("leaks") or {}
    if leaks.get("checked") and leaks.get("leaked"):
        text += (f"\n\n**Leaks: {leaks['leaked']} of {leaks['n_test']} test images "
                 f"({100 * leaks['fraction']:.1f}%) are copies of training images** ({leaks['exact']} exact, "
                 f"{leaks['near']} near); they inflate every figure below. The pairs are in "
                 "results.json (`leaks`).")
    elif leaks.get("checked"):
        text += (f" No test image is an exact or near copy of a training image "
                 f"({leaks.get('similar_in_features', 0)} have a training image at ssl cosine >= "
                 f"{leaks.get('threshold')}, none of them the same picture in pixels).")
    return text


def _shows_top5(rows: list[dict], meta: dict) -> bool:
    """Top-5 is worth a table with more than 5 classes; with fewer every row is trivially right."""
    classes = meta.get("data", {}).get("classes")
    if classes is not None:
        return (classes if isinstance(classes, int) else len(classes)) > TOP5_ABOVE
    return any(row.get("top5") is not None for row in rows)  # a report without the class list


def _best_pretrained_row(rows: list[dict]) -> dict | None:
    """Seed-0 row of the pretrained features' best mean top-1 at the largest label budget: the
    run that ``evaluate`` draws the confusion matrix of."""
    pretrained = [row for row in rows if row["features"] not in BASELINE_FEATURES and row.get("per_class")]
    summary = summarise(pretrained)
    if not summary:
        return None
    largest = max(stats["n_train"] for stats in summary.values())
    best = max((key for key, stats in summary.items() if stats["n_train"] == largest),
               key=lambda key: summary[key]["mean"])
    return next((row for row in pretrained
                 if (row["method"], row["label_budget"], row["features"]) == best and row["seed"] == 0), None)


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def format_per_class(row: dict, class_names: list[str] | None = None) -> str:
    """A Markdown table of one row's per-class precision, recall and F1 (in %) and support.

    Args:
        row: a ``make_row`` row with ``per_class``.
        class_names: names in class order, shown instead of the class indices that ``per_class``
            holds when the methods were not given names.
    """
    per_class = row["per_class"]
    if class_names is None or len(class_names) != len(per_class):
        class_names = [entry["class"] for entry in per_class]
    lines = ["| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    for name, entry in zip(class_names, per_class):
        cells = [str(name).replace("|", "\\|"), _percent(entry["precision"]), _percent(entry["recall"]),
                 _percent(entry["f1"]), str(entry["support"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_markdown(rows: list[dict], meta: dict) -> str:
    """``results.md``: what was evaluated, a table per metric (top-5 only with more than 5
    classes), and the per-class figures of the best pretrained run."""
    seeds = max((row["seed"] for row in rows), default=0) + 1
    metrics = list(METRIC_TITLES) if _shows_top5(rows, meta) else [m for m in METRIC_TITLES if m != "top5"]
    lines = [
        "# Evaluation",
        "",
        _describe(meta),
        "",
        f"Test scores in %, mean ± std over {seeds} seed(s); ROC AUC is shown × 100 (50 is chance). "
        "The test set was scored once per configuration.",
        "",
        describe_validation(rows, meta),
        "",
        "With imbalanced classes read balanced accuracy (the mean recall of the classes), macro-F1 and "
        "ROC AUC rather than top-1, which rewards predicting the commonest class: always answering "
        "the majority class of a 1 : 3 test set scores 75% top-1 but 50% balanced accuracy.",
        "",
    ]
    for metric in metrics:
        lines += [f"## {METRIC_TITLES[metric]}", "", format_table(rows, metric), ""]
    best = _best_pretrained_row(rows)
    if best is not None:
        classes = meta.get("data", {}).get("classes")
        lines += [f"## Per class: {best['method']} on {best['features']} features, {best['label_budget']} labels "
                  "(seed 0)", "", format_per_class(best, classes if isinstance(classes, list) else None), ""]
    command = classifier_command(rows, meta)
    if command is not None:
        lines += ["## The classifier", "", command, ""]
    return "\n".join(lines)


def describe_validation(rows: list[dict], meta: dict) -> str:
    """How the hyper-parameters were chosen, and whether the figures are optimistic."""
    protocols = {(row.get("validation") or {}).get("protocol") for row in rows}
    n_val = meta.get("data", {}).get("n_val", 0)
    if "pool" in protocols:
        given = meta.get("data", {}).get("validation") == "given"
        if given:
            return (f"kNN's k and T, C, epochs and fine-tuning's learning rate were chosen on the {n_val} images of the validation set given "
                    f"(--val): they are labelled too, so each budget below used n_train + {n_val} labels.")
        return (f"**Optimistic (--validation pool):** kNN's k and T, C, epochs and fine-tuning's learning rate were chosen on {n_val} validation "
                "images held out of the whole labelled pool, outside each budget: a user with n_train labels does "
                "not have them, and the few-label figures read higher than such a user would get. The default "
                "(--validation cv) chooses inside the budget.")
    text = ("kNN's k and T, logistic regression's C, the epochs of the linear probe and fine-tuning and "
            "fine-tuning's learning rate were chosen inside each label budget: by stratified cross-validation over the n_train labelled images, then "
            "refit on all of them (results.json: `validation` and `chosen` of each row). No other label was used.")
    if "fixed" in protocols:
        text += (" Where no class had two labelled images nothing could be validated, and fixed settings were "
                 "used (the row's `validation.rule`).")
    return text


CLASSIFIER_MODES = ("linear", "finetune")
"""The methods ``ssl-finetune`` trains a classifier with (kNN and logistic regression it does not)."""


def _chosen_epochs(row: dict) -> int | None:
    chosen = row.get("chosen") or {}
    return chosen.get("epochs", chosen.get("best_epoch"))


def best_classifier(rows: list[dict], budget: str | None = None) -> dict | None:
    """The report's best ``linear`` / ``finetune`` configuration on the pretrained features, at
    ``budget`` or else the largest budget where one ran: ``{method, budget, epochs, mean, seeds}``
    with ``epochs`` the median of its seeds' chosen epochs, ``seed_epochs`` each seed's (None
    without such a row)."""
    candidates = [row for row in rows if row["features"] == "ssl" and row["method"] in CLASSIFIER_MODES
                  and _chosen_epochs(row) is not None and (budget is None or row["label_budget"] == budget)]
    summary = summarise(candidates)
    if not summary:
        return None
    largest = max(stats["n_train"] for stats in summary.values())
    method, label, _ = max((key for key, stats in summary.items() if stats["n_train"] == largest),
                           key=lambda key: summary[key]["mean"])
    group = [row for row in candidates if (row["method"], row["label_budget"]) == (method, label)]
    seed_epochs = [int(_chosen_epochs(row)) for row in sorted(group, key=lambda row: row["seed"])]
    epochs = sorted(seed_epochs)[(len(group) - 1) // 2]
    rates = [row["chosen"]["lr"] for row in group if "lr" in (row.get("chosen") or {})]
    best = {"method": method, "budget": label, "epochs": int(epochs), "mean": summary[(method, label, "ssl")]["mean"],
            "seeds": len(group), "seed_epochs": seed_epochs}
    if rates:  # the rate most seeds chose (fine-tuning chooses one inside each budget)
        best["lr"] = max(sorted(set(rates), reverse=True), key=rates.count)
    return best


def classifier_arguments(best: dict, settings: dict) -> list[str]:
    """``ssl-finetune`` flags that train ``best`` (``best_classifier``) as ``linear-probe`` did."""
    arguments = ["--mode", best["method"], "--epochs", str(best["epochs"])]
    if best["method"] == "linear":
        arguments += ["--lr", f"{settings.get('linear_lr', 0.1):g}", "--batch-size", str(settings.get("batch_size", 256))]
    else:
        arguments += ["--head-init", "random", "--backbone-lr-scale", "1", "--lr",
                      f"{best.get('lr') or settings.get('finetune_lr') or DEFAULT_FINETUNE_LR:g}",
                      "--batch-size", str(settings.get("train_batch_size", 64))]
    if not settings.get("hflip", True):
        arguments.append("--no-flip")
    return arguments + ["--validation", "none"]


def classifier_command(rows: list[dict], meta: dict) -> str | None:
    """The ``ssl-finetune`` command that trains, on every labelled image, the configuration of the
    report's best ``linear`` / ``finetune`` row on the pretrained features at the largest budget
    where one ran (``best_classifier``); ``--validation none`` since the report has chosen."""
    best = best_classifier(rows)
    if best is None:
        return None
    data = meta.get("data", {})
    checkpoint = (meta.get("checkpoint") or {}).get("path", "RUN")
    flags = classifier_arguments(best, meta.get("settings", {}))
    pairs = [" ".join(flags[i:i + 2]) if i + 1 < len(flags) and not flags[i + 1].startswith("--") else flags[i]
             for i in range(len(flags)) if flags[i].startswith("--")]
    command = (f"ssl-finetune --checkpoint {checkpoint} --train {data.get('train')} --out classifier \\\n        "
               + " ".join(pairs))
    return (f"The best classifier `ssl-finetune` can make, as measured here: {best['method']} on the pretrained "
            f"features at {best['budget']} labels ({100 * best['mean']:.1f}% top-1). To train it on all your "
            f"labelled images:\n\n    {command}\n\n(`--validation none`: the settings above were chosen here; "
            "leave out --mode and --epochs and ssl-finetune chooses them itself by cross-validation inside your labels.)"
            + (f" Each seed's labelled images chose their own epochs ({', '.join(map(str, best['seed_epochs']))}); "
               "the command takes the median, so its score can differ from the row by as much as those choices do."
               if len(set(best.get("seed_epochs", []))) > 1 else ""))


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
