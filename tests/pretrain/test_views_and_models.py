"""Two views, reproducible per sample; backbones and their shapes; optimiser groups and schedule."""

import math

import pytest
import numpy as np
import torch
from torch.utils.data import DataLoader

from ssl_pretrain.models.backbones import BACKBONES, build_backbone, resolve_small_stem
from ssl_pretrain.config import load_config
from ssl_pretrain.data import digits_source
from ssl_pretrain.data.dataset import EpochBatchSampler, TwoViewDataset, collate_views, epoch_batches
from ssl_pretrain.methods import build_model
from ssl_pretrain.engine.optim import build_optimizer, build_scheduler, parameter_groups, scaled_lr, warmup_cosine
from ssl_pretrain.augment.transforms import build_view_transform

from tiny_runs import tiny_config


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
    model = build_model(load_config(None, ["model.backbone=smallconv"]))
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
    assert rates[9] == pytest.approx(0.12) and rates[-1] < 0.001
    assert all(later <= earlier for earlier, later in zip(rates[9:], rates[10:]))
    assert math.isclose(rates[0], 0.012)


def test_batched_views_differ_are_seeded_and_normalised():
    from ssl_pretrain.augment.batch_transforms import batch_views, build_batch_augment

    augment = build_batch_augment(tiny_config().augment)
    images = torch.from_numpy(digits_source("train").images[:64]).unsqueeze(-1).expand(-1, -1, -1, 3).contiguous()
    view_a, view_b = batch_views(images, augment, seed=5)
    assert view_a.shape == (64, 3, 16, 16) and not torch.equal(view_a, view_b)
    again_a, _ = batch_views(images, augment, seed=5)
    other_a, _ = batch_views(images, augment, seed=6)
    assert torch.equal(view_a, again_a) and not torch.equal(view_a, other_a)
    assert -3 < view_a.mean() < 3 and view_a.std() > 0.3


def test_grey_images_skip_the_colour_steps_with_the_same_views_and_random_stream():
    """On grey images saturation, hue and grey-scale change nothing (up to the luma weights'
    rounding, which sum to 0.9999): skipping them gives the same views and leaves the random
    stream where the full augmentation leaves it."""
    from ssl_pretrain.augment.batch_transforms import batch_views, build_batch_augment

    cfg = load_config(None, ["augment.input_size=16"]).augment  # jitter 0.8 and grey-scale 0.2, as for CIFAR
    images = torch.from_numpy(digits_source("train").images[:64]).unsqueeze(-1).expand(-1, -1, -1, 3).contiguous()
    full = batch_views(images, build_batch_augment(cfg), seed=5)
    after_full = torch.rand(4)
    skipped = batch_views(images, build_batch_augment(cfg, grey=True), seed=5)
    assert torch.equal(torch.rand(4), after_full)
    for a, b in zip(full, skipped):
        torch.testing.assert_close(b, a, rtol=0, atol=2e-3)  # normalised units: 2e-3 x 0.225 < 1/1000 of a grey level


def test_pretraining_on_grey_images_says_it_skips_the_colour_steps(tmp_path):
    from ssl_pretrain.train import pretrain

    pretrain(tiny_config(), tmp_path / "run", progress=False)
    assert "grey images: no saturation, hue or grey-scale steps" in (tmp_path / "run" / "train.log").read_text()


def test_batch_colour_jitter_is_torchvision_per_image():
    """Reference: torchvision's functional colour ops, image by image, same factors and order."""
    import torchvision.transforms.functional as TF

    from ssl_pretrain.augment.batch_transforms import BatchColorJitter

    torch.manual_seed(0)
    jitter = BatchColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8)
    images = torch.rand(12, 3, 8, 8)
    images[0] = 0.5  # grey: hue undefined, saturation zero
    images[1, :, :4] = 1.0  # saturated and clipped pixels
    orders = set()
    for _ in range(8):
        params = jitter.draw(len(images), "cpu")
        orders.add(tuple(params["order"].tolist()))
        expected = []
        for i, image in enumerate(images):
            for step in params["order"].tolist():
                op, key = [(TF.adjust_brightness, "brightness"), (TF.adjust_contrast, "contrast"),
                           (TF.adjust_saturation, "saturation"), (TF.adjust_hue, "hue")][step]
                image = op(image, params[key][i].item())
            expected.append(image)
        torch.testing.assert_close(jitter.apply(images, params), torch.stack(expected), rtol=0, atol=1e-5)
    assert len(orders) > 1
    # About 80% of images are jittered; the others keep neutral factors and come back unchanged.
    params = jitter.draw(10_000, "cpu")
    share = (params["brightness"] != 1).float().mean().item()
    assert 0.77 < share < 0.83
    assert params["hue"].abs().max() <= 0.1 and (params["contrast"] - 1).abs().max() <= 0.4


def test_batch_resized_crop_flip_is_torchvision_resized_crop():
    """Reference: torchvision's resized_crop (bilinear) and hflip per image, same boxes. When a box
    is smaller than the output, our sampling may reach half a pixel past the box edge (into the
    image) where torchvision clamps to the box: only the outermost output pixels may differ."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    from ssl_pretrain.augment.batch_transforms import BatchResizedCropFlip

    torch.manual_seed(0)
    crop = BatchResizedCropFlip(16, (0.08, 1.0))
    images = torch.rand(64, 3, 32, 40)
    params = crop.draw(len(images), 32, 40, "cpu")
    out = crop.apply(images, params)
    assert out.shape == (64, 3, 16, 16) and params["flip"].any() and not params["flip"].all()
    for image, result, box, flip in zip(images, out, params["boxes"].tolist(), params["flip"].tolist()):
        x0, y0, w, h = map(int, box)
        assert 0 <= x0 and x0 + w <= 40 and 0 <= y0 and y0 + h <= 32
        assert 0.08 * 32 * 40 * 0.9 <= w * h <= 32 * 40 and 3 / 4 * 0.8 <= w / h <= 4 / 3 * 1.2
        expected = TF.resized_crop(image, y0, x0, h, w, [16, 16], InterpolationMode.BILINEAR, antialias=False)
        expected = TF.hflip(expected) if flip else expected
        torch.testing.assert_close(result[:, 1:-1, 1:-1], expected[:, 1:-1, 1:-1], rtol=0, atol=1e-5)
        if w >= 16 and h >= 16:
            torch.testing.assert_close(result, expected, rtol=0, atol=1e-5)
    # The boxes follow torchvision's RandomResizedCrop.get_params (area and aspect quantiles).
    from torchvision.transforms import RandomResizedCrop

    boxes = crop.draw(20_000, 32, 32, "cpu")["boxes"].numpy()
    reference = np.array([RandomResizedCrop.get_params(torch.zeros(3, 32, 32), [0.08, 1.0], [3 / 4, 4 / 3])
                          for _ in range(20_000)], dtype=np.float32)  # (top, left, h, w)
    ours_area, ref_area = boxes[:, 2] * boxes[:, 3], reference[:, 3] * reference[:, 2]
    ours_aspect, ref_aspect = boxes[:, 2] / boxes[:, 3], reference[:, 3] / reference[:, 2]
    for q in (0.1, 0.5, 0.9):
        assert abs(np.quantile(ours_area, q) - np.quantile(ref_area, q)) < 0.03 * 1024
        assert abs(np.quantile(ours_aspect, q) - np.quantile(ref_aspect, q)) < 0.05
