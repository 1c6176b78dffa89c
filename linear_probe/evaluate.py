"""The whole evaluation: checkpoint + labelled images -> one row per (label budget, seed, method,
features), with baselines beside every pretrained number.

Order of work, each step once: open and check the data; split off test (when no test folder is
given); extract embeddings once per kind of features and source (cached on disk); then for every
label budget and seed draw one labelled subset and its folds, shared by every method and every
kind of features, so that their numbers differ only by what they should.

Honesty rules kept here and in each method: hyper-parameters (kNN's k and T, logistic regression's
C) and epochs (linear probe, fine-tuning) are chosen on held-out labels *inside* the budget, by
cross-validation over the labelled subset, then refit on all of it (``linear_probe.crossval``);
the test set is scored once per configuration, after that choice. ``--validation pool`` chooses
on a validation share of the whole pool instead (the older, optimistic protocol).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from linear_probe.crossval import FIXED, FoldPlan, plan_folds, pool_plan
from linear_probe.embeddings import Embeddings, fingerprint_module, fingerprint_source
from linear_probe.errors import EvaluationError
from linear_probe.finetune import DEFAULT_LR, LR_GRID, evaluate_finetune
from linear_probe.knn_choice import evaluate_knn_folds
from linear_probe.inputs import (BASELINES, SEED_FREE_METHODS, EvaluationData, EvaluationSettings, build_feature_extractors,
                                 build_random_backbone, extract_feature_sets, open_evaluation_data)
from linear_probe.leaks import check_leaks
from linear_probe.linear import evaluate_linear_augmented, evaluate_linear_folds
from linear_probe.logreg import evaluate_logreg_folds
from linear_probe.report import format_table, make_row, summarise, write_report
from linear_probe.scoring import ProbeResult
from linear_probe.splits import LabelBudget, sample_label_subset, select_label_subset, uniform_label_subset
from ssl_pretrain.checkpoint import BackboneInfo, resolve_hflip
from ssl_pretrain.data import SubsetSource
from ssl_pretrain.engine.allocator import keep_freed_memory
from ssl_pretrain.engine.devices import resolve_device
from ssl_pretrain.models.warm_start import load_any_backbone

log = logging.getLogger(__name__)


@dataclass
class EvaluationResult:
    rows: list[dict]
    table: str
    out_dir: Path
    files: list[Path] = field(default_factory=list)



# ---------------------------------------------------------------------------------------------
# Methods


@dataclass
class _Context:
    """What every method run reads; built once by ``evaluate``."""

    data: EvaluationData
    feature_sets: dict[str, dict[str, Embeddings]]
    extractors: dict[str, tuple[nn.Module, Any]]
    backbone: nn.Module
    info: BackboneInfo
    settings: EvaluationSettings
    device: torch.device

    def features(self, kind: str, role: str, images: SubsetSource) -> Embeddings:
        """Rows of ``images`` (a subset of the ``role``'s source) in the ``kind`` embeddings."""
        return self.feature_sets[kind][self.data.source_keys[role]].take(images.indices)


def make_plan(context: _Context, labelled: SubsetSource, seed: int) -> FoldPlan | None:
    """How hyper-parameters are chosen for one labelled subset: folds inside it (``cv``), or the
    validation images outside the budget (``pool``, or the user's ``--val``)."""
    data, settings = context.data, context.settings
    if data.val is not None:
        return pool_plan(len(labelled), len(data.val), given=settings.validation != "pool")
    return plan_folds(labelled.labels, seed, settings.cv_folds)


def image_folds(context: _Context, plan: FoldPlan | None, labelled: SubsetSource) -> list[tuple[SubsetSource, SubsetSource]]:
    """``[(fold train images, fold val images)]`` of a plan (empty without one)."""
    if plan is None:
        return []
    if plan.protocol == "pool":
        return [(labelled, context.data.val)]
    return [(labelled.subset(fold.train), labelled.subset(fold.val)) for fold in plan.folds]


def feature_folds(context: _Context, kind: str, plan: FoldPlan | None, labelled: SubsetSource,
                  train: Embeddings) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``[(positions into train's rows, val features, val labels)]`` of a plan's folds; unreadable
    images (no embedding row) drop out of either part."""
    folds = []
    row_of = {int(index): row for row, index in enumerate(train.indices)}
    for fold_train, fold_val in image_folds(context, plan, labelled):
        role = "val" if plan.protocol == "pool" else "pool"
        val = context.features(kind, role, fold_val)
        positions = np.array([row_of[int(index)] for index in fold_train.indices if int(index) in row_of], np.int64)
        folds.append((positions, val.features, val.labels))
    return folds


def run_feature_method(context: _Context, method: str, kind: str, labelled: SubsetSource, seed: int,
                       plan: FoldPlan | None) -> tuple[ProbeResult, int]:
    """kNN, logistic regression or linear probe on ``kind`` features of the labelled subset, its
    settings chosen by ``plan``.

    Returns:
        The result and the number of labelled images it used.
    """
    settings, num_classes = context.settings, len(context.data.classes)
    train = context.features(kind, "pool", labelled)
    test = context.features(kind, "test", context.data.test)
    folds = feature_folds(context, kind, plan, labelled, train)
    refit = plan is None or plan.refit
    if method == "knn":
        return evaluate_knn_folds(train.features, train.labels, test.features, test.labels, num_classes, folds,
                                  k=settings.knn_k, temperature=settings.knn_temperature,
                                  backend=settings.knn_backend, device=context.device, index=settings.knn_index,
                                  nprobe=settings.knn_nprobe), len(train)
    if method == "logreg":
        return evaluate_logreg_folds(train.features, train.labels, test.features, test.labels, num_classes, folds,
                                     refit=refit, seed=seed), len(train)
    common = dict(epochs=settings.linear_epochs, lr=settings.linear_lr, batch_size=settings.batch_size,
                  seed=seed, device=context.device)
    if settings.linear_augment:
        module, _ = context.extractors[kind]
        common["batch_size"] = settings.train_batch_size
        image_parts = image_folds(context, plan, labelled)
        augmented = [(images, train.features[positions], vx, vy)
                     for (images, _), (positions, vx, vy) in zip(image_parts, folds)]
        return evaluate_linear_augmented(
            module, labelled, train.features, None, None, test.features, test.labels,
            num_classes, context.info.input_size, context.info.mean, context.info.std,
            num_workers=settings.num_workers, hflip=settings.hflip, folds=augmented, refit=refit,
            **common), len(labelled)
    return evaluate_linear_folds(train.features, train.labels, test.features, test.labels, num_classes, folds,
                                 refit=refit, **common), len(train)


def run_finetune(context: _Context, kind: str, labelled: SubsetSource, seed: int,
                 plan: FoldPlan | None) -> tuple[ProbeResult, int]:
    """Fine-tune the pretrained backbone (``ssl``) or a random one (``scratch``, seeded); a
    ``cv`` plan is held to ``crossval.TRAINING_FOLDS`` scored folds (each is a training run)."""
    info, settings = context.info, context.settings
    backbone = context.backbone if kind == "ssl" else build_random_backbone(info, seed)
    if plan is not None and plan.protocol == "cv":
        plan = plan.limited(settings.finetune_cv_folds)
    result = evaluate_finetune(
        backbone, info.feature_dim, labelled, None, context.data.test, len(context.data.classes),
        info.input_size, info.mean, info.std, epochs=settings.finetune_epochs,
        lr=LR_GRID if settings.finetune_lr is None else settings.finetune_lr,
        batch_size=settings.train_batch_size, seed=seed, device=context.device,
        num_workers=settings.num_workers, hflip=settings.hflip,
        folds=image_folds(context, plan, labelled), refit=plan is None or plan.refit,
    )
    return result, len(labelled)


FIXED_SETTINGS = (f"kNN k={FIXED['knn_k']} T={FIXED['knn_temperature']}, logistic C={FIXED['C']:g}, "
                  f"the whole epoch budget for the linear probe and fine-tuning, fine-tuning at lr {DEFAULT_LR:g}")


def describe_plan(plan: FoldPlan | None, method: str, settings: EvaluationSettings) -> dict:
    """``row["validation"]``: how this row's settings were chosen and how many labels that used."""
    if plan is None:
        return {"protocol": "fixed", "rule": FIXED_SETTINGS, "n_val": 0}
    if plan.protocol == "cv" and method == "finetune":
        plan = plan.limited(settings.finetune_cv_folds)
    described = plan.describe()
    described["n_val"] = described["held_out"] if plan.protocol == "pool" else 0
    return described


def name_classes(row: dict, classes: list[str]) -> dict:
    """The row with class names instead of indices in its per-class figures."""
    if row.get("per_class") and len(row["per_class"]) == len(classes):
        row["per_class"] = [{**entry, "class": name} for entry, name in zip(row["per_class"], classes)]
    return row


def fine_tunes_at(budget: LabelBudget, pool_size: int, settings: EvaluationSettings) -> bool:
    """Whether fine-tuning (and its scratch baseline) runs at ``budget``: up to
    ``settings.finetune_max_fraction`` of the labelled pool. Fine-tuning with every label is a
    supervised training run (hours for CIFAR-10 on a CPU: 45,000 images x 30 epochs x seeds x 2),
    not a few-label measurement; the linear methods cover the full-label budget."""
    share = budget.fraction if budget.fraction is not None else budget.per_class * 1.0 / max(pool_size, 1)
    return share <= settings.finetune_max_fraction + 1e-9


def check_finetune_budgets(settings: EvaluationSettings, pool_size: int) -> None:
    """Log the budgets fine-tuning skips; refuse a protocol where it would run at none."""
    if "finetune" not in settings.methods:
        return
    skipped = [budget.label for budget in settings.label_budgets if not fine_tunes_at(budget, pool_size, settings)]
    if len(skipped) == len(settings.label_budgets):
        raise EvaluationError(
            f"fine-tuning runs at label budgets up to {settings.finetune_max_fraction:.0%} of the pool "
            f"(--finetune-max-fraction) and none of {', '.join(skipped)} is: pass --finetune-max-fraction 1.0 "
            f"to fine-tune with these")
    if skipped:
        log.info("fine-tuning and the scratch baseline run at budgets up to %.0f%% of the labels, not at %s "
                 "(--finetune-max-fraction 1.0 adds them)", 100 * settings.finetune_max_fraction, ", ".join(skipped))


def draw_labelled(context: _Context, budget: LabelBudget, seed: int) -> SubsetSource:
    """The labelled subset of one (budget, seed), shared by every method and kind of features:
    class-balanced at random, a uniform pick of the pool, or picked by ``settings.label_selection``
    from the pool's ssl embeddings (the last two without reading a label)."""
    pool, strategy = context.data.pool, context.settings.label_selection
    if strategy == "random":
        return pool.subset(sample_label_subset(pool.labels, budget, seed))
    if strategy == "uniform":
        chosen = pool.subset(uniform_label_subset(len(pool), budget, len(context.data.classes), seed))
        missing = len(context.data.classes) - len(np.unique(chosen.labels))
        log.info("uniform pick of %d images for %s labels, seed %d: %d class(es) without a label", len(chosen),
                 budget.label, seed, missing)
        return chosen
    embeddings = context.features("ssl", "pool", pool)  # unreadable images have no row
    rows = select_label_subset(embeddings.features, budget, len(context.data.classes), strategy, seed)
    position_in_pool = {int(index): position for position, index in enumerate(pool.indices)}
    chosen = pool.subset(np.sort([position_in_pool[int(index)] for index in embeddings.indices[rows]]))
    missing = len(context.data.classes) - len(np.unique(chosen.labels))
    log.info("%s picked %d images for %s labels, seed %d: %d class(es) without a label", strategy,
             len(chosen), budget.label, seed, missing)
    return chosen


def skip_reason(method: str, labelled: SubsetSource) -> str | None:
    """Why ``method`` cannot learn from ``labelled`` (a selection may miss classes), or None."""
    if method == "logreg" and len(np.unique(labelled.labels)) < 2:
        return "logistic regression needs labelled images of at least two classes"
    return None


def run_protocol(context: _Context) -> tuple[list[dict], dict]:
    """Every (label budget, seed, method, features) once.

    Returns:
        The rows, and ``(features, method, budget label) -> test predictions`` of seed 0, for the
        plots.
    """
    settings, data = context.settings, context.data
    rows, predictions, done = [], {}, {}
    for budget in settings.label_budgets:
        for seed in range(settings.seeds):
            labelled = draw_labelled(context, budget, seed)
            plan = make_plan(context, labelled, seed)
            if plan is None:
                log.warning("%s labels, seed %d: no class has two labelled images, so nothing can be validated "
                            "inside the budget: fixed settings (%s)", budget.label, seed, FIXED_SETTINGS)
            for method in settings.methods:
                if method == "finetune" and not fine_tunes_at(budget, len(data.pool), settings):
                    continue
                if (reason := skip_reason(method, labelled)) is not None:
                    log.warning("%s skipped at %s labels, seed %d: %s", method, budget.label, seed, reason)
                    continue
                kinds = ("ssl",) + (BASELINES[method] if settings.baselines else ())
                for kind in kinds:
                    start, key = time.perf_counter(), (method, kind, labelled.indices.tobytes())
                    if key in done:
                        result, n_train = done[key]
                    elif method == "finetune":
                        result, n_train = run_finetune(context, kind, labelled, seed, plan)
                    else:
                        result, n_train = run_feature_method(context, method, kind, labelled, seed, plan)
                    if method in SEED_FREE_METHODS:
                        done.setdefault(key, (result, n_train))
                    row = make_row(kind, method, budget, seed, result, n_train, len(data.pool),
                                   time.perf_counter() - start)
                    row["validation"] = describe_plan(plan, method, settings)
                    rows.append(name_classes({**row, "label_selection": settings.label_selection}, data.classes))
                    log.info("%s on %s features, %s labels, seed %d: top-1 %.1f%%",
                             method, kind, budget.label, seed, 100 * result.top1)
                    if seed == 0:
                        predictions[(kind, method, budget.label)] = result.predictions
    return rows, predictions


def run_leak_check(context: _Context) -> dict:
    """``results.json["leaks"]``: test images that are copies of training or validation images,
    with a warning in the log when there are any (``linear_probe.leaks``)."""
    data = context.data
    if not context.settings.leak_check:
        return {"checked": False, "reason": "--no-leak-check"}
    start = time.perf_counter()
    train = [(images, context.features("ssl", role, images))
             for role, images in (("pool", data.pool), ("val", data.val)) if images is not None]
    check = check_leaks(train, (data.test, context.features("ssl", "test", data.test)))
    log.info("leak check: %d of %d test images are exact or near copies of training images (%d exact, %d near; "
             "%d at ssl cosine >= %g) in %.1f s", check.leaked, check.n_test, check.exact, check.near,
             check.similar_in_features, check.threshold, time.perf_counter() - start)
    if (message := check.warning()) is not None:
        log.warning(message)
    return check.to_dict()


# ---------------------------------------------------------------------------------------------
# The whole evaluation


def _best_pretrained(rows: list[dict]) -> tuple[str, str] | None:
    """``(method, budget label)`` of the best mean ssl top-1 at the largest label budget."""
    ssl = {key: stats for key, stats in summarise(rows).items() if key[2] == "ssl"}
    if not ssl:
        return None
    largest = max(stats["n_train"] for stats in ssl.values())
    method, budget, _ = max((key for key, stats in ssl.items() if stats["n_train"] == largest),
                            key=lambda key: ssl[key]["mean"])
    return method, budget


def make_plots(context: _Context, rows: list[dict], predictions: dict, out_dir: Path) -> list[Path]:
    """The four figures of ``linear_probe.plots`` for this evaluation."""
    from linear_probe import plots  # matplotlib is imported only when plots are wanted

    data = context.data
    test = context.features("ssl", "test", data.test)
    pool = context.features("ssl", "pool", data.pool)
    files = [plots.plot_label_efficiency(rows, out_dir / "label_efficiency.png"),
             plots.plot_embedding_map(test.features, test.labels, data.classes, out_dir / "embedding_map.png")]
    best = _best_pretrained(rows)
    if best is not None:
        method, budget = best
        files.append(plots.plot_confusion_matrix(
            test.labels, predictions[("ssl", method, budget)], data.classes,
            f"{method} on ssl features, {budget} labels (seed 0)", out_dir / "confusion_matrix.png"))
    files.append(plots.plot_nearest_neighbours(
        SubsetSource(data.test.source, test.indices), test.features,
        SubsetSource(data.pool.source, pool.indices), pool.features, out_dir / "nearest_neighbours.png"))
    return files


def _describe_run(checkpoint, info: BackboneInfo, specs: dict, data: EvaluationData, fingerprints: dict,
                  settings: EvaluationSettings) -> dict:
    """Everything beside the rows that ``results.json`` records."""
    return {
        "checkpoint": {"path": str(checkpoint), "weights_sha256": fingerprints["ssl"], **asdict(info)},
        "data": {**specs, "classes": data.classes, "n_pool": len(data.pool),
                 "n_val": len(data.val) if data.val is not None else 0, "n_test": len(data.test),
                 "fingerprints": {key: fingerprints[key] for key in data.sources}},
        "settings": {**asdict(settings), "label_budgets": [budget.label for budget in settings.label_budgets]},
    }


def evaluate(checkpoint: str | Path, train: str, out_dir: str | Path, *, test: str | None = None,
             val: str | None = None, settings: EvaluationSettings | None = None,
             arch: str | None = None, input_size: int = 224) -> EvaluationResult:
    """Evaluate a pretrained backbone on labelled images; write ``results.json``, ``results.md``
    and the plots into ``out_dir``.

    Args:
        checkpoint: run folder, ``backbone.safetensors`` or ``checkpoints/last.pt``; the
            architecture, input size and normalisation come from it.
        train: labelled source (image-folder layout, ``builtin:digits:train``, ``cifar10:ROOT``).
        out_dir: created if needed; cached embeddings go to ``out_dir/embeddings``.
        test: labelled source; when None, ``settings.test_fraction`` of train is held out.
        val: labelled source to choose settings on (counted in the budget the report states);
            when None, ``settings.validation`` decides: ``cv`` (folds inside each budget) or
            ``pool`` (``settings.val_fraction`` of train held out, outside the budget).
        arch, input_size: read ``checkpoint`` as a foreign state dict (torchvision, timm) of this
            architecture, fed ``input_size`` px images (``ssl_pretrain.models.warm_start``).

    Raises:
        CheckpointError, DataError, EvaluationError: unusable inputs (one-line messages).
    """
    settings = settings or EvaluationSettings()
    out_dir, device = Path(out_dir), resolve_device(settings.device)
    if device.type == "cpu":
        keep_freed_memory()  # as pretraining does: no page faults for every batch's activations
    backbone, info = load_any_backbone(checkpoint, arch, input_size)
    settings = replace(settings, hflip=resolve_hflip(settings.hflip, info, log))
    data = open_evaluation_data(train, test, val, settings)
    check_finetune_budgets(settings, len(data.pool))
    extractors = build_feature_extractors(backbone.to(device), info, settings)
    # Weights and data are hashed once: for the cache file names and for results.json.
    fingerprints = {key: fingerprint_source(source) for key, source in data.sources.items()}
    fingerprints.update({kind: fingerprint_module(module) for kind, (module, _) in extractors.items()})
    fingerprints.setdefault("ssl", fingerprint_module(backbone))
    cache_dir = out_dir / "embeddings" if settings.cache else None
    feature_sets = extract_feature_sets(extractors, data, cache_dir, fingerprints, settings, device)
    context = _Context(data, feature_sets, extractors, backbone, info, settings, device)
    leaks = run_leak_check(context)
    rows, predictions = run_protocol(context)
    if not rows:
        raise EvaluationError("every run was skipped (see the warnings): the labelled subsets hold a single "
                              "class; give a larger label budget or more methods")
    specs = {"train": train, "test": test or f"{settings.test_fraction} of train",
             "val": val or (f"{settings.val_fraction} of train" if data.val is not None else None),
             "validation": "given" if val else settings.validation}
    meta = {**_describe_run(checkpoint, info, specs, data, fingerprints, settings), "leaks": leaks}
    files = write_report(out_dir, rows, meta)
    if settings.plots:
        files += make_plots(context, rows, predictions, out_dir)
    return EvaluationResult(rows, format_table(rows), out_dir, files)
