"""Fitting ``ssl-finetune``'s classifier and choosing its mode and epochs inside the label budget.

Two modes (``ssl_classifier.train``): ``linear`` (a head on frozen, standardised features,
folded into one ``nn.Linear`` when saved) and ``finetune`` (the whole network on augmented
images from a random head, ``linear-probe``'s fine-tuning; with ``head_init="probe"`` the head is
first trained as in ``linear``: LP-FT, Kumar et al. 2022).

What is chosen, and on what (``linear_probe.crossval``, the rules of ``linear-probe``):

- ``cv`` (default): stratified folds of the labelled images themselves. Each candidate mode
  trains on the folds' training parts with early stopping on their held-out parts (balanced
  accuracy); the mode with the best mean wins (a tie goes to ``linear``), and it is refit on every
  labelled image for the folds' best number of steps (``crossval.refit_epochs``). Fine-tuning scores
  ``crossval.TRAINING_FOLDS`` fold(s); with both modes in the running they are compared on the
  same fold(s).
- ``pool`` / a ``--val`` set: the epoch of the best validation score is kept (those images are
  counted in the budget ``classifier.json`` states).
- ``none``: nothing is held out; every epoch of the budget runs (the settings were chosen
  elsewhere, e.g. by the ``linear-probe`` report whose command this is).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from linear_probe.crossval import refit_epochs
from linear_probe.embeddings import extract_embeddings
from linear_probe.finetune import DEFAULT_LR, prepare_scoring, training_route
from linear_probe.linear import Standardise, feature_batches
from linear_probe.training import TrainingHistory, train_with_early_stopping, validation_interval
from ssl_classifier.model import ImageClassifier

log = logging.getLogger(__name__)

LINEAR_HEAD_DEFAULTS = {"epochs": 100, "lr": 0.1, "patience": 20}
"""The linear head's budget: MoCo v3's linear-probe learning rate on standardised features;
100 epochs of a linear layer on cached features take seconds, early stopping ends most sooner."""
FINETUNE_DEFAULTS = {"epochs": 30, "lr": DEFAULT_LR, "patience": 10}
"""Fine-tuning's budget from a random head: ``linear-probe``'s (``evaluate_finetune``), so that
the report's fine-tuning rows are what ``ssl-finetune`` trains."""
PROBE_HEAD_LR = 0.01
"""LP-FT's rate after the probe has trained the head: small, to keep the features."""
PROBE_BACKBONE_LR_SCALE = 0.1
"""LP-FT: the backbone at a tenth of the trained head's learning rate."""


def mode_defaults(mode: str, head_init: str = "random") -> dict[str, int | float]:
    """Epochs, learning rate and patience of ``mode`` when the settings leave them out."""
    if mode == "linear":
        return LINEAR_HEAD_DEFAULTS
    return {**FINETUNE_DEFAULTS, "lr": PROBE_HEAD_LR} if head_init == "probe" else FINETUNE_DEFAULTS


@dataclass
class Job:
    """What every fit reads: the backbone, the eval transform, settings, class weights, device."""

    backbone: nn.Module
    feature_dim: int
    num_classes: int
    mean: tuple
    std: tuple
    transform: Any
    settings: Any  # FinetuneSettings
    weights: torch.Tensor | None
    device: torch.device

    def budget(self, mode: str) -> dict[str, Any]:
        """Epochs, learning rate and patience of ``mode``: the settings', else the mode's defaults."""
        defaults = mode_defaults(mode, self.settings.head_init)
        return {"epochs": self.settings.epochs or defaults["epochs"], "lr": self.settings.lr or defaults["lr"],
                "patience": self.settings.patience or defaults["patience"]}


def balanced_accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.metrics import balanced_accuracy_score

    return float(balanced_accuracy_score(labels, scores.argmax(axis=1)))


def features(job: Job, source) -> tuple[np.ndarray, np.ndarray]:
    """``(N, D)`` features and ``(N,)`` labels of the readable images of ``source``."""
    embeddings = extract_embeddings(job.backbone, source, job.transform, batch_size=256, device=job.device,
                                    num_workers=job.settings.num_workers, progress=job.settings.progress)
    return embeddings.features, embeddings.labels


def fold_standardisation(scaler: Standardise, linear: nn.Linear) -> nn.Linear:
    """``linear((x - mean) / std)`` as one ``nn.Linear`` on ``x``: ``W' = W / std``,
    ``b' = b - W' mean``."""
    folded = nn.Linear(linear.in_features, linear.out_features)
    with torch.no_grad():
        weight = linear.weight / scaler.std
        folded.weight.copy_(weight)
        folded.bias.copy_(linear.bias - weight @ scaler.mean)
    return folded


def fit_linear_head(job: Job, train, val, budget: dict, progress: bool = False) -> tuple[nn.Linear, TrainingHistory]:
    """A linear head on frozen, standardised features of ``train`` (early stopping on ``val``
    when given, else every epoch of ``budget``); the standardisation folded into it."""
    train_x, train_y = features(job, train)
    torch.manual_seed(job.settings.seed)
    scaler = Standardise(train_x).to(job.device)
    linear = nn.Linear(train_x.shape[1], job.num_classes).to(job.device)
    head = nn.Sequential(scaler, linear)
    score_val = None
    if val is not None:
        val_x, val_y = features(job, val)

        def score_val() -> float:
            with torch.no_grad():
                head.eval()
                return balanced_accuracy(head(torch.as_tensor(val_x).to(job.device)).cpu().numpy(), val_y)

    history = train_with_early_stopping(
        head, head.parameters(), feature_batches(train_x, train_y, job.settings.batch_size, job.settings.seed),
        score_val, epochs=budget["epochs"], lr=budget["lr"], patience=budget["patience"] if val is not None else None,
        device=job.device, class_weights=job.weights, progress=progress)
    return fold_standardisation(scaler, linear), history


def fit(job: Job, mode: str, train, val, epochs: int | None = None) -> tuple[ImageClassifier, TrainingHistory, dict]:
    """One classifier of ``mode`` trained on ``train`` (validated on ``val`` when given).

    Args:
        epochs: the budget (default: the mode's); without ``val`` every epoch of it runs.

    Returns:
        The network (eval mode), the history of its last stage, and what the run chose.
    """
    settings, budget = job.settings, job.budget(mode)
    if epochs is not None:
        budget = {**budget, "epochs": epochs}
    network = ImageClassifier(job.backbone, job.feature_dim, job.num_classes, job.mean, job.std).to(job.device)
    if mode == "linear":
        head, history = fit_linear_head(job, train, val, budget, progress=settings.progress)
        network.head.load_state_dict(head.state_dict())
        return network.eval(), history, {}
    chosen: dict[str, Any] = {}
    if settings.head_init == "probe":  # LP-FT: the head first, on frozen features
        head, head_history = fit_linear_head(job, train, val, LINEAR_HEAD_DEFAULTS)
        network.head.load_state_dict(head.state_dict())
        chosen["linear_probe"] = {"best_epoch": head_history.best_epoch, "epochs_run": len(head_history.val_top1)}
    else:
        torch.manual_seed(settings.seed)
        network.head.reset_parameters()
    network.backbone = copy.deepcopy(job.backbone).requires_grad_(True)
    model = nn.Sequential(network.backbone, network.head)  # normalised input, as the transforms give
    batches, score = training_route(train, job.transform, settings.batch_size, settings.seed, settings.hflip,
                                    settings.num_workers, job.device)
    score_val, val_every = None, 1
    if val is not None:
        prepared = prepare_scoring(val, job.transform)
        score_val = lambda: balanced_accuracy(*score(model, prepared))  # noqa: E731
        val_every = validation_interval(len(train), len(val), budget["epochs"])
    parameters = [{"params": network.backbone.parameters(), "lr": budget["lr"] * settings.backbone_scale},
                  {"params": network.head.parameters(), "lr": budget["lr"]}]
    history = train_with_early_stopping(
        model, parameters, batches, score_val, epochs=budget["epochs"], lr=budget["lr"], weight_decay=5e-4,
        patience=budget["patience"] if val is not None else None, device=job.device, class_weights=job.weights,
        progress=settings.progress, val_every=val_every)
    return network.eval(), history, chosen


def choose_and_fit(job: Job, modes: tuple[str, ...], train, folds: list, refit: bool,
                   finetune_folds: int) -> tuple[ImageClassifier, str, dict]:
    """The classifier of the best mode over ``folds`` = ``[(train part, held-out part)]``.

    Args:
        refit: retrain the chosen mode on all of ``train`` for its folds' best number of steps
            (``crossval.refit_epochs``; ``cv``, or no folds: the whole budget); else (``pool`` / ``--val``) the one
            fold trained on ``train`` is the classifier.
        finetune_folds: folds fine-tuning scores under ``cv``; with both modes in the running they
            are compared on these same folds.

    Returns:
        ``(network, mode, chosen)``; ``chosen`` records every mode's score and epochs.
    """
    if refit and folds and "finetune" in modes:
        folds = folds[:finetune_folds]
    if not folds:
        mode = modes[0]
        network, history, chosen = fit(job, mode, train, None)
        if len(modes) > 1:
            log.warning("nothing held out to compare linear and finetune on: %s, with every epoch of its budget", mode)
        return network, mode, {**chosen, "epochs": len(history.train_loss), "validation_balanced_accuracy": None}
    results: dict[str, dict] = {}
    kept: dict[str, tuple] = {}
    for mode in modes:
        epochs, scores = [], []
        for fold_train, fold_val in folds:
            network, history, chosen = fit(job, mode, fold_train, fold_val)
            epochs.append(history.best_epoch)
            scores.append(history.best_val_top1)  # balanced accuracy: score_val's metric
            kept.setdefault(mode, (network, history, chosen))
        results[mode] = {"validation_balanced_accuracy": float(np.mean(scores)), "fold_best_epochs": epochs}
        log.info("%s: validation balanced accuracy %.1f%% (best epochs %s)", mode,
                 100 * results[mode]["validation_balanced_accuracy"], epochs)
    mode = max(modes, key=lambda name: results[name]["validation_balanced_accuracy"])  # first wins a tie
    summary = {"modes": results} if len(modes) > 1 else {}
    if refit:
        epochs = refit_epochs(results[mode]["fold_best_epochs"], [len(part) for part, _ in folds], len(train))
        network, history, chosen = fit(job, mode, train, None, epochs=epochs)
        return network, mode, {**chosen, **summary, "epochs": epochs,
                               "validation_balanced_accuracy": results[mode]["validation_balanced_accuracy"]}
    network, history, chosen = kept[mode]
    return network, mode, {**chosen, **summary, "best_epoch": history.best_epoch, "epochs_run": len(history.val_top1),
                           "validation_balanced_accuracy": results[mode]["validation_balanced_accuracy"]}
