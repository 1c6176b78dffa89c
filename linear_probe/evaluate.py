"""The whole evaluation: checkpoint + labelled images -> one row per (label budget, seed, method,
features), with baselines beside every pretrained number.

Order of work, each step once: open and check the data; split off validation (and test, when no
test folder is given); extract embeddings once per kind of features and source (cached on disk);
then for every label budget and seed draw one class-balanced labelled subset, shared by every
method and every kind of features, so that their numbers differ only by what they should.

Honesty rules kept here and in each method: hyper-parameters (logistic regression's C) and epochs
(linear probe, fine-tuning) are chosen on validation data; the test set is scored once per
configuration, after that choice.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from linear_probe.embeddings import Embeddings, cached_embeddings, extract_embeddings, fingerprint_module, fingerprint_source
from linear_probe.errors import EvaluationError
from linear_probe.finetune import evaluate_finetune
from linear_probe.knn import INDEXES, evaluate_knn
from linear_probe.leaks import check_leaks
from linear_probe.linear import evaluate_linear, evaluate_linear_augmented
from linear_probe.logreg import evaluate_logreg
from linear_probe.report import format_table, make_row, summarise, write_report
from linear_probe.scoring import ProbeResult
from linear_probe.splits import (LABEL_SELECTIONS, LabelBudget, parse_label_budgets, sample_label_subset,
                                 select_label_subset, stratified_split)
from ssl_pretrain.engine.allocator import keep_freed_memory
from ssl_pretrain.models.backbones import build_backbone
from ssl_pretrain.checkpoint import BackboneInfo
from ssl_pretrain.data import DecodedSource, SubsetSource, common_small_size, decode_workers, open_source
from ssl_pretrain.train import TENSOR_PIPELINE_AUTO_BYTES
from ssl_pretrain.augment.transforms import build_eval_transform
from ssl_pretrain.models.warm_start import load_any_backbone

log = logging.getLogger(__name__)

METHODS = ("knn", "logreg", "linear", "finetune")
BASELINES = {
    "knn": ("random_init", "pixels"),
    "logreg": ("random_init", "pixels"),
    "linear": ("random_init",),
    "finetune": ("scratch",),
}
"""Features each method is also run on: the same architecture with random weights, raw pixels,
and, for fine-tuning, the same network trained from scratch on the same labels."""
SEED_FREE_METHODS = ("knn", "logreg")
"""Methods whose result depends on the labelled images alone (lbfgs is deterministic): where two
seeds draw the same images (at 100% labels every seed does) they run once, and the row is repeated."""
PIXEL_SIZE_CAP = 16
"""Raw-pixel baseline at the checkpoint's input size, but at most 16 px (768 values). At 224 px
it would be 150,528 values per image, too many for kNN and logistic regression to be useful; and
on CIFAR-10 the smaller image is the *stronger* baseline as well as the cheaper one
(``python scripts/bench_pixels.py``; BENCHMARKS.md, "Evaluation"). 16 px rather than 8 because
the cap applies to every dataset and only CIFAR-10 was measured: 8 px may erase detail that
other images need."""
IN_MEMORY_BYTES = TENSOR_PIPELINE_AUTO_BYTES
"""Small images of one size are decoded once into memory for extraction up to this many bytes
(CIFAR-10's 60,000 images: 184 MB): the limit of ``data.pipeline=auto`` in pretraining."""


@dataclass
class EvaluationSettings:
    """Everything ``evaluate`` can be told; the defaults are the ones the command line shows."""

    methods: tuple[str, ...] = METHODS
    label_budgets: tuple[LabelBudget, ...] = parse_label_budgets("0.01,0.1,1.0")
    seeds: int = 3
    label_selection: str = "random"  # or a strategy of ssl_curate.selection on the ssl embeddings
    val_fraction: float = 0.1
    test_fraction: float | None = None
    split_seed: int = 0
    knn_k: int = 200
    knn_temperature: float = 0.1
    knn_backend: str = "auto"
    knn_index: str = "auto"  # exact below knn.EXACT_BELOW training features, IVF from there
    knn_nprobe: int | None = None  # IVF lists scanned per query; None: knn.DEFAULT_NPROBE
    linear_epochs: int = 100
    linear_lr: float = 0.1
    linear_augment: bool = False
    hflip: bool = True
    finetune_epochs: int = 30
    finetune_max_fraction: float = 0.1  # fine-tune (and scratch) only at budgets up to this share
    finetune_lr: float = 0.05
    batch_size: int = 256
    train_batch_size: int = 64
    device: str = "auto"
    num_workers: int = 0
    baselines: bool = True
    plots: bool = True
    leak_check: bool = True  # count test images that are copies of training images (linear_probe.leaks)
    cache: bool = True
    progress: bool = True

    def __post_init__(self):
        unknown = [method for method in self.methods if method not in METHODS]
        if unknown or not self.methods:
            raise EvaluationError(f"unknown method(s) {', '.join(unknown) or '(none)'}: choose from {', '.join(METHODS)}")
        if self.label_selection not in LABEL_SELECTIONS:
            raise EvaluationError(f"unknown label selection '{self.label_selection}': choose from "
                                  f"{', '.join(LABEL_SELECTIONS)}")
        for name in ("seeds", "knn_k", "linear_epochs", "finetune_epochs", "batch_size", "train_batch_size"):
            if getattr(self, name) < 1:
                raise EvaluationError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.finetune_max_fraction <= 1:
            raise EvaluationError(f"finetune-max-fraction must be in (0, 1], got {self.finetune_max_fraction}")
        if self.knn_temperature <= 0:
            raise EvaluationError(f"knn temperature must be positive, got {self.knn_temperature}")
        if self.knn_backend not in ("auto", "torch", "faiss"):
            raise EvaluationError(f"unknown kNN backend '{self.knn_backend}' (auto, torch or faiss)")
        if self.knn_index not in INDEXES:
            raise EvaluationError(f"unknown kNN index '{self.knn_index}' ({', '.join(INDEXES)})")
        if self.knn_index in ("ivf", "hnsw") and self.knn_backend == "torch":
            raise EvaluationError(f"the kNN index '{self.knn_index}' needs the faiss back-end, not torch")
        if self.knn_nprobe is not None and self.knn_nprobe < 1:
            raise EvaluationError(f"knn-nprobe must be at least 1, got {self.knn_nprobe}")

    @property
    def needs_validation(self) -> bool:
        return any(method in self.methods for method in ("logreg", "linear", "finetune"))


@dataclass
class EvaluationData:
    """The labelled images, split by role; ``source_keys`` names the opened source of each role."""

    pool: SubsetSource  # labelled subsets are drawn from these
    val: SubsetSource | None
    test: SubsetSource
    classes: list[str]
    sources: dict[str, Any]
    source_keys: dict[str, str]


@dataclass
class EvaluationResult:
    rows: list[dict]
    table: str
    out_dir: Path
    files: list[Path] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Data


def _open_labelled(spec: str, role: str):
    source = open_source(spec, labelled=True)
    if getattr(source, "labels", None) is None:
        raise EvaluationError(f"--{role} {spec} has no labels (need one subfolder per class)")
    return source


def _data_identity(spec: str) -> str:
    """The same folder however it is written (``data/train``, ``./data/train/``)."""
    return str(Path(spec).resolve()) if Path(spec).exists() else spec


def check_same_classes(train, other, train_spec: str, other_spec: str, role: str) -> None:
    """Train and test (or val) must name the same classes, or label ``3`` would mean two things."""
    if list(train.classes) == list(other.classes):
        return
    only_other = sorted(set(other.classes) - set(train.classes))
    only_train = sorted(set(train.classes) - set(other.classes))
    problems = [f"{role} classes missing from train: {', '.join(only_other[:8])}" if only_other else "",
                f"train classes missing from {role}: {', '.join(only_train[:8])}" if only_train else ""]
    detail = "; ".join(problem for problem in problems if problem) or "the same names in another order"
    raise EvaluationError(f"{other_spec} and {train_spec} have different classes ({detail})")


def open_evaluation_data(train: str, test: str | None, val: str | None, settings: EvaluationSettings) -> EvaluationData:
    """Open the labelled sources and split them: test (if no ``test`` given), then validation.

    Raises:
        DataError: a missing folder, no class subfolders, an empty class.
        EvaluationError: different class names, or no way to get test / validation images.
    """
    specs = [spec for spec in (train, test, val) if spec is not None]
    if len({_data_identity(spec) for spec in specs}) < len(specs):
        raise EvaluationError("train, test and validation must be different data; give a --test-fraction "
                              "or --val-fraction to split one labelled set")
    sources = {"train": _open_labelled(train, "train")}
    for role, spec in (("test", test), ("val", val)):
        if spec is not None:
            sources[role] = _open_labelled(spec, role)
            check_same_classes(sources["train"], sources[role], train, spec, role)
    pool = SubsetSource(sources["train"], np.arange(len(sources["train"])))
    keys = {"pool": "train", "test": "test" if test else "train", "val": "val" if val else "train"}
    if test is None:
        if settings.test_fraction is None:
            raise EvaluationError("give a test set (--test DIR) or split one off train (--test-fraction 0.2)")
        kept, held_out = stratified_split(pool.labels, settings.test_fraction, settings.split_seed, "test")
        pool, test_images = pool.subset(kept), pool.subset(held_out)
    else:
        test_images = SubsetSource(sources["test"], np.arange(len(sources["test"])))
    val_images = SubsetSource(sources["val"], np.arange(len(sources["val"]))) if val else None
    if val is None and settings.needs_validation:
        if not 0 < settings.val_fraction < 1:
            raise EvaluationError("logreg, linear and finetune choose hyper-parameters on validation data: "
                                  "give --val DIR or a --val-fraction between 0 and 1")
        kept, held_out = stratified_split(pool.labels, settings.val_fraction, settings.split_seed + 1, "validation")
        pool, val_images = pool.subset(kept), pool.subset(held_out)
    classes = list(sources["train"].classes) or [str(c) for c in range(int(sources["train"].labels.max()) + 1)]
    return EvaluationData(pool, val_images, test_images, classes, sources, keys)


# ---------------------------------------------------------------------------------------------
# Features


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA, then MPS, then CPU; anything else must be a usable torch device."""
    from ssl_pretrain.config import ConfigError
    from ssl_pretrain.train import resolve_device as resolve

    try:
        return resolve(name)
    except ConfigError as error:
        raise EvaluationError(str(error)) from None


def build_random_backbone(info: BackboneInfo, seed: int) -> nn.Module:
    """The checkpoint's architecture with fresh random weights, the same for the same seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone, _ = build_backbone(info.architecture, info.small_stem, info.input_size)
    return backbone.eval()


def build_feature_extractors(backbone: nn.Module, info: BackboneInfo, settings: EvaluationSettings):
    """``kind -> (module, eval transform)`` for every kind of features some method needs."""
    transform = build_eval_transform(info.input_size, info.mean, info.std)
    feature_methods = [method for method in settings.methods if method != "finetune"]
    extractors = {}
    if feature_methods or settings.plots or settings.leak_check or settings.label_selection != "random":
        # the leak check and label selection read ssl embeddings
        extractors["ssl"] = (backbone, transform)
    wanted = {kind for method in feature_methods for kind in BASELINES[method]} if settings.baselines else set()
    if "random_init" in wanted:
        extractors["random_init"] = (build_random_backbone(info, settings.split_seed), transform)
    if "pixels" in wanted:
        size = min(info.input_size, PIXEL_SIZE_CAP)
        extractors["pixels"] = (nn.Flatten(), build_eval_transform(size, info.mean, info.std))
    return extractors


def extract_feature_sets(extractors, data: EvaluationData, cache_dir: Path | None, fingerprints: dict,
                         settings: EvaluationSettings, device) -> dict[str, dict[str, Embeddings]]:
    """``kind -> source key -> Embeddings`` of whole sources (roles pick their rows later).

    Args:
        fingerprints: ``kind`` and source key -> fingerprint, for the cache file names.
    """
    options = dict(batch_size=settings.batch_size, device=device, num_workers=settings.num_workers,
                   progress=settings.progress)
    feature_sets: dict[str, dict[str, Embeddings]] = {}
    # Small images of one size are decoded once and shared by every kind of features (a JPEG's
    # decoding costs more than a small backbone's forward pass); lazily, so a cache hit reads none.
    sources = {key: decoded_in_memory(source) for key, source in data.sources.items()}
    for kind, (module, transform) in extractors.items():
        module.to(device)
        feature_sets[kind] = {}
        for key, source in sources.items():
            log.info("embeddings: %s features of %s (%d images)", kind, key, len(source))
            if cache_dir is None:
                embeddings = extract_embeddings(module, source, transform, **options)
            else:
                embeddings = cached_embeddings(cache_dir, f"{kind}-{key}", fingerprints[kind],
                                               fingerprints[key], module, source, transform, **options)
            feature_sets[kind][key] = embeddings
    return feature_sets


def decoded_in_memory(source):
    """``source`` as a ``DecodedSource`` when its images are small (up to 64 px) and of one size,
    and all of them fit in ``IN_MEMORY_BYTES``; else ``source`` itself."""
    size = common_small_size(source)
    if size is None or len(source) * size[0] * size[1] * 3 > IN_MEMORY_BYTES:
        return source
    return DecodedSource(source, size, workers=decode_workers())


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


def run_feature_method(context: _Context, method: str, kind: str, labelled: SubsetSource, seed: int) -> tuple[ProbeResult, int]:
    """kNN, logistic regression or linear probe on ``kind`` features of the labelled subset.

    Returns:
        The result and the number of labelled images it used.
    """
    settings, num_classes = context.settings, len(context.data.classes)
    train = context.features(kind, "pool", labelled)
    test = context.features(kind, "test", context.data.test)
    if method == "knn":
        return evaluate_knn(train.features, train.labels, test.features, test.labels, num_classes,
                            k=settings.knn_k, temperature=settings.knn_temperature,
                            backend=settings.knn_backend, device=context.device, index=settings.knn_index,
                            nprobe=settings.knn_nprobe), len(train)
    val = context.features(kind, "val", context.data.val)
    if method == "logreg":
        return evaluate_logreg(train.features, train.labels, val.features, val.labels, test.features,
                               test.labels, num_classes, seed=seed), len(train)
    common = dict(epochs=settings.linear_epochs, lr=settings.linear_lr, batch_size=settings.batch_size,
                  seed=seed, device=context.device)
    if settings.linear_augment:
        module, _ = context.extractors[kind]
        common["batch_size"] = settings.train_batch_size
        return evaluate_linear_augmented(
            module, labelled, train.features, val.features, val.labels, test.features, test.labels,
            num_classes, context.info.input_size, context.info.mean, context.info.std,
            num_workers=settings.num_workers, hflip=settings.hflip, **common), len(labelled)
    return evaluate_linear(train.features, train.labels, val.features, val.labels, test.features,
                           test.labels, num_classes, **common), len(train)


def run_finetune(context: _Context, kind: str, labelled: SubsetSource, seed: int) -> tuple[ProbeResult, int]:
    """Fine-tune the pretrained backbone (``ssl``) or a random one (``scratch``, seeded)."""
    info, settings = context.info, context.settings
    backbone = context.backbone if kind == "ssl" else build_random_backbone(info, seed)
    result = evaluate_finetune(
        backbone, info.feature_dim, labelled, context.data.val, context.data.test, len(context.data.classes),
        info.input_size, info.mean, info.std, epochs=settings.finetune_epochs, lr=settings.finetune_lr,
        batch_size=settings.train_batch_size, seed=seed, device=context.device,
        num_workers=settings.num_workers, hflip=settings.hflip,
    )
    return result, len(labelled)


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
    class-balanced at random, or picked by ``settings.label_selection`` from the pool's ssl
    embeddings without reading a label."""
    pool, strategy = context.data.pool, context.settings.label_selection
    if strategy == "random":
        return pool.subset(sample_label_subset(pool.labels, budget, seed))
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
                        result, n_train = run_finetune(context, kind, labelled, seed)
                    else:
                        result, n_train = run_feature_method(context, method, kind, labelled, seed)
                    if method in SEED_FREE_METHODS:
                        done.setdefault(key, (result, n_train))
                    row = make_row(kind, method, budget, seed, result, n_train, len(data.pool),
                                   time.perf_counter() - start)
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
        val: labelled source; when None, ``settings.val_fraction`` of train is held out.
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
             "val": val or (f"{settings.val_fraction} of train" if data.val is not None else None)}
    meta = {**_describe_run(checkpoint, info, specs, data, fingerprints, settings), "leaks": leaks}
    files = write_report(out_dir, rows, meta)
    if settings.plots:
        files += make_plots(context, rows, predictions, out_dir)
    return EvaluationResult(rows, format_table(rows), out_dir, files)
