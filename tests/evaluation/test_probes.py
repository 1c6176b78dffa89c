"""Logistic regression, the linear probe and fine-tuning on real digits; the frozen-backbone check."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from linear_probe.finetune import evaluate_finetune
from linear_probe.linear import evaluate_linear, evaluate_linear_augmented
from linear_probe.logreg import DEFAULT_C_GRID, evaluate_logreg
from ssl_pretrain.data import SubsetSource
from linear_probe.training import train_with_early_stopping
from ssl_pretrain.models.backbones import build_backbone
from ssl_pretrain.data import digits_source

from digit_files import DIGITS_MEAN, DIGITS_STD


def digit_pixel_splits():
    """Raw 8x8 digit pixels (64 values): train / val / test, stratified."""
    digits = load_digits()
    features, labels = digits.data.astype(np.float32), digits.target
    rest_x, test_x, rest_y, test_y = train_test_split(features, labels, test_size=0.25, stratify=labels, random_state=0)
    train_x, val_x, train_y, val_y = train_test_split(rest_x, rest_y, test_size=0.15, stratify=rest_y, random_state=0)
    return (train_x, train_y), (val_x, val_y), (test_x, test_y)


def test_logistic_regression_on_raw_digit_pixels_is_far_above_chance():
    (train_x, train_y), (val_x, val_y), (test_x, test_y) = digit_pixel_splits()
    result = evaluate_logreg(train_x, train_y, val_x, val_y, test_x, test_y, num_classes=10)
    assert result.top1 > 0.9  # chance is 0.1
    assert result.top5 >= result.top1
    assert result.chosen["C"] in DEFAULT_C_GRID and result.val_top1 > 0.9
    assert result.predictions.shape == test_y.shape


def test_linear_probe_on_raw_digit_pixels_is_far_above_chance():
    (train_x, train_y), (val_x, val_y), (test_x, test_y) = digit_pixel_splits()
    result = evaluate_linear(train_x, train_y, val_x, val_y, test_x, test_y, num_classes=10, epochs=30)
    assert result.top1 > 0.9
    assert 1 <= result.chosen["best_epoch"] <= result.chosen["epochs_run"] <= 30


def test_early_stopping_keeps_the_best_validation_epoch_not_the_last():
    model = torch.nn.Linear(2, 2)
    val_scores = iter([0.5, 0.9, 0.6, 0.7, 0.8, 0.4])
    weights_at_epoch = []

    def score_val():
        weights_at_epoch.append(model.weight.detach().clone())
        return next(val_scores)

    batches = lambda epoch: [(torch.randn(8, 2), torch.randint(0, 2, (8,)))]
    history = train_with_early_stopping(model, model.parameters(), batches, score_val, epochs=10, lr=0.5, patience=3)
    assert history.best_epoch == 2 and len(history.val_top1) == 5  # stopped 3 epochs after the best
    assert torch.equal(model.weight, weights_at_epoch[1])


def test_linear_probe_through_the_frozen_backbone_leaves_it_bit_identical():
    """MoCo v3's ``sanity_check``: weights *and* BatchNorm running statistics unchanged."""
    torch.manual_seed(0)
    backbone, feature_dim = build_backbone("smallconv", small_stem=True)
    backbone.train()  # even a backbone handed over in training mode must not update BatchNorm
    before = {name: tensor.clone() for name, tensor in backbone.state_dict().items()}
    source = digits_source("train")
    train = SubsetSource(source, np.arange(64))
    rng = np.random.default_rng(0)
    train_features = rng.standard_normal((64, feature_dim)).astype(np.float32)
    val_features, test_features = (rng.standard_normal((20, feature_dim)).astype(np.float32) for _ in range(2))
    labels = rng.integers(0, 10, 20)
    evaluate_linear_augmented(backbone, train, train_features, val_features, labels, test_features, labels,
                              num_classes=10, input_size=16, mean=DIGITS_MEAN, std=DIGITS_STD, epochs=2,
                              batch_size=16)
    after = backbone.state_dict()
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        assert torch.equal(tensor, after[name]), f"{name} changed"
    assert any("running_mean" in name for name in before)


def test_finetuning_from_scratch_learns_the_digits_and_leaves_the_input_backbone_alone():
    torch.manual_seed(0)
    backbone, feature_dim = build_backbone("smallconv", small_stem=True)
    before = {name: tensor.clone() for name, tensor in backbone.state_dict().items()}
    train_source, test_source = digits_source("train"), digits_source("test")
    order = np.random.default_rng(0).permutation(len(train_source))
    train, val = SubsetSource(train_source, order[:300]), SubsetSource(train_source, order[300:400])
    test = SubsetSource(test_source, np.arange(150))
    result = evaluate_finetune(backbone, feature_dim, train, val, test, 10, 16, DIGITS_MEAN, DIGITS_STD,
                               epochs=3, batch_size=32, hflip=False)
    assert result.top1 > 0.5  # chance is 0.1
    assert 1 <= result.chosen["best_epoch"] <= 3
    assert all(torch.equal(tensor, backbone.state_dict()[name]) for name, tensor in before.items())


def test_finetuning_chooses_its_learning_rate_on_validation_and_keeps_the_first_without_it():
    backbone, feature_dim = build_backbone("smallconv", small_stem=True)
    train_source, test_source = digits_source("train"), digits_source("test")
    order = np.random.default_rng(1).permutation(len(train_source))
    train, val = SubsetSource(train_source, order[:200]), SubsetSource(train_source, order[200:300])
    test = SubsetSource(test_source, np.arange(100))
    common = dict(epochs=2, batch_size=32, hflip=False)
    # a rate too small to move the weights loses to one that learns, whichever comes first
    chosen = evaluate_finetune(backbone, feature_dim, train, val, test, 10, 16, DIGITS_MEAN, DIGITS_STD,
                               lr=(1e-7, 0.05), **common).chosen
    assert chosen["lr"] == 0.05
    assert set(chosen["lr_validation"]) == {"1e-07", "0.05"}
    assert chosen["lr_validation"]["0.05"] > chosen["lr_validation"]["1e-07"]
    # one rate: nothing to choose; no validation labels: the first rate of the grid, untried others
    assert "lr_validation" not in evaluate_finetune(backbone, feature_dim, train, val, test, 10, 16, DIGITS_MEAN,
                                                    DIGITS_STD, lr=0.01, **common).chosen
    fixed = evaluate_finetune(backbone, feature_dim, train, None, test, 10, 16, DIGITS_MEAN, DIGITS_STD,
                              lr=(0.05, 0.01), folds=[], **common).chosen
    assert fixed["lr"] == 0.05 and "lr_validation" not in fixed


def test_validation_interval_bounds_the_cost_of_scoring_and_keeps_five_scores():
    from linear_probe.training import validation_interval

    assert validation_interval(450, 5000, 30) == 6  # 1% of CIFAR-10: every 6th epoch, 5 scores
    assert validation_interval(4500, 5000, 30) == 5  # 10%: at most 0.25 x 4,500 images scored per epoch
    assert validation_interval(45000, 5000, 30) == 1
    assert validation_interval(10, 5000, 3) == 1  # too few epochs to skip any


def test_training_scores_every_few_epochs_and_the_last_and_keeps_the_best_scored_epoch():
    model = torch.nn.Linear(2, 2)
    batches = lambda epoch: [(torch.randn(8, 2), torch.randint(0, 2, (8,)))]  # noqa: E731
    scores = iter([0.5, 0.9, 0.7, 0.6])
    history = train_with_early_stopping(model, model.parameters(), batches, lambda: next(scores), epochs=10,
                                        lr=0.1, val_every=3)
    scored = [epoch for epoch, value in enumerate(history.val_top1, 1) if value == value]
    assert scored == [3, 6, 9, 10] and history.best_epoch == 6 and history.best_val_top1 == 0.9
