"""A few labels -> a trained classifier, saved (``ssl-finetune``).

Two modes, as in the evaluation (``linear_probe``), but the model is kept:

- ``linear``: the backbone stays frozen; a linear head is trained on its features (extracted
  once), on standardised features (MAE's linear probe), and the standardisation is folded into
  the head when it is saved: one ``nn.Linear`` on the backbone's output.
- ``finetune``: the head is first trained as in ``linear`` (LP-FT, Kumar et al. 2022: a trained
  head keeps fine-tuning from distorting good features with large random-head gradients), then
  the whole network trains on augmented images with the backbone at a lower learning rate.

Honesty rules, as in ``linear_probe``: the epoch is chosen on validation data (balanced accuracy,
so that an imbalanced validation set does not reward predicting the majority class); a test set,
when given, is scored once, after that choice.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from linear_probe.embeddings import extract_embeddings, fingerprint_module
from linear_probe.finetune import prepare_scoring, training_route
from linear_probe.linear import Standardise, feature_batches
from linear_probe.metrics import classification_metrics
from linear_probe.splits import LabelBudget, sample_label_subset, stratified_split
from linear_probe.training import train_with_early_stopping, validation_interval
from ssl_classifier.model import INFO_FILE, MODEL_FILE, ClassifierError, ClassifierInfo, ImageClassifier, save_classifier
from ssl_pretrain.augment.transforms import build_eval_transform
from ssl_pretrain.data import SubsetSource, check_same_classes, decoded_in_memory, open_source
from ssl_pretrain.engine.devices import resolve_device
from ssl_pretrain.models.warm_start import load_any_backbone

log = logging.getLogger(__name__)

MODES = ("linear", "finetune")
LINEAR_HEAD_DEFAULTS = {"epochs": 100, "lr": 0.1, "patience": 20}
"""The linear head's budget: MoCo v3's linear-probe learning rate on standardised features;
100 epochs of a linear layer on cached features take seconds, early stopping ends most sooner."""
BALANCING = ("auto", "weights", "none")
IMBALANCE_RATIO = 1.5
"""``balance: auto`` weights the loss when the largest class has this many times the images of
the smallest (1:1.5 already moves a majority-class guess 10 points above chance)."""


@dataclass
class FinetuneSettings:
    """Everything ``train_classifier`` can be told; the command line shows the same defaults.

    ``epochs`` and ``lr`` default per mode: linear 100 epochs at 0.1 (on features: fast);
    fine-tuning 30 epochs at 0.01 for the head and ``backbone_lr_scale`` times that for the
    backbone (the linear probe has already trained the head).
    """

    arch: str | None = None  # read the checkpoint as a torchvision/timm state dict of this backbone
    mode: str = "linear"
    labels_per_class: int | None = None
    label_fraction: float | None = None
    val_fraction: float = 0.2
    balance: str = "auto"
    epochs: int | None = None
    lr: float | None = None
    backbone_lr_scale: float = 0.1
    batch_size: int = 64
    patience: int | None = None
    input_size: int | None = None
    hflip: bool = True
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    progress: bool = True
    overwrite: bool = False

    def __post_init__(self):
        if self.mode not in MODES:
            raise ClassifierError(f"unknown mode '{self.mode}': choose linear or finetune")
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

    @property
    def budget(self) -> LabelBudget | None:
        if self.labels_per_class is not None:
            return LabelBudget(per_class=self.labels_per_class)
        if self.label_fraction is not None and self.label_fraction < 1:
            return LabelBudget(fraction=self.label_fraction)
        return None

    def resolved(self) -> dict[str, Any]:
        """The settings with the per-mode defaults filled in (what ``classifier.json`` records)."""
        linear = self.mode == "linear"
        values = asdict(self)
        head = LINEAR_HEAD_DEFAULTS
        values["epochs"] = self.epochs or (head["epochs"] if linear else 30)
        values["lr"] = self.lr or (head["lr"] if linear else 0.01)
        values["patience"] = self.patience or (head["patience"] if linear else 10)
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
    if val is None and settings.val_fraction > 0:
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


def _balanced_accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.metrics import balanced_accuracy_score

    return float(balanced_accuracy_score(labels, scores.argmax(axis=1)))


def _features(backbone, source, transform, settings: FinetuneSettings, device):
    """``(N, D)`` features and ``(N,)`` labels of the readable images of ``source``."""
    embeddings = extract_embeddings(backbone, source, transform, batch_size=256, device=device,
                                    num_workers=settings.num_workers, progress=settings.progress)
    return embeddings.features, embeddings.labels


def train_linear_head(backbone, splits: LabelledSplits, transform, settings: FinetuneSettings,
                      weights, device) -> tuple[nn.Linear, dict]:
    """A linear head on frozen, standardised features; the standardisation folded into it.

    Returns:
        ``nn.Linear(D, C)`` on raw backbone features, and what was chosen (best epoch...).
    """
    # in finetune mode --epochs and --lr belong to the second stage; the head gets the linear defaults
    resolved = settings.resolved() if settings.mode == "linear" else LINEAR_HEAD_DEFAULTS
    train_x, train_y = _features(backbone, splits.train, transform, settings, device)
    scaler = Standardise(train_x).to(device)
    linear = nn.Linear(train_x.shape[1], len(splits.classes)).to(device)
    head = nn.Sequential(scaler, linear)
    val_x, val_y = _features(backbone, splits.val, transform, settings, device) if splits.val else (None, None)
    batches = feature_batches(train_x, train_y, settings.batch_size, settings.seed)

    def score_val() -> float:
        with torch.no_grad():
            head.eval()
            return _balanced_accuracy(head(torch.as_tensor(val_x).to(device)).cpu().numpy(), val_y)

    history = train_with_early_stopping(
        head, head.parameters(), batches, score_val if val_x is not None else None,
        epochs=resolved["epochs"], lr=resolved["lr"],
        patience=resolved["patience"] if val_x is not None else None, device=device, class_weights=weights,
        progress=settings.progress and settings.mode == "linear")
    return fold_standardisation(scaler, linear), {"best_epoch": history.best_epoch,
                                                  "epochs_run": len(history.val_top1)}


def fold_standardisation(scaler: Standardise, linear: nn.Linear) -> nn.Linear:
    """``linear((x - mean) / std)`` as one ``nn.Linear`` on ``x``: ``W' = W / std``,
    ``b' = b - W' mean``."""
    folded = nn.Linear(linear.in_features, linear.out_features)
    with torch.no_grad():
        weight = linear.weight / scaler.std
        folded.weight.copy_(weight)
        folded.bias.copy_(linear.bias - weight @ scaler.mean)
    return folded


def _logits(network: ImageClassifier, source, transform, settings: FinetuneSettings, device):
    """``(N, C)`` logits and ``(N,)`` labels of ``source`` through backbone and head (eval mode)."""
    return _features(nn.Sequential(network.backbone, network.head), source, transform, settings, device)


def finetune_network(network: ImageClassifier, splits: LabelledSplits, transform, settings: FinetuneSettings,
                     weights, device) -> dict:
    """Train the whole ``network`` (head already trained) on augmented images; keep the epoch
    with the best validation balanced accuracy. Small images are decoded once and augmented a
    batch at a time (``linear_probe.finetune.training_route``)."""
    resolved = settings.resolved()
    model = nn.Sequential(network.backbone, network.head)  # normalised input, as the transforms give
    batches, score = training_route(splits.train, transform, settings.batch_size, settings.seed, settings.hflip,
                                    settings.num_workers, device)
    val = prepare_scoring(splits.val, transform) if splits.val is not None else None
    parameters = [{"params": network.backbone.parameters(), "lr": resolved["lr"] * settings.backbone_lr_scale},
                  {"params": network.head.parameters(), "lr": resolved["lr"]}]
    def score_val() -> float:
        return _balanced_accuracy(*score(model, val))

    history = train_with_early_stopping(
        model, parameters, batches, score_val if val is not None else None,
        epochs=resolved["epochs"], lr=resolved["lr"],
        weight_decay=5e-4, patience=resolved["patience"] if val is not None else None, device=device,
        class_weights=weights, progress=settings.progress,
        val_every=validation_interval(len(splits.train), len(splits.val), resolved["epochs"]) if val is not None else 1)
    return {"best_epoch": history.best_epoch, "epochs_run": len(history.val_top1)}


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
    scores, labels = _logits(network, source, transform, settings, device)
    return classification_metrics(scores, labels, len(classes), classes)


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
    if splits.val is None:
        log.warning("no validation images: training for the whole epoch budget, nothing chosen")
    transform = build_eval_transform(input_size, binfo.mean, binfo.std)
    backbone = backbone.to(device)
    head, chosen = train_linear_head(backbone, splits, transform, settings, weights, device)
    network = ImageClassifier(backbone, binfo.feature_dim, len(splits.classes), binfo.mean, binfo.std).to(device)
    network.head.load_state_dict(head.state_dict())
    if settings.mode == "finetune":
        network.backbone = copy.deepcopy(backbone).requires_grad_(True)
        chosen = {"linear_probe": chosen, **finetune_network(network, splits, transform, settings, weights, device)}
    network.eval()
    info = ClassifierInfo(
        classes=splits.classes, architecture=binfo.architecture, small_stem=binfo.small_stem,
        feature_dim=binfo.feature_dim, input_size=input_size, mean=binfo.mean, std=binfo.std, mode=settings.mode,
        backbone={"checkpoint": str(checkpoint), "weights_sha256": fingerprint_module(backbone), "epoch": binfo.epoch},
        training={**settings.resolved(), "data": {"train": train, "val": val or f"{settings.val_fraction} of train",
                                                  "test": test},
                  "n_train": len(splits.train), "n_val": len(splits.val) if splits.val else 0,
                  "train_counts": counts, "class_weights": None if weights is None else weights.tolist(),
                  **chosen},
        validation=_score(network, splits.val, transform, settings, device, splits.classes),
        test=_score(network, splits.test, transform, settings, device, splits.classes),
    )
    files = save_classifier(out_dir, network.cpu(), info)
    return TrainedClassifier(info, out_dir, files, time.perf_counter() - started)
