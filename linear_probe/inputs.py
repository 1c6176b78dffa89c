"""What an evaluation reads, prepared once: its settings, the labelled images split by role
(``open_evaluation_data``) and the features of every kind some method needs
(``build_feature_extractors``, ``extract_feature_sets``: the pretrained backbone, the same
architecture with random weights, raw pixels), cached on disk.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from linear_probe.crossval import DEFAULT_FOLDS, PROTOCOLS, TRAINING_FOLDS
from linear_probe.embeddings import Embeddings, cached_embeddings, extract_embeddings
from linear_probe.errors import EvaluationError
from linear_probe.knn import INDEXES
from linear_probe.splits import EMBEDDING_SELECTIONS, LABEL_SELECTIONS, LabelBudget, parse_label_budgets, stratified_split
from ssl_pretrain.augment.transforms import build_eval_transform
from ssl_pretrain.checkpoint import BackboneInfo
from ssl_pretrain.data import SubsetSource, open_source
from ssl_pretrain.data.decoding import decoded_in_memory
from ssl_pretrain.data.sources import check_same_classes
from ssl_pretrain.models.backbones import build_backbone

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

@dataclass
class EvaluationSettings:
    """Everything ``evaluate`` can be told; the defaults are the ones the command line shows."""

    methods: tuple[str, ...] = METHODS
    label_budgets: tuple[LabelBudget, ...] = parse_label_budgets("0.01,0.1,1.0")
    seeds: int = 3
    label_selection: str = "random"  # or a strategy of ssl_curate.selection on the ssl embeddings
    validation: str = "cv"  # cv: chosen inside the label budget; pool: on val_fraction of the pool (optimistic)
    cv_folds: int = DEFAULT_FOLDS
    finetune_cv_folds: int = TRAINING_FOLDS  # folds scored by fine-tuning: each is a training run
    val_fraction: float = 0.1
    test_fraction: float | None = None
    split_seed: int = 0
    knn_k: int | None = None  # None: chosen with the temperature (linear_probe.knn_choice)
    knn_temperature: float | None = None
    knn_backend: str = "auto"
    knn_index: str = "auto"  # exact below knn.EXACT_BELOW training features, IVF from there
    knn_nprobe: int | None = None  # IVF lists scanned per query; None: knn.DEFAULT_NPROBE
    linear_epochs: int = 100
    linear_lr: float = 0.1
    linear_augment: bool = False
    hflip: bool | None = None  # None: as pretraining did (the backbone's info), else flip
    finetune_epochs: int = 30
    finetune_max_fraction: float = 0.1  # fine-tune (and scratch) only at budgets up to this share
    finetune_lr: float | None = None  # None: chosen from finetune.LR_GRID inside the budget
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
        if self.validation not in PROTOCOLS:
            raise EvaluationError(f"unknown validation protocol '{self.validation}': choose {' or '.join(PROTOCOLS)}")
        if self.cv_folds < 2:
            raise EvaluationError(f"cv-folds must be at least 2, got {self.cv_folds}")
        for name in ("seeds", "knn_k", "linear_epochs", "finetune_epochs", "batch_size", "train_batch_size",
                     "finetune_cv_folds"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise EvaluationError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.finetune_max_fraction <= 1:
            raise EvaluationError(f"finetune-max-fraction must be in (0, 1], got {self.finetune_max_fraction}")
        if self.knn_temperature is not None and self.knn_temperature <= 0:
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
        """Whether a validation split is held out of the pool: the ``pool`` protocol only (``cv``
        chooses inside each label budget, kNN included)."""
        return self.validation == "pool"


@dataclass
class EvaluationData:
    """The labelled images, split by role; ``source_keys`` names the opened source of each role."""

    pool: SubsetSource  # labelled subsets are drawn from these
    val: SubsetSource | None
    test: SubsetSource
    classes: list[str]
    sources: dict[str, Any]
    source_keys: dict[str, str]



def _open_labelled(spec: str, role: str):
    source = open_source(spec, labelled=True)
    if getattr(source, "labels", None) is None:
        raise EvaluationError(f"--{role} {spec} has no labels (need one subfolder per class)")
    return source


def _data_identity(spec: str) -> str:
    """The same folder however it is written (``data/train``, ``./data/train/``)."""
    return str(Path(spec).resolve()) if Path(spec).exists() else spec


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
            raise EvaluationError("--validation pool chooses hyper-parameters on a validation share of the pool: "
                                  "give --val DIR or a --val-fraction between 0 and 1")
        kept, held_out = stratified_split(pool.labels, settings.val_fraction, settings.split_seed + 1, "validation")
        pool, val_images = pool.subset(kept), pool.subset(held_out)
    classes = list(sources["train"].classes) or [str(c) for c in range(int(sources["train"].labels.max()) + 1)]
    return EvaluationData(pool, val_images, test_images, classes, sources, keys)



# ---------------------------------------------------------------------------------------------
# Features


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
    if feature_methods or settings.plots or settings.leak_check or settings.label_selection in EMBEDDING_SELECTIONS:
        # the leak check and selection from the embeddings read ssl embeddings
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
