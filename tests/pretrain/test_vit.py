"""The ViT backbones (``vit-tiny``, ``vit-small``) and MAE: shapes and patch sizes, images of other
sizes through resampled position embeddings, export and reload, MAE's loss against a restatement
of the paper's, MAE and DINO multi-crop end to end through ``ssl-pretrain`` on real digits, a
bit-exact resume of MAE after a kill, the ONNX export of a ViT classifier, and the one-line error
for a method/backbone pair that does not fit."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.models.vision_transformer import VisionTransformer

from ssl_pretrain import cli
from ssl_pretrain.checkpoint import BackboneInfo, export_backbone, load_backbone, read_backbone_file
from ssl_pretrain.config import ConfigError, load_config
from ssl_pretrain.methods import mae
from ssl_pretrain.models.backbones import BACKBONES, ViTBackbone, build_backbone

from tiny_runs import kill_after_checkpoint
from loss_references import digit_views, recorded
from tiny_runs import checkpoint_model

RTOL = 1e-5


def vit(size: int, small_stem: bool = True, name: str = "vit-tiny", seed: int = 0) -> ViTBackbone:
    torch.manual_seed(seed)
    return build_backbone(name, small_stem, size)[0].eval()


# ---------------------------------------------------------------------------------------------
# The backbone


@pytest.mark.parametrize("name, dim, heads", [("vit-tiny", 192, 3), ("vit-small", 384, 6)])
def test_vit_patch_size_follows_the_stem_and_features_are_the_class_token(name, dim, heads):
    small = vit(32, name=name)
    assert (small.patch_size, small.seq_length, small.hidden_dim) == (4, 8 * 8 + 1, dim)
    assert small.encoder.layers[0].self_attention.num_heads == heads and len(small.encoder.layers) == 12
    with torch.no_grad():
        assert small(torch.rand(2, 3, 32, 32)).shape == (2, dim)
    large = vit(224, small_stem=False, name=name)
    assert (large.patch_size, large.seq_length) == (16, 14 * 14 + 1)
    assert not BACKBONES[name].cpu_sized and BACKBONES[name].feature_dim == dim


def test_at_its_own_size_the_backbone_is_torchvisions_vit_bit_for_bit():
    """The forward that accepts other sizes computes, at the built size, what torchvision's does
    (class token after the final LayerNorm)."""
    ours = vit(32)
    reference = VisionTransformer(32, 4, 12, 3, 192, 768)
    reference.heads = torch.nn.Identity()
    reference.load_state_dict(ours.state_dict())
    images = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(ours(images), reference.eval()(images))


def test_another_size_runs_with_resampled_position_embeddings():
    """A 32-px ViT on 16-px images equals a ViT built for 16 px whose position embeddings are the
    32-px ones resampled to the 4x4 grid (the class token's unchanged); a constant grid
    resamples to itself; non-square multiples of the patch work."""
    built_32, built_16 = vit(32), vit(16, seed=1)
    resampled = built_32.position_embedding(4, 4)
    assert resampled.shape == (1, 17, 192) and torch.equal(resampled[:, 0], built_32.encoder.pos_embedding[:, 0])
    state = {**built_32.state_dict(), "encoder.pos_embedding": resampled.detach()}
    built_16.load_state_dict(state)
    images = digit_views(4)[0]
    with torch.no_grad():
        assert torch.allclose(built_32(images), built_16(images), rtol=0, atol=1e-6)
        assert built_32(torch.rand(2, 3, 16, 32)).shape == (2, 192)
        built_32.encoder.pos_embedding[:, 1:] = torch.linspace(-1, 1, 192)
        constant = built_32.position_embedding(3, 5)[:, 1:]
    assert torch.allclose(constant, torch.linspace(-1, 1, 192).expand(1, 15, 192), atol=1e-6)


def test_an_image_the_patches_do_not_tile_is_a_clear_error():
    backbone = vit(32)
    with pytest.raises(ValueError, match=r"30x30 px is not a multiple of its patch size 4 px"):
        backbone(torch.rand(1, 3, 30, 30))
    with pytest.raises(ValueError, match=r"18 px is not a multiple of its patch size 4 px"):
        build_backbone("vit-tiny", True, 18)


def test_an_exported_vit_reloads_at_its_input_size_with_identical_features(tmp_path):
    """Built for 16 px (a 4x4 grid): the reload must use the exported input size, or the position
    embeddings would not even load."""
    backbone = vit(16)
    info = BackboneInfo("vit-tiny", True, 192, 16, (0.25,) * 3, (0.35,) * 3)
    export_backbone(tmp_path / "backbone.safetensors", backbone, info)
    loaded, loaded_info = load_backbone(tmp_path)
    assert loaded_info == info and loaded.encoder.pos_embedding.shape == (1, 17, 192)
    images = digit_views(8)[0]
    with torch.no_grad():
        assert torch.equal(loaded(images), backbone(images))


def test_a_classifier_at_another_size_rebuilds_its_vit_as_pretrained(tmp_path):
    """``ssl-finetune --input-size 24`` on a backbone pretrained at 16 px: the classifier file says
    24 px, the ViT inside keeps its 16-px (4x4) position embeddings, and the reload gives the same
    logits; a size the patches do not tile is the classifier's one-line error."""
    from ssl_classifier.model import ClassifierError, ClassifierInfo, ImageClassifier, load_network, save_classifier
    from ssl_classifier.train import check_input_size

    mean, std = (0.25,) * 3, (0.35,) * 3
    network = ImageClassifier(vit(16), 192, 10, mean, std).eval()
    save_classifier(tmp_path, network, ClassifierInfo([str(d) for d in range(10)], "vit-tiny", True, 192, 24, mean, std))
    loaded, info = load_network(tmp_path)
    assert info.input_size == 24 and loaded.backbone.encoder.pos_embedding.shape == (1, 17, 192)
    images = torch.rand(3, 3, 24, 24)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(images), network(images))
    with pytest.raises(ClassifierError, match=r"^input size 18 px does not fit the vit-tiny backbone: .*patch size 4 px"):
        check_input_size(network.backbone, 18, "vit-tiny", 16)


def test_list_backbones_shows_the_vits(capsys):
    assert cli.main(["--list-backbones"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "192-d" in lines["vit-tiny"] and "384-d" in lines["vit-small"]


# ---------------------------------------------------------------------------------------------
# MAE's loss


def patchify_reference(images: np.ndarray, patch: int) -> np.ndarray:
    """``(B, C, H, W)`` -> ``(B, rows * columns, patch * patch * C)``, patches in row-major order,
    pixels row by row with the channels innermost (the authors' ``patchify``)."""
    b, c, h, w = images.shape
    grid = images.reshape(b, c, h // patch, patch, w // patch, patch).transpose(0, 2, 4, 3, 5, 1)
    return grid.reshape(b, (h // patch) * (w // patch), patch * patch * c)


def mae_reference(predictions: np.ndarray, masked: np.ndarray, images: np.ndarray, patch: int,
                  norm_pix_loss: bool) -> float:
    """MAE (He et al. 2021), Sec. 3 and the authors' ``forward_loss``: targets are the image's
    patches, each normalised by its own mean and (unbiased) variance + 1e-6 with
    ``norm_pix_loss``; the loss is the per-patch mean squared error averaged over the masked
    patches only (``(loss * mask).sum() / mask.sum()``). ``predictions[b, j]`` is the prediction
    for patch ``masked[b, j]``."""
    target = patchify_reference(images, patch)
    if norm_pix_loss:
        target = (target - target.mean(-1, keepdims=True)) / np.sqrt(target.var(-1, ddof=1, keepdims=True) + 1e-6)
    full = np.zeros_like(target)
    mask = np.zeros(target.shape[:2])
    for b in range(len(target)):
        full[b, masked[b]] = predictions[b]
        mask[b, masked[b]] = 1
    per_patch = ((full - target) ** 2).mean(-1)
    return float((per_patch * mask).sum() / mask.sum())


def small_mae(norm_pix_loss: bool = True) -> mae.MAE:
    settings = mae.Settings(decoder_dim=32, decoder_depth=1, decoder_heads=2, norm_pix_loss=norm_pix_loss)
    backbone = vit(16)
    return mae.build(backbone, 192, settings).train()


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_mae_loss_is_the_papers_masked_patch_error(norm_pix_loss):
    """On 16 augmented real digits at 16 px (4x4 patches of 4 px): the encoder sees the class
    token and 25% of the patches, and the loss is the paper's. The mask is redrawn here from the
    same seed: ``random_token_mask`` draws one uniform number per token and keeps the lowest
    (the class token's is never masked)."""
    method = small_mae(norm_pix_loss)
    images = digit_views()[0]
    seen = []
    method.backbone.encoder.layers.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape))
    torch.manual_seed(1)
    with recorded(method.decoder, "prediction_head") as out:
        loss = method([images, torch.zeros_like(images)]).item()  # the second view is ignored
    torch.manual_seed(1)
    order = np.argsort(torch.rand(16, 17)[:, 1:].numpy(), axis=1)
    visible = int(16 * (1 - 0.75))
    assert seen == [(16, 1 + visible, 192)]
    expected = mae_reference(out["prediction_head"][0], order[:, visible:], images.double().numpy(), 4, norm_pix_loss)
    assert loss == pytest.approx(expected, rel=RTOL)


def test_mae_trains_the_backbone_it_exports():
    """``backbone`` and the masked encoder are one set of weights; the loss's gradient reaches them."""
    method = small_mae()
    images = digit_views(8)[0]
    assert method.encoder.vit is method.backbone
    with torch.no_grad():
        assert torch.equal(method.backbone(images), method.encoder(images))
    method([images]).backward()
    assert method.backbone.conv_proj.weight.grad.abs().sum() > 0
    assert method.backbone.encoder.layers[-1].mlp[0].weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# End to end through ssl-pretrain


def pretrain_args(method: str, out: Path, *settings: str, epochs: int = 2, extra: tuple = ()) -> list[str]:
    common = ["data.num_workers=0", "augment.input_size=16", "augment.min_scale=0.25", "model.backbone=vit-tiny",
              "train.precision=fp32", "optim.warmup_epochs=0", "train.log_every_steps=1"]
    return ["--data", "builtin:digits:train", "--out", str(out), "--method", method, "--epochs", str(epochs),
            "--no-progress", *[part for s in [*common, *settings] for part in ("--set", s)], *extra]


MAE_SETTINGS = ("data.max_images=64", "train.batch_size=32", "train.checkpoint_every_steps=1",
                "mae.decoder_dim=32", "mae.decoder_depth=1", "mae.decoder_heads=2")
KILL_AT_STEP = 3  # 2 epochs of 2 steps: mid-way through the second


@pytest.fixture(scope="module")
def mae_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mae") / "run"
    assert cli.main(pretrain_args("mae", out, *MAE_SETTINGS)) == 0
    return out


def losses(run: Path) -> tuple[list[float], list[float]]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r], [r["loss_mean"] for r in records if "loss_mean" in r]


def test_mae_trains_end_to_end_and_exports_the_vit(mae_run):
    steps, epochs = losses(mae_run)
    assert len(steps) == 4 and len(epochs) == 2 and all(math.isfinite(value) for value in steps + epochs)
    backbone, info = load_backbone(mae_run)
    assert (info.architecture, info.feature_dim, info.input_size, info.small_stem) == ("vit-tiny", 192, 16, True)
    with torch.no_grad():
        assert backbone(digit_views(3)[0]).shape == (3, 192)
    exported, _ = read_backbone_file(mae_run / "backbone.safetensors")
    model = checkpoint_model(mae_run)
    # the export is the trained backbone, and the masked encoder trained those very weights
    assert all(torch.equal(tensor, model[f"backbone.{key}"]) for key, tensor in exported.items())
    assert all(torch.equal(tensor, model[f"encoder.vit.{key}"]) for key, tensor in exported.items())


@pytest.mark.slow
def test_mae_resumes_bit_exactly_after_a_kill(mae_run, tmp_path, monkeypatch):
    """Killed right after the checkpoint of step 3, resumed: the same final state as the
    uninterrupted run, bit for bit (the masks are drawn from the checkpointed random state)."""
    killed = tmp_path / "killed"
    undo = kill_after_checkpoint(monkeypatch, KILL_AT_STEP)
    assert cli.main(pretrain_args("mae", killed, *MAE_SETTINGS)) == 130
    undo()
    assert cli.main(pretrain_args("mae", killed, *MAE_SETTINGS, extra=("--resume",))) == 0
    straight, resumed = checkpoint_model(mae_run), checkpoint_model(killed)
    assert straight.keys() == resumed.keys()
    assert [key for key in straight if not torch.equal(straight[key], resumed[key])] == []


@pytest.mark.slow
def test_dino_trains_a_vit_on_multi_crop_views(tmp_path, monkeypatch):
    """Two 16-px global views and two 8-px local crops (2x2 patches) per digit, all through the
    student ViT: the local crops need the resampled position embeddings."""
    sizes = set()
    forward = ViTBackbone.forward
    monkeypatch.setattr(ViTBackbone, "forward", lambda self, images: sizes.add(images.shape[-1]) or forward(self, images))
    out = tmp_path / "run"
    settings = ("data.max_images=32", "train.batch_size=16", "augment.local_views=2",
                "dino.hidden_dim=64", "dino.bottleneck_dim=32", "dino.output_dim=128")
    assert cli.main(pretrain_args("dino", out, *settings, epochs=1)) == 0
    steps, epochs = losses(out)
    assert len(steps) == 2 and all(math.isfinite(value) for value in steps + epochs)
    assert sizes == {16, 8}
    assert load_backbone(out)[1].architecture == "vit-tiny"


# ---------------------------------------------------------------------------------------------
# Bad pairs, export


def test_mae_on_a_cnn_is_a_one_line_config_error(tmp_path, capsys):
    with pytest.raises(ConfigError) as error:
        load_config(None, ["method=mae", "model.backbone=smallconv"])
    message = str(error.value)
    assert "\n" not in message and "vit-tiny, vit-small" in message and "smallconv" in message
    capsys.readouterr()
    assert cli.main(["--data", "builtin:digits:train", "--out", str(tmp_path / "run"),
                     "--set", "method=mae", "--set", "model.backbone=smallconv"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ssl-pretrain: error:")]
    assert len(errors) == 1 and "vit-tiny, vit-small" in errors[0]
    assert not (tmp_path / "run").exists()


def test_view_sizes_the_patches_do_not_tile_are_a_config_error():
    """DINO's default local crops of a 32-px run are 14 px (3/7): 4-px patches do not tile them,
    which the config says before any training, rather than the first step."""
    with pytest.raises(ConfigError, match=r"augment\.local_size 14 px is not a multiple of the vit-tiny patch size, 4 px"):
        load_config(None, ["method=dino", "model.backbone=vit-tiny", "augment.local_views=2"])
    load_config(None, ["method=dino", "model.backbone=vit-tiny", "augment.local_views=2", "augment.local_size=12"])
    with pytest.raises(ConfigError, match=r"augment\.input_size 30 px"):
        load_config(None, ["model.backbone=vit-small", "augment.input_size=30"])


@pytest.mark.slow
def test_a_vit_classifier_exports_to_onnx(tmp_path):
    """``ssl-export``'s ONNX path (dynamic batch, checked against PyTorch in onnxruntime by the
    export itself) works for a ViT backbone."""
    pytest.importorskip("onnxruntime")
    from ssl_classifier.export import export_classifier
    from ssl_classifier.model import ClassifierInfo, ImageClassifier, save_classifier

    backbone = vit(16)
    mean, std = (0.25,) * 3, (0.35,) * 3
    info = ClassifierInfo([str(digit) for digit in range(10)], "vit-tiny", True, 192, 16, mean, std)
    save_classifier(tmp_path, ImageClassifier(backbone, 192, 10, mean, std).eval(), info)
    result = export_classifier(tmp_path, "onnx")
    assert result.max_abs_diff is not None and result.max_abs_diff <= 1e-4
    import onnxruntime

    session = onnxruntime.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    assert session.run(None, {"images": np.random.default_rng(0).random((5, 3, 16, 16), dtype=np.float32)})[0].shape == (5, 10)
