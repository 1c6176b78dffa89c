"""Few-label fine-tuning: backbone + linear head trained end to end on a labelled subset.

The same function gives the "scratch" baseline when handed a randomly initialised backbone: same
architecture, same labels, same augmentation, same epoch budget and early stopping. Pretraining
has paid off when the fine-tuned pretrained network beats that one.
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import torch
from torch import nn

from linear_probe.crossval import refit_epochs
from linear_probe.embeddings import extract_embeddings
from linear_probe.images import (
    PixelSet, augmented_batches, build_train_loader, build_train_transform, load_pixels, pixel_logits,
)
from linear_probe.scoring import ProbeResult, score_test, topk_accuracy
from linear_probe.training import train_with_early_stopping, validation_interval
from ssl_pretrain.augment.transforms import EvalTransform, build_eval_transform

log = logging.getLogger(__name__)

PATIENCE = 10
"""Epochs without a better validation score before fine-tuning stops."""
WEIGHT_DECAY = 5e-4
"""SGD weight decay of supervised CIFAR training (and of lightly's CIFAR benchmarks)."""
DEFAULT_LR = 0.05
"""SGD learning rate where nothing can choose one (no validation labels: the ``fixed`` protocol)."""
LR_GRID = (DEFAULT_LR, 0.01)
"""Learning rates fine-tuning chooses from on validation inside the label budget, for the
pretrained network and the scratch baseline alike, in order of preference (ties, and runs with
nothing to validate, take the first). One shared fixed rate can suit one network and collapse the
other, which then misstates what pretraining bought (BENCHMARKS.md, "Your own images")."""


def build_classifier(backbone: nn.Module, feature_dim: int, num_classes: int) -> nn.Sequential:
    """A trainable copy of ``backbone`` + ``nn.Linear``: ``(B, 3, H, W)`` -> ``(B, C)`` logits.

    The copy leaves the caller's backbone untouched, so every seed starts from the same weights.
    """
    return nn.Sequential(copy.deepcopy(backbone).requires_grad_(True), nn.Linear(feature_dim, num_classes))


def _logits(model: nn.Module, images, transform, batch_size: int, device, num_workers: int):
    """``(Q, C)`` logits and ``(Q,)`` labels of the readable images, in eval mode."""
    outputs = extract_embeddings(model, images, transform, batch_size=batch_size, device=device,
                                 num_workers=num_workers, progress=False)
    return outputs.features, outputs.labels


def prepare_scoring(images, transform: EvalTransform):
    """What ``score`` of ``training_route`` takes: the images decoded once when they fit in
    memory, else the source itself (decoded at every call)."""
    return load_pixels(images, transform) or images


def training_route(train_images, transform: EvalTransform, batch_size: int, seed: int, hflip: bool,
                   num_workers: int, device):
    """``(epoch -> batches, score(model, prepared images) -> (logits, labels))``.

    Sets that fit in memory are decoded once and augmented a batch at a time (no per-image PIL
    work per epoch: most of fine-tuning's time on small images was that); larger ones stream
    through a ``DataLoader`` with per-image transforms.
    """
    size, mean, std = transform.input_size, transform.mean, transform.std
    pixels = load_pixels(train_images, transform)
    if pixels is not None:
        batches = augmented_batches(pixels, size, mean, std, batch_size, seed, hflip)
    else:
        loader = build_train_loader(train_images, build_train_transform(size, mean, std, hflip), batch_size, seed,
                                    num_workers)
        batches = lambda epoch: loader  # noqa: E731 - the loader reshuffles itself every epoch

    def score(model, images):
        if isinstance(images, PixelSet):
            return pixel_logits(model, images, transform, device, 256)
        return _logits(model, images, transform, batch_size, device, num_workers)

    return batches, score


def evaluate_finetune(backbone: nn.Module, feature_dim: int, train_images, val_images, test_images,
                      num_classes: int, input_size: int, mean, std, epochs: int = 30, lr=LR_GRID,
                      batch_size: int = 64, patience: int | None = PATIENCE, seed: int = 0,
                      device: str = "cpu", num_workers: int = 0, hflip: bool = True,
                      folds=None, refit: bool = False) -> ProbeResult:
    """Fine-tune ``backbone`` with a new head on ``train_images``; score the chosen model once
    on ``test_images``.

    Args:
        backbone: pretrained (or randomly initialised, for the scratch baseline); copied, not changed.
        feature_dim: width of the backbone's output.
        train_images, val_images, test_images: labelled sources (``SubsetSource``).
        input_size, mean, std: the checkpoint's, for both the augmentation and the eval transform.
        epochs: the budget; ``lr``: SGD learning rate, cosine-decayed over the budget, or a
            sequence of rates (``LR_GRID``) of which validation chooses one (the first with the
            best validation top-1; with no validation labels, the first). The epoch
            is chosen on validation, scored every ``training.validation_interval`` epochs (and
            after the last), so that scoring 5,000 validation images does not outweigh training
            on a few hundred.
        hflip: flip training images at random (off for digits and text).
        folds: ``[(fold train images, fold val images)]``: with ``refit`` (cross-validation inside
            the budget, ``linear_probe.crossval``) each fold trains with early stopping, and a
            network trained on all ``train_images`` for their best number of steps
            (``crossval.refit_epochs``; its cosine schedule over those epochs) is scored; an
            empty list runs the whole budget. None: the ``pool`` protocol, one fold
            ``(train_images, val_images)`` whose best-validation network is scored.

    Returns:
        ``ProbeResult`` with ``chosen["best_epoch"]`` (``pool``) or ``chosen["epochs"]`` (``cv``).
    """
    eval_transform = build_eval_transform(input_size, mean, std)
    rates = [float(lr)] if np.isscalar(lr) else [float(rate) for rate in lr]
    if not rates:
        raise ValueError("fine-tuning needs at least one learning rate")

    def train(images, val, rate, epochs=epochs):
        torch.manual_seed(seed)
        model = build_classifier(backbone, feature_dim, num_classes).to(device)
        batches, score = training_route(images, eval_transform, batch_size, seed, hflip, num_workers, device)
        score_val, val_every = None, 1
        if val is not None:
            prepared = prepare_scoring(val, eval_transform)
            score_val = lambda: topk_accuracy(*score(model, prepared), 1)  # noqa: E731
            val_every = validation_interval(len(images), len(val), epochs)
        history = train_with_early_stopping(
            model, model.parameters(), batches, score_val, epochs=epochs, lr=rate, weight_decay=WEIGHT_DECAY,
            patience=patience if val is not None else None, device=device, val_every=val_every)
        return model, score, history, val_every

    folds = [(train_images, val_images)] if folds is None else folds
    if not folds or all(fold_val is None for _, fold_val in folds):
        rates = rates[:1]
    trials = []  # per rate: (mean best validation top-1 over the folds, rate, fold best epochs, last fold's run)
    for rate in rates:
        best_epochs, val_scores, trained = [], [], None
        for fold_train, fold_val in folds:
            trained = model, score, history, val_every = train(fold_train, fold_val, rate)
            best_epochs.append(history.best_epoch)
            val_scores.append(history.best_val_top1)
            log.info("fine-tuning at lr %g: best validation top-1 %.1f%% at epoch %d of %d run (validated every %d)",
                     rate, 100 * history.best_val_top1, history.best_epoch, len(history.val_top1), val_every)
        trials.append((float(np.mean(val_scores)) if val_scores else None, rate, best_epochs, trained))
    val_score, rate, best_epochs, trained = max(trials, key=lambda trial: -1.0 if trial[0] is None else trial[0])
    chosen: dict = {"lr": rate}
    if len(rates) > 1:
        chosen["lr_validation"] = {f"{trial[1]:g}": trial[0] for trial in trials}
    if refit or not folds:
        stop = refit_epochs(best_epochs, [len(part) for part, _ in folds], len(train_images)) if folds else epochs
        model, score, history, _ = train(train_images, None, rate, epochs=stop)
        chosen.update(epochs=stop, **({"fold_best_epochs": best_epochs} if folds else {}))
    else:
        model, score, history, val_every = trained
        chosen.update(best_epoch=best_epochs[0], epochs_run=len(history.val_top1), validated_every=val_every)
    logits, labels = score(model, prepare_scoring(test_images, eval_transform))
    return score_test(logits, labels, chosen, val_score)
