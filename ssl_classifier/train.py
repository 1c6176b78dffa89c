"""A few labels -> a trained classifier, saved (``ssl-finetune``).

Two modes, as in the evaluation (``linear_probe``), but the model is kept:

- ``linear``: the backbone stays frozen; a linear head is trained on its features (extracted
  once), on standardised features (MAE's linear probe), and the standardisation is folded into
  the head when it is saved: one ``nn.Linear`` on the backbone's output.
- ``finetune``: the whole network trains on augmented images with a new linear head, every layer
  at one learning rate (0.05): ``linear-probe``'s fine-tuning, so that the report's figures are
  what ``ssl-finetune`` trains. ``head_init="probe"`` is LP-FT instead (Kumar et al. 2022): the
  head first trained as in ``linear``, then the backbone at a tenth of the head's rate (0.01).

By default (``--mode auto``) the mode and its epochs are chosen inside the label budget, by
cross-validation over the labelled images, and the chosen mode is refit on all of them
(``ssl_classifier.fitting``); the metric is balanced accuracy, so that an imbalanced validation
part does not reward predicting the majority class. A test set, when given, is scored once,
after that choice.
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

from linear_probe.crossval import DEFAULT_FOLDS, TRAINING_FOLDS, plan_folds
from linear_probe.embeddings import extract_embeddings, fingerprint_module
from linear_probe.metrics import classification_metrics
from linear_probe.splits import LabelBudget, sample_label_subset, stratified_split
from ssl_classifier.fitting import PROBE_BACKBONE_LR_SCALE, Job, choose_and_fit, mode_defaults
from ssl_classifier.model import INFO_FILE, MODEL_FILE, ClassifierError, ClassifierInfo, save_classifier
from ssl_pretrain.augment.transforms import build_eval_transform
from ssl_pretrain.checkpoint import resolve_hflip
from ssl_pretrain.data import SubsetSource, check_same_classes, decoded_in_memory, open_source
from ssl_pretrain.engine.devices import resolve_device
from ssl_pretrain.models.warm_start import load_any_backbone

log = logging.getLogger(__name__)

MODES = ("linear", "finetune")
MODE_CHOICES = ("auto",) + MODES
VALIDATIONS = ("cv", "pool", "none")
"""cv: mode and epochs chosen by cross-validation inside the labels; pool: on --val-fraction held out
of them (those labels then train nothing); none: nothing held out, every epoch of the budget."""
HEAD_INITS = ("random", "probe")
BALANCING = ("auto", "weights", "none")
IMBALANCE_RATIO = 1.5
"""``balance: auto`` weights the loss when the largest class has this many times the images of
the smallest (1:1.5 already moves a majority-class guess 10 points above chance)."""


@dataclass
class FinetuneSettings:
    """Everything ``train_classifier`` can be told; the command line shows the same defaults.

    ``epochs`` and ``lr`` default per mode: linear 100 epochs at 0.1 (on features: fast);
    fine-tuning 30 epochs at 0.05 for a random head and the backbone alike (``linear-probe``'s
    fine-tuning); with ``head_init="probe"`` (LP-FT) 0.01 for the trained head and
    ``backbone_lr_scale`` (default 0.1) times that for the backbone.
    ``mode="auto"`` chooses between them inside the labels (``validation="cv"``).
    """

    arch: str | None = None  # read the checkpoint as a torchvision/timm state dict of this backbone
    mode: str = "auto"
    labels_per_class: int | None = None
    label_fraction: float | None = None
    validation: str = "cv"
    cv_folds: int = DEFAULT_FOLDS
    finetune_cv_folds: int = TRAINING_FOLDS
    head_init: str = "random"  # finetune: a random head (linear-probe's fine-tuning), or LP-FT's trained one
    val_fraction: float = 0.2
    balance: str = "auto"
    epochs: int | None = None
    lr: float | None = None
    backbone_lr_scale: float | None = None  # default: 1 with a random head, 0.1 with LP-FT's
    batch_size: int = 64
    patience: int | None = None
    input_size: int | None = None
    hflip: bool | None = None  # None: as pretraining did (the backbone's info), else flip
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    progress: bool = True
    overwrite: bool = False

    def __post_init__(self):
        if self.mode not in MODE_CHOICES:
            raise ClassifierError(f"unknown mode '{self.mode}': choose auto, linear or finetune")
        if self.validation not in VALIDATIONS:
            raise ClassifierError(f"unknown validation '{self.validation}': choose {', '.join(VALIDATIONS)}")
        if self.head_init not in HEAD_INITS:
            raise ClassifierError(f"unknown head init '{self.head_init}': choose {', '.join(HEAD_INITS)}")
        if self.cv_folds < 2 or self.finetune_cv_folds < 1:
            raise ClassifierError("cv-folds must be at least 2 and finetune-cv-folds at least 1")
        if self.balance not in BALANCING:
            raise ClassifierError(f"unknown balance '{self.balance}': choose {', '.join(BALANCING)}")
        if self.labels_per_class is not None and self.label_fraction is not None:
            raise ClassifierError("give --labels-per-class or --label-fraction, not both")
        if self.labels_per_class is not None and self.labels_per_class < 1:
            raise ClassifierError(f"labels-per-class must be at least 1, got {self.labels_per_class}")
        if self.label_fraction is not None and not 0 < self.label_fraction <= 1:
            raise ClassifierError(f"label-fraction must be in (0, 1], got {self.label_fraction}")
        for name in ("epochs", "batch_size", "input_size", "patience"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ClassifierError(f"{name.replace('_', '-')} must be at least 1, got {value}")
        if self.lr is not None and self.lr <= 0:
            raise ClassifierError(f"lr must be positive, got {self.lr}")
        if self.backbone_lr_scale is not None and self.backbone_lr_scale < 0:
            raise ClassifierError(f"backbone-lr-scale must be at least 0, got {self.backbone_lr_scale}")

    @property
    def backbone_scale(self) -> float:
        """The backbone's share of the head's learning rate: given, else 1 for a random head (one
        rate for every layer) and 0.1 for LP-FT's trained head."""
        if self.backbone_lr_scale is not None:
            return self.backbone_lr_scale
        return 1.0 if self.head_init == "random" else PROBE_BACKBONE_LR_SCALE

    @property
    def budget(self) -> LabelBudget | None:
        if self.labels_per_class is not None:
            return LabelBudget(per_class=self.labels_per_class)
        if self.label_fraction is not None and self.label_fraction < 1:
            return LabelBudget(fraction=self.label_fraction)
        return None

    def resolved(self, mode: str) -> dict[str, Any]:
        """The settings with ``mode``'s defaults filled in (what ``classifier.json`` records)."""
        values = asdict(self)
        defaults = mode_defaults(mode, self.head_init)
        values.update(mode=mode, requested_mode=self.mode, epochs=self.epochs or defaults["epochs"],
                      lr=self.lr or defaults["lr"],
                      patience=self.patience or defaults["patience"], backbone_lr_scale=self.backbone_scale)
        for transient in ("progress", "overwrite", "num_workers", "device"):
            values.pop(transient)
        return values


@dataclass
class LabelledSplits:
    """The labelled images by role; ``train`` is after the label budget."""

    train: SubsetSource
    val: SubsetSource | None
    test: SubsetSource | None
    classes: list[str]


@dataclass
class TrainedClassifier:
    info: ClassifierInfo
    model_dir: Path
    files: list[Path] = field(default_factory=list)
    seconds: float = 0.0


# ---------------------------------------------------------------------------------------------
# Data


def _open(spec: str, role: str):
    source = open_source(spec, labelled=True)
    if getattr(source, "labels", None) is None:
        raise ClassifierError(f"--{role} {spec} has no labels (class subfolders or a 'path,label' file)")
    return decoded_in_memory(source)


def open_splits(train: str, val: str | None, test: str | None, settings: FinetuneSettings) -> LabelledSplits:
    """Open the labelled sources, hold out validation (unless given), apply the label budget.

    Raises:
        ClassifierError: one class only, different class names, a validation split that leaves
            nothing to train on.
    """
    train_source = _open(train, "train")
    classes = list(train_source.classes)
    if len(classes) < 2:
        raise ClassifierError(f"--train {train} has {len(classes)} class ({', '.join(classes)}): "
                              "a classifier needs at least two")
    others = {}
    for role, spec in (("val", val), ("test", test)):
        if spec is not None:
            others[role] = _open(spec, role)
            check_same_classes(train_source, others[role], train, spec, role)
    pool = SubsetSource(train_source, np.arange(len(train_source)))
    val_images = SubsetSource(others["val"], np.arange(len(others["val"]))) if val else None
    if val is None and settings.validation == "pool" and settings.val_fraction > 0:
        # positions in the whole pool are positions in the source
        kept, held_out = stratified_split(pool.labels, settings.val_fraction, settings.seed + 1)
        pool, val_images = pool.subset(kept), pool.subset(held_out)
    if settings.budget is not None:
        pool = pool.subset(sample_label_subset(pool.labels, settings.budget, settings.seed))
    test_images = SubsetSource(others["test"], np.arange(len(others["test"]))) if test else None
    if val_images is not None and len(val_images) == 0:
        val_images = None
    return LabelledSplits(pool, val_images, test_images, classes)


def class_weights(labels: np.ndarray, num_classes: int, balance: str) -> torch.Tensor | None:
    """Cross-entropy weights ``n / (C * n_c)`` (scikit-learn's "balanced"), or None.

    ``auto`` weights only when the classes are imbalanced (``IMBALANCE_RATIO``).
    """
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    present = counts[counts > 0]
    ratio = present.max() / present.min()
    if balance == "none" or (balance == "auto" and ratio < IMBALANCE_RATIO):
        return None
    weights = np.where(counts > 0, counts.sum() / (num_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(weights, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# Training


MIN_INPUT_SIZE = 8
"""Below 8 px every backbone here pools a single padded pixel: it runs, but sees nothing."""


def check_input_size(backbone: nn.Module, input_size: int, architecture: str, pretrained_size: int) -> None:
    """A size the backbone cannot take is a one-line error now, not a traceback after the data
    is read: under ``MIN_INPUT_SIZE``, or one its forward pass refuses. A size far from the one
    it was pretrained at is allowed, with a warning (its features were learnt at that scale)."""
    if input_size < MIN_INPUT_SIZE:
        raise ClassifierError(f"input size {input_size} px does not fit the {architecture} backbone: "
                              f"at least {MIN_INPUT_SIZE} px (it was pretrained at {pretrained_size} px)")
    if not pretrained_size / 2 <= input_size <= pretrained_size * 2:
        log.warning("input size %d px, but the backbone was pretrained at %d px: its features may not transfer",
                    input_size, pretrained_size)
    try:
        with torch.no_grad():
            backbone.eval()(torch.zeros(2, 3, input_size, input_size))
    except (RuntimeError, ValueError) as error:  # ValueError: a ViT's patches do not tile the size
        first = str(error).strip().splitlines()[0][:160]
        raise ClassifierError(f"input size {input_size} px does not fit the {architecture} backbone: {first}") from None


# ---------------------------------------------------------------------------------------------
# The whole run


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if not overwrite and ((out_dir / INFO_FILE).exists() or (out_dir / MODEL_FILE).exists()):
        raise ClassifierError(f"{out_dir} already holds a classifier; pass --overwrite to replace it")


def _describe_counts(labels: np.ndarray, classes: list[str]) -> dict[str, int]:
    counts = np.bincount(labels, minlength=len(classes))
    return {name: int(count) for name, count in zip(classes, counts)}


def _score(network, source, transform, settings, device, classes) -> dict | None:
    """Metrics of the trained network on ``source`` (None without one)."""
    if source is None:
        return None
    embeddings = extract_embeddings(nn.Sequential(network.backbone, network.head), source, transform, batch_size=256,
                                    device=device, num_workers=settings.num_workers, progress=settings.progress)
    return classification_metrics(embeddings.features, embeddings.labels, len(classes), classes)


def held_out(splits: LabelledSplits, settings: FinetuneSettings) -> tuple[list, bool, dict]:
    """``(folds, refit, description)``: what the mode and epochs are chosen on."""
    if splits.val is not None:
        return [(splits.train, splits.val)], False, {"protocol": "pool", "n_val": len(splits.val)}
    if settings.validation == "none":
        return [], True, {"protocol": "none", "n_val": 0}
    plan = plan_folds(splits.train.labels, settings.seed, settings.cv_folds)
    if plan is None:
        log.warning("no class has two labelled images: nothing can be held out, so %s trains every epoch of its "
                    "budget", "linear" if settings.mode == "auto" else settings.mode)
        return [], True, {"protocol": "fixed", "n_val": 0}
    folds = [(splits.train.subset(fold.train), splits.train.subset(fold.val)) for fold in plan.folds]
    return folds, True, {**plan.describe(), "n_val": 0}


def train_classifier(checkpoint: str | Path, train: str, out_dir: str | Path, *, val: str | None = None,
                     test: str | None = None, settings: FinetuneSettings | None = None) -> TrainedClassifier:
    """Train a classifier on labelled images from a pretrained backbone; save it in ``out_dir``.

    Args:
        checkpoint: run folder, ``backbone.safetensors`` or ``checkpoints/last.pt``.
        train: labelled images: class subfolders, a ``path,label`` CSV/text file,
            ``builtin:digits:train``, ``cifar10:ROOT``.
        out_dir: gets ``classifier.safetensors`` and ``classifier.json`` (atomically, JSON last).
        val: labelled validation images; else ``settings.val_fraction`` of train is held out.
        test: labelled test images, scored once with the chosen epoch (optional).

    Raises:
        ClassifierError, CheckpointError, DataError, EvaluationError: one-line messages.
    """
    settings, started = settings or FinetuneSettings(), time.perf_counter()
    out_dir, device = Path(out_dir), resolve_device(settings.device)
    _check_out_dir(out_dir, settings.overwrite)
    backbone, binfo = load_any_backbone(checkpoint, settings.arch, settings.input_size or 224)
    settings = replace(settings, hflip=resolve_hflip(settings.hflip, binfo, log))
    input_size = settings.input_size or binfo.input_size
    check_input_size(backbone, input_size, binfo.architecture, binfo.input_size)
    splits = open_splits(train, val, test, settings)
    torch.manual_seed(settings.seed)
    weights = class_weights(splits.train.labels, len(splits.classes), settings.balance)
    counts = _describe_counts(splits.train.labels, splits.classes)
    log.info("training on %d labelled images (%s); %s", len(splits.train),
             ", ".join(f"{name}: {count}" for name, count in list(counts.items())[:12]),
             "classes imbalanced: loss weighted by n / (classes x n_class)" if weights is not None
             else "no class weighting")
    transform = build_eval_transform(input_size, binfo.mean, binfo.std)
    backbone = backbone.to(device)
    job = Job(backbone, binfo.feature_dim, len(splits.classes), binfo.mean, binfo.std, transform, settings, weights,
              device)
    folds, refit, validation = held_out(splits, settings)
    modes = MODES if settings.mode == "auto" else (settings.mode,)
    network, mode, chosen = choose_and_fit(job, modes, splits.train, folds, refit, settings.finetune_cv_folds)
    if settings.mode == "auto":
        log.info("chosen: %s (%s)", mode, validation.get("rule", validation["protocol"]))
    n_val = validation["n_val"]
    info = ClassifierInfo(
        classes=splits.classes, architecture=binfo.architecture, small_stem=binfo.small_stem,
        feature_dim=binfo.feature_dim, input_size=input_size, mean=binfo.mean, std=binfo.std, mode=mode,
        backbone={"checkpoint": str(checkpoint), "weights_sha256": fingerprint_module(backbone), "epoch": binfo.epoch},
        training={**settings.resolved(mode), "data": {"train": train, "val": val or (
                      f"{settings.val_fraction} of train" if validation["protocol"] == "pool" else None), "test": test},
                  "n_train": len(splits.train), "n_val": n_val, "labels_used": len(splits.train) + n_val,
                  "validation": validation, "train_counts": counts,
                  "class_weights": None if weights is None else weights.tolist(), **chosen},
        validation=_score(network, splits.val, transform, settings, device, splits.classes),
        test=_score(network, splits.test, transform, settings, device, splits.classes),
    )
    files = save_classifier(out_dir, network.cpu(), info)
    return TrainedClassifier(info, out_dir, files, time.perf_counter() - started)
