"""Warm start (issue #14 part 1): real torchvision weight files, saved and read back here (no
download), loaded into our backbones; every bad file is one line."""

from __future__ import annotations

import logging

import pytest
import torch
import torchvision

from ssl_pretrain.models.backbones import build_backbone
from ssl_pretrain.checkpoint import CheckpointError
from ssl_pretrain.cli import main
from ssl_pretrain.models.warm_start import load_init_weights, read_state_dict
from digit_files import export_random_backbone


@pytest.fixture(scope="module")
def torchvision_resnet18(tmp_path_factory):
    """A torchvision ResNet-18 as its users save it (``torch.save(model.state_dict())``, fc included)."""
    torch.manual_seed(7)
    model = torchvision.models.resnet18(weights=None)
    for module in model.modules():  # BatchNorm statistics that are not the defaults
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(model.state_dict(), path)
    return model.eval(), path


def test_a_torchvision_state_dict_gives_the_same_features(torchvision_resnet18):
    _, path = torchvision_resnet18
    backbone, _ = build_backbone("resnet18", small_stem=False)
    report = load_init_weights(backbone, path)
    assert report.unexpected == ["fc.weight", "fc.bias"] and report.missing == []
    assert len(report.matched) == len(backbone.state_dict())
    reference = torchvision.models.resnet18(weights=None)
    reference.load_state_dict(torch.load(path, weights_only=True))
    reference.fc = torch.nn.Identity()
    reference.eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(backbone.eval()(images), reference(images), atol=1e-5)
    assert "2 in the file not used (fc.weight, fc.bias)" in report.summary()


def test_wrapped_and_prefixed_weights_are_unwrapped(torchvision_resnet18, tmp_path):
    _, path = torchvision_resnet18
    plain = torch.load(path, weights_only=True)
    wrapped = tmp_path / "checkpoint.pt"
    torch.save({"state_dict": {f"module.backbone.{key}": value for key, value in plain.items()}, "epoch": 3}, wrapped)
    assert set(read_state_dict(wrapped)) == set(plain)


def test_a_file_that_does_not_fit_is_one_line(torchvision_resnet18, tmp_path):
    _, path = torchvision_resnet18
    cifar_stem, _ = build_backbone("resnet18", small_stem=True)  # 3x3 first conv, not 7x7
    with pytest.raises(CheckpointError, match=r"'conv1.weight' has shape \(64, 3, 7, 7\)") as error:
        load_init_weights(cifar_stem, path)
    assert "\n" not in str(error.value)
    small, _ = build_backbone("smallconv", small_stem=True)
    with pytest.raises(CheckpointError, match="no tensor in common"):
        load_init_weights(small, path)
    with pytest.raises(CheckpointError, match="not found"):
        load_init_weights(small, tmp_path / "missing.pth")


class _Payload:
    def __reduce__(self):
        return (print, ("code ran",))


def test_a_pickle_that_would_run_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    torch.save({"conv.weight": torch.zeros(1), "payload": _Payload()}, path)
    backbone, _ = build_backbone("smallconv", small_stem=True)
    with pytest.raises(CheckpointError, match="loaded without running code"):
        load_init_weights(backbone, path)
    assert "code ran" not in capsys.readouterr().out


def test_ssl_pretrain_init_from_one_of_our_runs_and_a_bad_one(tmp_path, caplog, capsys, torchvision_resnet18):
    source = export_random_backbone(tmp_path / "source")
    common = ["--data", "builtin:digits:train", "--epochs", "1", "--batch-size", "64", "--no-progress",
              "--set", "augment.input_size=16", "--set", "model.backbone=smallconv", "--set", "model.small_stem=true",
              "--set", "simclr.hidden_dim=64", "--set", "data.max_images=128", "--set", "train.precision=fp32"]
    with caplog.at_level(logging.INFO, logger="ssl_pretrain"):
        assert main(common + ["--out", str(tmp_path / "warm"), "--init", str(source)]) == 0
    assert "initialised from" in caplog.text and "tensors loaded" in caplog.text and "left random" not in caplog.text
    status = main(common + ["--out", str(tmp_path / "bad"), "--init", str(torchvision_resnet18[1])])
    err = capsys.readouterr().err.strip()  # the log goes to stderr too; the error is its last line
    assert status == 2 and "Traceback" not in err
    assert err.splitlines()[-1].startswith("ssl-pretrain: error:") and "no tensor in common" in err.splitlines()[-1]


def test_linear_probe_reads_a_torchvision_file_with_arch(torchvision_resnet18, digits_folders, tmp_path, capsys):
    from linear_probe.cli import main as probe_main

    _, path = torchvision_resnet18
    train, test = digits_folders
    common = ["--checkpoint", str(path), "--train", str(train), "--test", str(test), "--methods", "knn",
              "--label-fractions", "1.0", "--seeds", "1", "--no-plots", "--no-baselines", "--quiet"]
    assert probe_main(common + ["--arch", "resnet18", "--input-size", "32", "--out", str(tmp_path / "ok")]) == 0
    assert "knn" in (tmp_path / "ok" / "results.md").read_text()
    assert probe_main(common + ["--arch", "smallconv", "--out", str(tmp_path / "bad")]) == 2
    assert "no tensor in common" in capsys.readouterr().err
    assert probe_main(common + ["--arch", "resnet17", "--out", str(tmp_path / "unknown")]) == 2
    assert "unknown backbone 'resnet17'" in capsys.readouterr().err


def test_ssl_finetune_starts_from_a_torchvision_file(torchvision_resnet18, digits_folders, tmp_path):
    from ssl_classifier.cli import finetune_main
    from ssl_classifier.predict import Classifier

    _, path = torchvision_resnet18
    train, test = digits_folders
    out = tmp_path / "classifier"
    assert finetune_main(["--checkpoint", str(path), "--arch", "resnet18", "--input-size", "32", "--train", str(train),
                          "--out", str(out), "--epochs", "3", "--no-flip", "--quiet"]) == 0
    classifier = Classifier.load(out)
    assert classifier.info.architecture == "resnet18" and classifier.info.input_size == 32
    predictions = classifier.predict([str(next((test / "3").iterdir()))])
    assert len(predictions) == 1


def test_torchvision_names_read_the_hub_cache_and_fail_in_one_line_offline(torchvision_resnet18, monkeypatch, tmp_path,
                                                                          digits_folders, capsys):
    """``torchvision:MODEL[:WEIGHTS]``: a file already in torch's hub cache is read like any other
    (weights_only); with none there the download is tried, and a failed one is one line. No network
    is used: the cache holds our saved ResNet-18 under torchvision's file name, and the download
    function is replaced by one that fails as it does offline."""
    import shutil
    import urllib.error

    from linear_probe.cli import main as probe_main

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    cached = tmp_path / "torch" / "hub" / "checkpoints" / url.rsplit("/", 1)[-1]
    cached.parent.mkdir(parents=True)
    shutil.copyfile(torchvision_resnet18[1], cached)
    backbone, _ = build_backbone("resnet18", small_stem=False)
    assert len(load_init_weights(backbone, "torchvision:resnet18:IMAGENET1K_V1").matched) == len(backbone.state_dict())
    train, test = digits_folders
    assert probe_main(["--checkpoint", "torchvision:resnet18", "--input-size", "32", "--train", str(train),
                       "--test", str(test), "--methods", "knn", "--label-fractions", "1.0", "--seeds", "1",
                       "--no-plots", "--no-baselines", "--quiet", "--out", str(tmp_path / "eval")]) == 0  # DEFAULT = V1

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(CheckpointError, match="cannot download torchvision:resnet34.*put it at") as error:
        read_state_dict("torchvision:resnet34:IMAGENET1K_V1")
    assert "\n" not in str(error.value)
    for name, fragment in [("torchvision:resnet18:IMAGENET9K", "choose from IMAGENET1K_V1, DEFAULT"),
                           ("torchvision:nonet", "no model 'nonet'"), ("torchvision:a:b:c", "not torchvision:MODEL")]:
        with pytest.raises(CheckpointError, match=fragment):
            read_state_dict(name)
    status = main(["--config", "configs/demo_digits.yaml", "--out", str(tmp_path / "run"), "--set",
                   "model.backbone=resnet18", "--init", "torchvision:resnet34", "--epochs", "1", "--no-progress"])
    last = capsys.readouterr().err.strip().splitlines()[-1]  # the log lines come before it
    assert status == 2 and last.startswith("ssl-pretrain: error: cannot download torchvision:resnet34 from https://")


def test_the_warm_start_preset_continues_from_a_torchvision_resnet18(torchvision_resnet18, tmp_path):
    """configs/warm_start_resnet18.yaml as written (ImageNet stem, its recipe), at 64 px and a
    batch of 8 so that a CPU test can run two steps: every backbone tensor comes from the file."""
    from digit_files import write_digits_folder

    data = write_digits_folder(tmp_path / "images", 2)  # 20 real digits
    out = tmp_path / "adapted"
    assert main(["--data", str(data), "--config", "configs/warm_start_resnet18.yaml", "--init",
                 str(torchvision_resnet18[1]), "--set", "augment.input_size=64", "--set", "train.batch_size=8",
                 "--set", "train.precision=fp32", "--epochs", "1", "--out", str(out), "--no-progress"]) == 0
    log_text = (out / "train.log").read_text()
    assert "120 tensors loaded, 2 in the file not used (fc.weight, fc.bias)" in log_text and "left random" not in log_text
    assert "resnet18, 1 epochs, peak lr 0.0009375" in log_text  # 0.03 per 256 images at batch 8
    assert (out / "backbone.safetensors").is_file()
