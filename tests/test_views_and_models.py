"""Two views, reproducible per sample; backbones and their shapes; optimiser groups and schedule."""

import math

import pytest
import torch
from torch.utils.data import DataLoader

from ssl_pretrain.backbones import BACKBONES, build_backbone, resolve_small_stem
from ssl_pretrain.config import load_config
from ssl_pretrain.data import digits_source
from ssl_pretrain.dataset import EpochBatchSampler, TwoViewDataset, collate_views, epoch_batches
from ssl_pretrain.model import build_model
from ssl_pretrain.optim import build_optimizer, build_scheduler, parameter_groups, scaled_lr, warmup_cosine
from ssl_pretrain.transforms import build_view_transform

from conftest import tiny_config


def _dataset(seed=0):
    cfg = tiny_config()
    return TwoViewDataset(digits_source("train"), build_view_transform(cfg.augment), seed)


def test_two_views_differ_and_are_reproducible():
    dataset = _dataset()
    view_a, view_b = dataset[(0, 3)]
    assert view_a.shape == (3, 16, 16) and not torch.equal(view_a, view_b)
    again_a, again_b = dataset[(0, 3)]
    assert torch.equal(view_a, again_a) and torch.equal(view_b, again_b)
    next_epoch_a, _ = dataset[(1, 3)]
    assert not torch.equal(view_a, next_epoch_a)


def test_batches_do_not_depend_on_the_number_of_workers():
    dataset = _dataset()
    batches = []
    for workers in (0, 2):
        sampler = EpochBatchSampler(len(dataset), 32, seed=0)
        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_views, num_workers=workers)
        batches.append(next(iter(loader))["views"][0])
    assert torch.equal(batches[0], batches[1])


def test_epoch_order_is_a_seeded_permutation_and_can_start_mid_epoch():
    batches = epoch_batches(100, 16, seed=3, epoch=2)
    assert len(batches) == 6 and len({i for b in batches for i in b}) == 96
    assert batches == epoch_batches(100, 16, seed=3, epoch=2) != epoch_batches(100, 16, seed=3, epoch=3)
    sampler = EpochBatchSampler(100, 16, seed=3)
    sampler.set_epoch(2, start_step=4)
    assert [[i for _, i in b] for b in sampler] == batches[4:] and len(sampler) == 2


def test_collate_passes_skipped_files_through():
    view = torch.zeros(3, 4, 4)
    batch = collate_views([(view, view), {"skipped": "bad.jpg", "reason": "empty file"}, (view, view)])
    assert batch["views"][0].shape == (2, 3, 4, 4) and batch["skipped"] == [("bad.jpg", "empty file")]
    assert collate_views([{"skipped": "a", "reason": "r"}])["views"] is None


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_backbone_shapes(name):
    backbone, dim = build_backbone(name, small_stem=True)
    backbone.eval()
    with torch.no_grad():
        assert backbone(torch.zeros(2, 3, 32, 32)).shape == (2, dim)


def test_small_stem_keeps_resolution_and_default_follows_input_size():
    assert resolve_small_stem(None, 32) and not resolve_small_stem(None, 224) and resolve_small_stem(True, 224)
    small, _ = build_backbone("resnet18", small_stem=True)
    large, _ = build_backbone("resnet18", small_stem=False)
    assert small.conv1.kernel_size == (3, 3) and isinstance(small.maxpool, torch.nn.Identity)
    assert large.conv1.kernel_size == (7, 7)
    with pytest.raises(ValueError, match="unknown backbone 'resnet19'.*resnet18"):
        build_backbone("resnet19", True)


def test_no_weight_decay_on_norm_layers_and_biases():
    model = build_model(load_config(None, ["model.backbone=smallconv"]).model, small_stem=True)
    decay, no_decay = parameter_groups(model, 5e-4)
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_lr_scales_with_batch_and_follows_warmup_then_cosine():
    cfg = load_config(None, ["optim.lr=0.3"]).optim
    assert scaled_lr(cfg, 512) == pytest.approx(0.6)
    assert warmup_cosine(0, 100, 10) == pytest.approx(0.1) and warmup_cosine(9, 100, 10) == 1.0
    assert warmup_cosine(55, 100, 10) == pytest.approx(0.5) and warmup_cosine(100, 100, 10) == pytest.approx(0.0)
    model = torch.nn.Linear(2, 2)
    optimizer = build_optimizer(model, load_config(None, ["optim.name=lars"]).optim, 256)
    scheduler = build_scheduler(optimizer, load_config(None, ["optim.warmup_epochs=1"]).optim, 10, 5)
    rates = []
    for _ in range(50):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[9] == pytest.approx(0.06) and rates[-1] < 0.001
    assert all(later <= earlier for earlier, later in zip(rates[9:], rates[10:]))
    assert math.isclose(rates[0], 0.006)


def test_batched_views_differ_are_seeded_and_normalised():
    from ssl_pretrain.batch_transforms import batch_views, build_batch_augment

    augment = build_batch_augment(tiny_config().augment)
    images = torch.from_numpy(digits_source("train").images[:64]).unsqueeze(-1).expand(-1, -1, -1, 3).contiguous()
    view_a, view_b = batch_views(images, augment, seed=5)
    assert view_a.shape == (64, 3, 16, 16) and not torch.equal(view_a, view_b)
    again_a, _ = batch_views(images, augment, seed=5)
    other_a, _ = batch_views(images, augment, seed=6)
    assert torch.equal(view_a, again_a) and not torch.equal(view_a, other_a)
    assert -3 < view_a.mean() < 3 and view_a.std() > 0.3
