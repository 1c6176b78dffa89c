"""Linear probe: a linear layer trained on frozen features, epochs chosen on held-out labels.

With a ``cv`` plan (``evaluate_linear_folds``) each fold of the labelled subset trains a head
with early stopping; a head trained on every labelled image then trains for the folds' best
number of steps (``linear_probe.crossval.refit_epochs``). With the ``pool`` protocol
(``evaluate_linear``) the best epoch on a validation split outside the budget is kept.

The default trains on the cached embeddings (fast: no image is decoded again). With augmentation
(``evaluate_linear_augmented``) the images pass through the frozen backbone every epoch, as in
MoCo v3's ``main_lincls.py``; the backbone stays in ``eval()`` mode without gradients, so its
weights and BatchNorm running statistics are bit-identical afterwards (their ``sanity_check``,
here a test).
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from linear_probe.crossval import refit_epochs
from linear_probe.images import build_train_loader, build_train_transform
from linear_probe.scoring import ProbeResult, score_test, topk_accuracy
from linear_probe.training import train_with_early_stopping

PATIENCE = 20
"""Epochs without a better validation score before a linear probe stops."""


class Standardise(nn.Module):
    """``(x - mean) / std`` with statistics fixed from the training features; MAE's linear probe
    puts a BatchNorm without affine there for the same reason: one learning rate then suits
    features of any scale."""

    def __init__(self, features: np.ndarray):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(features.mean(axis=0), dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(features.std(axis=0) + 1e-6, dtype=torch.float32))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.mean) / self.std


class FrozenBackbone(nn.Module):
    """A backbone that stays in ``eval()`` mode and passes no gradient, whatever ``train()`` says."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone.eval()

    def train(self, mode: bool = True) -> "FrozenBackbone":
        super().train(mode)
        self.backbone.eval()  # BatchNorm must not update its running statistics
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.backbone(images)


def build_linear_head(train_features: np.ndarray, num_classes: int) -> nn.Sequential:
    """``Standardise`` + ``nn.Linear(D, num_classes)``: ``(B, D)`` features -> ``(B, C)`` logits."""
    return nn.Sequential(Standardise(train_features), nn.Linear(train_features.shape[1], num_classes))


def feature_batches(features: np.ndarray, labels: np.ndarray, batch_size: int, seed: int):
    """``epoch -> [(features, labels)]`` in an order fixed by ``(seed, epoch)``."""
    features, labels = torch.as_tensor(features), torch.as_tensor(labels)

    def batches(epoch: int):
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        return [(features[part], labels[part]) for part in order.split(batch_size)]

    return batches


@torch.no_grad()
def _head_scores(head: nn.Module, features: np.ndarray, device) -> np.ndarray:
    head.eval()
    features = np.require(features, requirements="W")  # cached embeddings are read-only memory maps
    return head(torch.as_tensor(features).to(device)).softmax(dim=1).cpu().numpy()


@contextmanager
def _torch_threads(count: int | None):
    """Run with ``count`` intra-op threads (None: unchanged), restoring the setting afterwards."""
    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _train_head(model, head, batches, val, epochs, lr, weight_decay, patience, device):
    """Train ``head`` (inside ``model``) with early stopping on ``val`` = ``(features, labels)``,
    or without validation (``val`` None) for all ``epochs``."""
    score_val = None
    if val is not None:
        val_features, val_labels = val
        score_val = lambda: topk_accuracy(_head_scores(head, val_features, device), val_labels, 1)  # noqa: E731
    return train_with_early_stopping(model, head.parameters(), batches, score_val=score_val, epochs=epochs, lr=lr,
                                     weight_decay=weight_decay, patience=patience if val is not None else None,
                                     device=device)


def _probe_folds(make, folds, final, test, epochs, lr, weight_decay, patience, device, refit: bool,
                 size=len) -> ProbeResult:
    """The linear probe's protocol over ``folds``; ``make(part) -> (model, head, batches)``.

    Args:
        folds: ``[(training part, (val features, val labels))]``.
        final: the training part of every labelled image (trained on when ``refit`` or without folds).
        refit: ``cv``: a fresh head on ``final`` trained for the folds' best steps
            (``crossval.refit_epochs``; its cosine schedule over those epochs: what ``ssl-finetune
            --epochs N --validation none`` trains, so the report's command reproduces the row);
            ``pool``: the first fold's best-validation head (its training part is ``final``) is
            the one scored.
        size: ``part -> number of images`` of a training part.
    """
    best_epochs, val_scores, head = [], [], None
    for part, val in folds:
        model, head, batches = make(part)
        history = _train_head(model, head, batches, val, epochs, lr, weight_decay, patience, device)
        best_epochs.append(history.best_epoch)
        val_scores.append(history.best_val_top1)
    chosen: dict = {"lr": lr}
    if refit or not folds:
        stop = refit_epochs(best_epochs, [size(part) for part, _ in folds], size(final)) if folds else epochs
        model, head, batches = make(final)
        history = _train_head(model, head, batches, None, stop, lr, weight_decay, patience, device)
        chosen.update(epochs=stop, **({"fold_best_epochs": best_epochs} if folds else {}))
    else:
        chosen.update(best_epoch=best_epochs[0], epochs_run=len(history.val_top1))
    test_features, test_labels = test
    val_top1 = float(np.mean(val_scores)) if val_scores else None
    return score_test(_head_scores(head, test_features, device), test_labels, chosen, val_top1)


def evaluate_linear(train_features: np.ndarray, train_labels: np.ndarray, val_features: np.ndarray,
                    val_labels: np.ndarray, test_features: np.ndarray, test_labels: np.ndarray,
                    num_classes: int, epochs: int = 100, lr: float = 0.1, batch_size: int = 256,
                    weight_decay: float = 0.0, patience: int | None = PATIENCE, seed: int = 0,
                    device: str = "cpu") -> ProbeResult:
    """Linear probe on cached features: ``(N, D)`` train, ``(V, D)`` val, ``(Q, D)`` test; the
    best validation epoch is scored (the ``pool`` protocol).

    Weight decay 0 as in MoCo v3's linear probe; early stopping and the best-validation epoch
    do the regularising. Returns a ``ProbeResult`` with ``chosen["best_epoch"]``.
    """
    folds = [(np.arange(len(train_labels)), val_features, val_labels)]
    return evaluate_linear_folds(train_features, train_labels, test_features, test_labels, num_classes, folds,
                                 refit=False, epochs=epochs, lr=lr, batch_size=batch_size,
                                 weight_decay=weight_decay, patience=patience, seed=seed, device=device)


def evaluate_linear_folds(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray,
                          test_labels: np.ndarray, num_classes: int, folds, refit: bool = True,
                          epochs: int = 100, lr: float = 0.1, batch_size: int = 256, weight_decay: float = 0.0,
                          patience: int | None = PATIENCE, seed: int = 0, device: str = "cpu") -> ProbeResult:
    """Linear probe on cached features with the epoch count chosen over ``folds`` =
    ``[(train positions, val features, val labels)]`` (``_probe_folds``)."""

    def make(positions):
        torch.manual_seed(seed)
        head = build_linear_head(train_features[positions], num_classes).to(device)
        return head, head, feature_batches(train_features[positions], train_labels[positions], batch_size, seed)

    parts = [(positions, (val_features, val_labels)) for positions, val_features, val_labels in folds]
    # A linear layer on a batch of features is too small a product to share between CPU threads:
    # one thread is faster, and far faster on a busy machine.
    with _torch_threads(1 if torch.device(device).type == "cpu" else None):
        return _probe_folds(make, parts, np.arange(len(train_labels)), (test_features, test_labels), epochs, lr,
                            weight_decay, patience, device, refit)


def evaluate_linear_augmented(backbone: nn.Module, train_images, train_features: np.ndarray,
                              val_features: np.ndarray, val_labels: np.ndarray,
                              test_features: np.ndarray, test_labels: np.ndarray, num_classes: int,
                              input_size: int, mean, std, epochs: int = 100, lr: float = 0.1,
                              batch_size: int = 64, patience: int | None = PATIENCE, seed: int = 0,
                              device: str = "cpu", num_workers: int = 0, hflip: bool = True,
                              folds=None, refit: bool = False) -> ProbeResult:
    """Linear probe trained on augmented images through the frozen ``backbone`` (on ``device``).

    Validation and test use the cached embeddings, which the frozen eval-mode backbone reproduces
    exactly. ``train_features`` (the labelled subset's embeddings) fix the standardisation.
    ``folds`` = ``[(train images, their features, val features, val labels)]`` choose the epoch
    count by cross-validation (``refit``); by default the one (``pool``) fold is
    ``(train_images, train_features, val_features, val_labels)``.
    """
    transform = build_train_transform(input_size, mean, std, hflip)

    def make(part):
        images, features = part
        torch.manual_seed(seed)
        head = build_linear_head(features, num_classes).to(device)
        loader = build_train_loader(images, transform, batch_size, seed, num_workers)
        return nn.Sequential(FrozenBackbone(backbone), head), head, lambda epoch: loader

    if folds is None:
        folds = [(train_images, train_features, val_features, val_labels)]
    parts = [((images, features), (vx, vy)) for images, features, vx, vy in folds]
    return _probe_folds(make, parts, (train_images, train_features), (test_features, test_labels), epochs, lr, 0.0,
                        patience, device, refit, size=lambda part: len(part[1]))
