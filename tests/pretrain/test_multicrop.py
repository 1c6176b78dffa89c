"""Multi-crop (SwAV/DINO): small local views on top of the two full-size views, for DINO and SimCLR,
in the in-memory batch pipeline; the global views are the same with or without them, SimCLR's loss
is the mean NT-Xent over the pairs SwAV names, and a run with them resumes bit-exactly."""

import numpy as np
import pytest
import torch

from tiny_runs import kill_after_checkpoint
from ssl_pretrain import cli
from ssl_pretrain.augment.batch_transforms import batch_views, build_batch_augment
from ssl_pretrain.config import ConfigError, load_config
from ssl_pretrain.data import digits_source
from ssl_pretrain.methods import simclr
from loss_references import build, nt_xent_reference, recorded
from tiny_runs import checkpoint_model, pretrain_args

LOCAL = ["--set", "augment.local_views=2"]


def digit_batch(count: int = 12) -> torch.Tensor:
    """Real digits as a uint8 batch ``(B, 16, 16, 3)`` (8x8 upscaled, grey in three channels)."""
    gray = torch.from_numpy(np.asarray(digits_source("train").images[:count], dtype=np.float32))
    upscaled = torch.nn.functional.interpolate(gray[:, None], size=16).round().byte()
    return upscaled[:, 0, :, :, None].expand(-1, -1, -1, 3).contiguous()


def test_local_views_come_after_the_two_and_leave_them_unchanged():
    cfg = load_config(None, ["method=dino", "augment.input_size=16", "augment.local_views=3"]).augment
    images = digit_batch()
    two = batch_views(images, build_batch_augment(cfg), seed=7)
    many = batch_views(images, build_batch_augment(cfg), 7, build_batch_augment(cfg, local=True), 3)
    assert len(two) == 2 and len(many) == 5
    assert torch.equal(many[0], two[0]) and torch.equal(many[1], two[1])
    assert cfg.local_size == 8 and all(view.shape == (12, 3, 8, 8) for view in many[2:])
    assert not torch.equal(many[2], many[3]) and not torch.equal(many[3], many[4])  # drawn per view


def test_local_size_defaults_to_three_sevenths_of_the_input():
    assert load_config(None, ["method=dino", "augment.local_views=6"]).augment.local_size == 14  # 32 px
    assert load_config(None, ["augment.recipe=imagenet"]).augment.local_size == 96  # DINO's 96 of 224


@pytest.mark.parametrize("overrides, message", [
    (["method=byol", "augment.local_views=2"], r"used by simclr, dino only; method byol trains on two views"),
    (["method=dino", "augment.local_views=2", "augment.local_scale=[0.5,0.2]"], r"local_scale must be"),
])
def test_multi_crop_settings_that_do_not_fit_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError, match=message) as error:
        load_config(None, overrides)
    assert "\n" not in str(error.value)


def test_multi_crop_on_the_per_image_pipeline_is_turned_off_with_a_logged_line(tmp_path):
    assert cli.main(pretrain_args("dino", tmp_path / "run", *LOCAL, "--set", "data.pipeline=pil")) == 0
    assert "trained without the 2 local views" in (tmp_path / "run" / "train.log").read_text()
    assert "local_views: 0" in (tmp_path / "run" / "config.yaml").read_text()  # the run says what it trained


@pytest.mark.parametrize("method", ["dino", "simclr"])
def test_multi_crop_trains_and_resumes_bit_exactly(method, tmp_path, monkeypatch, caplog):
    straight = tmp_path / "straight"
    assert cli.main(pretrain_args(method, straight, *LOCAL)) == 0
    assert "+ 2 local views of 8 px" in (straight / "train.log").read_text()
    killed = tmp_path / "killed"
    undo = kill_after_checkpoint(monkeypatch, 3)
    assert cli.main(pretrain_args(method, killed, *LOCAL)) == 130
    undo()
    assert cli.main(pretrain_args(method, killed, *LOCAL, "--resume")) == 0
    one, two = checkpoint_model(straight), checkpoint_model(killed)
    assert one.keys() == two.keys() and all(torch.equal(one[key], two[key]) for key in one)
    plain = tmp_path / "plain"  # the local views change what is learnt
    assert cli.main(pretrain_args(method, plain)) == 0
    assert not torch.equal(checkpoint_model(plain)["backbone.features.0.weight"], one["backbone.features.0.weight"])


def test_simclr_multi_crop_loss_is_the_mean_over_global_pairs_and_each_crop_with_both_globals():
    cfg = load_config(None, ["augment.input_size=16", "augment.local_views=2"]).augment
    images = torch.from_numpy(np.repeat(digits_source("train").images[:16, ..., None], 3, axis=-1))
    views = list(batch_views(images, build_batch_augment(cfg), 3, build_batch_augment(cfg, local=True), 2))
    method = build(simclr, temperature=0.2, hidden_dim=16, output_dim=8)
    with recorded(method, "projection_head") as out:
        ours = method(views).item()
    big, small = out["projection_head"]  # the two 16-px views in one pass, the two 8-px crops in another
    z = np.split(big, 2) + np.split(small, 2)
    pairs = [(0, 1), (0, 2), (1, 2), (0, 3), (1, 3)]
    expected = np.mean([nt_xent_reference(z[a], z[b], 0.2) for a, b in pairs])
    assert ours == pytest.approx(expected, rel=1e-5)
    assert method(views[:2]).item() == pytest.approx(nt_xent_reference(*np.split(big, 2), 0.2), rel=1e-5)
