"""The one training loop of the supervised methods (linear probe, fine-tuning, scratch baseline).

SGD with momentum and a cosine schedule; after every epoch (or every ``val_every`` epochs, and
after the last) the model is scored on validation, the best scored epoch's weights are kept, and
training stops when validation has not improved for ``patience`` epochs. The caller then scores the test set once, with the best-validation weights:
the number of epochs is chosen on validation, never by looking at the test set.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import math
from typing import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm


@dataclass
class TrainingHistory:
    """Per-epoch record of one run; ``best_epoch`` counts from 1."""

    best_epoch: int = 0
    best_val_top1: float = -1.0
    val_top1: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)


VALIDATION_SHARE = 0.25
"""Validation images scored per epoch, at most, as a share of the training images of the epoch
(``validation_interval``). A training image costs about three forward passes (forward, backward),
so validation then costs at most a twelfth of training. With 10% of CIFAR-10 (4,500 images, 5,000
validation) that is every 5th epoch (what that buys: BENCHMARKS.md, "Evaluation")."""
MIN_VALIDATIONS = 5
"""Validation scores per run, at least, however few the training images."""


def validation_interval(n_train: int, n_val: int, epochs: int) -> int:
    """Epochs between validation scores when training on images, so that scoring the validation
    set costs little beside training: at most ``VALIDATION_SHARE`` x ``n_train`` images scored per
    epoch on average, but at least ``MIN_VALIDATIONS`` scores in ``epochs``. With 1% of CIFAR-10
    (450 images) and 5,000 validation images, scoring every epoch would cost several times the
    training itself; every 6th epoch of 30 (the floor of 5 scores) costs less than it.
    """
    wanted = math.ceil(n_val / max(VALIDATION_SHARE * n_train, 1))
    return max(1, min(wanted, epochs // MIN_VALIDATIONS))


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def _train_one_epoch(model, optimizer, batches, device, class_weights=None) -> float:
    model.train()
    total, count = 0.0, 0
    for inputs, labels in batches:
        if len(labels) == 0:
            continue  # a batch of unreadable files only
        inputs, labels = inputs.to(device), labels.to(device)
        loss = nn.functional.cross_entropy(model(inputs), labels, weight=class_weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total, count = total + loss.item() * len(labels), count + len(labels)
    return total / max(count, 1)


def train_with_early_stopping(
    model: nn.Module,
    parameters: Iterable[nn.Parameter],
    train_batches: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]],
    score_val: Callable[[], float] | None,
    epochs: int,
    lr: float,
    weight_decay: float = 0.0,
    patience: int | None = None,
    device: str | torch.device = "cpu",
    class_weights: torch.Tensor | None = None,
    progress: bool = False,
    val_every: int = 1,
) -> TrainingHistory:
    """Train ``parameters`` of ``model`` with cross-entropy; leave the best-validation weights in it.

    Args:
        model: maps a batch of inputs to ``(B, num_classes)`` logits.
        parameters: what the optimiser updates (the head alone for a linear probe), or SGD
            parameter groups (``[{"params": ..., "lr": ...}]``: a lower rate for a backbone).
        train_batches: ``epoch -> iterable of (inputs, labels)``, shuffled by the caller.
        score_val: validation score of the model as it is now; None when there is no validation
            data: every epoch of the budget runs and the last one is kept.
        epochs: the budget; the schedule decays to zero over it.
        lr: SGD learning rate (momentum 0.9).
        patience: stop after this many epochs without a better validation score (None: never).
        class_weights: ``(num_classes,)`` cross-entropy weights (imbalanced classes), or None.
        progress: a progress bar over the epochs, with the loss and validation score.
        val_every: score validation after every ``val_every``-th epoch and after the last one
            only (``validation_interval``); the epochs between record NaN.

    Returns:
        The history; ``model`` holds the weights of ``history.best_epoch`` (a scored epoch).
    """
    optimizer = torch.optim.SGD(parameters, lr=lr, momentum=0.9, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1))
    history, best_state = TrainingHistory(), _snapshot(model)
    weights = None if class_weights is None else class_weights.to(device)
    bar = tqdm(total=epochs, desc="training", unit="epoch", disable=not progress, leave=False)
    for epoch in range(1, epochs + 1):
        history.train_loss.append(_train_one_epoch(model, optimizer, train_batches(epoch), device, weights))
        schedule.step()
        bar.update(1)
        if score_val is None:
            history.best_epoch, best_state = epoch, None
            history.val_top1.append(float("nan"))
            continue
        if epoch % max(val_every, 1) and epoch != epochs:
            history.val_top1.append(float("nan"))
            continue
        val_top1 = score_val()
        history.val_top1.append(val_top1)
        bar.set_postfix(loss=f"{history.train_loss[-1]:.3f}", val=f"{100 * val_top1:.1f}")
        if val_top1 > history.best_val_top1:
            history.best_epoch, history.best_val_top1, best_state = epoch, val_top1, _snapshot(model)
        elif patience is not None and epoch - history.best_epoch >= patience:
            break
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    return history
