"""A recipe from the data (issue #25, items 1 and 5): with no --config, ssl-pretrain surveys the
images, the machine and the --init weights and chooses the settings the tuned presets would, each
with its reason; presets and --set still win; the advice warnings fire where the data asks."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import yaml
from PIL import Image

from ssl_pretrain import cli, survey
from ssl_pretrain import recipe as recipe_module
from ssl_pretrain.config import load_config
from ssl_pretrain.data.sources import ArraySource
from ssl_pretrain.methods import build_model
from ssl_pretrain.models.warm_start import load_init_weights
from ssl_pretrain.recipe import DataRecipe, advise, choose_recipe, log_recipe
from ssl_pretrain.survey import DataSurvey, MachineSurvey, survey_data, survey_init, survey_machine

from digit_files import export_random_backbone, write_digit_images

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
CPU = MachineSurvey("cpu", False, 2, "test CPU")
CPU_BF16 = MachineSurvey("cpu", True, 32, "test CPU with AMX")
CPU_BF16_2 = MachineSurvey("cpu", True, 2, "test CPU with AVX512-BF16, 2 cores")
GPU = MachineSurvey("cuda", True, 16, "test GPU")


def write_folder(folder: Path, count: int, sizes, mode: str = "RGB", suffix: str = "png", seed: int = 0) -> Path:
    """``count`` random images; ``sizes(index) -> (width, height)``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        width, height = sizes(index)
        pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).convert(mode).save(folder / f"{index:03d}.{suffix}")
    return folder


def chosen(recipe: DataRecipe) -> dict:
    return {choice.key: choice.value for choice in recipe.choices}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("surveyed")
    rng = np.random.default_rng(1)
    return {
        "digits": write_digit_images(root / "digits", 40, with_classes=False, size=8)[0].parent,  # grey, saved as RGB
        "colour32": write_folder(root / "colour32", 40, lambda i: (32, 32)),
        "tiles64": write_folder(root / "tiles64", 40, lambda i: (64, 64)),
        "photos": write_folder(root / "photos", 30, lambda i: tuple(int(s) for s in rng.integers(100, 301, 2)),
                               suffix="jpg"),
        "grey_photos": write_folder(root / "grey_photos", 12, lambda i: (160, 120), mode="L", suffix="jpg"),
    }


@pytest.fixture(scope="module")
def imagenet_resnet18(tmp_path_factory) -> Path:
    """A torchvision ResNet-18 state dict (random weights; the ImageNet stem, conv1 (64, 3, 7, 7))."""
    path = tmp_path_factory.mktemp("init") / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return path


def test_the_survey_reads_sizes_grey_and_formats(folders):
    digits = survey_data(str(folders["digits"]))
    assert digits.count == 40 and digits.one_size == (8, 8) and digits.grey and digits.formats == {"PNG": 40}
    photos = survey_data(str(folders["photos"]))
    low, median, high = photos.short_side
    assert 100 <= low <= median <= high <= 300 and photos.one_size is None and not photos.grey
    assert photos.formats == {"JPEG": 30} and "shorter side" in photos.summary()
    assert survey_data(str(folders["grey_photos"])).grey
    cut = survey_data(str(folders["photos"]), sample=10)
    assert cut.sampled == 10 and cut.count == 30


@pytest.mark.parametrize("name, expected, absent", [
    ("digits", {"augment.input_size": 16, "model.backbone": "smallconv-s", "model.small_stem": True,
                "augment.gray_prob": 0.0, "augment.hflip_prob": 0.0, "augment.min_scale": 0.25}, ["augment.local_views"]),
    ("colour32", {"augment.input_size": 32, "model.backbone": "smallconv-xs", "model.small_stem": False,
                  "augment.local_views": 4, "augment.local_size": 16}, ["augment.gray_prob", "augment.hflip_prob"]),
    ("tiles64", {"augment.input_size": 64, "model.small_stem": False, "augment.local_size": 32}, []),
    ("photos", {"augment.input_size": 96, "model.backbone": "smallconv-xs", "augment.recipe": "imagenet",
                "train.time_budget_minutes": 15}, ["augment.local_views", "augment.gray_prob"]),
])
def test_the_recipe_fits_the_folder_on_a_cpu(folders, name, expected, absent):
    recipe = choose_recipe(survey_data(str(folders[name])), CPU, None, {})
    settings = chosen(recipe)
    assert {key: settings.get(key) for key in expected} == expected
    assert not set(absent) & set(settings)
    assert all(choice.reason for choice in recipe.choices)
    cfg = load_config(None, [f"data.source={folders[name]}"], recipe.settings())  # a valid config
    assert cfg.survey_choices.keys() == settings.keys()


def test_the_recipe_follows_the_machine(folders):
    photos = survey_data(str(folders["photos"]))
    on_gpu = chosen(choose_recipe(photos, GPU, None, {}))
    assert on_gpu["model.backbone"] == "resnet18" and on_gpu["model.small_stem"] is False
    assert on_gpu["augment.input_size"] >= 96 and "train.time_budget_minutes" not in on_gpu
    small = chosen(choose_recipe(survey_data(str(folders["colour32"])), GPU, None, {}))
    assert small["model.small_stem"] is True and "augment.local_views" not in small
    bf16 = chosen(choose_recipe(photos, CPU_BF16, None, {}))
    assert bf16["model.backbone"] == "smallconv" and bf16["augment.input_size"] == 128
    assert chosen(choose_recipe(photos, CPU_BF16_2, None, {}))["augment.input_size"] == 96
    assert survey_machine("cpu").device == "cpu"


def test_the_quick_timing_counts_every_view():
    two_views = load_config(None, ["model.backbone=smallconv-xs", "augment.input_size=16"])
    multi_crop = load_config(None, ["model.backbone=smallconv-xs", "augment.input_size=16", "augment.local_views=4",
                                    "augment.local_size=8"])
    assert survey.measure_images_per_second(two_views, CPU, batch=4, steps=1) > 0
    assert survey.measure_images_per_second(multi_crop, CPU, batch=4, steps=1) > 0


def _preset_keys(cfg) -> dict:
    return {"input_size": cfg.augment.input_size, "min_scale": cfg.augment.min_scale,
            "hflip": cfg.augment.hflip_prob, "backbone": cfg.model.backbone,
            "small_stem": cfg.model.small_stem in (True, None) if cfg.augment.input_size <= 16 else cfg.model.small_stem,
            "local_views": cfg.augment.local_views, "local_size": cfg.augment.local_size if cfg.augment.local_views else None,
            "temperature": cfg.simclr.temperature, "hidden_dim": cfg.simclr.hidden_dim, "lr": cfg.optim.lr,
            "warmup": cfg.optim.warmup_epochs, "batch": cfg.train.batch_size, "epochs": cfg.train.epochs}


def test_digits_get_the_demo_preset():
    recipe = choose_recipe(survey_data("builtin:digits:train"), CPU, None, {})
    cfg = load_config(None, ["data.source=builtin:digits:train"], recipe.settings())
    preset = load_config(CONFIGS / "demo_digits.yaml")  # its fp32 variant: the tests' CPU has no fast bf16
    assert _preset_keys(cfg) == _preset_keys(preset)
    assert cfg.augment.gray_prob == preset.augment.gray_prob == 0.0


def test_cifar10_gets_the_cpu_preset(monkeypatch):
    images = np.random.default_rng(0).integers(0, 256, size=(50_000, 32, 32, 3), dtype=np.uint8)
    monkeypatch.setattr(survey, "open_source", lambda spec, **kwargs: ArraySource(images, prefix="cifar10"))
    data = survey_data("cifar10:/data/cifar")
    assert data.in_memory and data.count == 50_000 and not data.grey
    recipe = choose_recipe(data, CPU, None, {})
    cfg = load_config(None, ["data.source=cifar10:/data/cifar"], recipe.settings())
    preset = load_config(CONFIGS / "cifar10_cpu.yaml")
    assert _preset_keys(cfg) == _preset_keys(preset)
    assert cfg.augment.local_scale == preset.augment.local_scale
    assert cfg.train.time_budget_minutes == preset.train.time_budget_minutes == 15


def test_a_preset_and_set_override_the_survey(folders, tmp_path):
    recipe = choose_recipe(survey_data(str(folders["colour32"])), CPU, None, {"model.backbone": "smallconv"})
    assert "model.backbone" not in chosen(recipe)  # the user's key is never chosen
    preset = tmp_path / "mine.yaml"
    preset.write_text("model:\n  backbone: resnet18\naugment:\n  input_size: 48\n")
    cfg = load_config(preset, ["train.batch_size=4"], recipe.settings())
    assert cfg.model.backbone == "resnet18" and cfg.augment.input_size == 48 and cfg.train.batch_size == 4
    assert cfg.augment.local_views == 4  # what neither sets comes from the survey


def test_imagenet_init_weights_get_the_imagenet_stem(folders, imagenet_resnet18, tmp_path, capsys):
    init = survey_init(str(imagenet_resnet18))
    assert (init.architecture, init.small_stem) == ("resnet18", False)
    recipe = choose_recipe(survey_data(str(folders["colour32"])), CPU, init, {})
    settings = chosen(recipe)
    assert settings["model.small_stem"] is False and settings["model.backbone"] == "resnet18"
    assert settings["optim.lr"] == 0.03 and "augment.local_views" not in settings
    cfg = load_config(None, [f"data.source={folders['colour32']}", f"model.init={imagenet_resnet18}"], recipe.settings())
    model = build_model(cfg)
    assert not load_init_weights(model.backbone, cfg.model.init).missing  # no conv1 shape error
    # a safetensors file of the same weights, and one of our own small-stem runs
    from safetensors.torch import save_file

    save_file(torch.load(imagenet_resnet18, weights_only=True), tmp_path / "r18.safetensors")
    assert survey_init(str(tmp_path / "r18.safetensors")).small_stem is False
    ours = survey_init(str(export_random_backbone(tmp_path / "ours")))
    assert (ours.architecture, ours.small_stem, ours.input_size) == ("smallconv", True, 16)
    assert survey_init(str(imagenet_resnet18)).summary().endswith("ImageNet stem (7x7/2 conv + max-pool)")


def test_print_config_shows_the_reasons_and_does_not_train(folders, imagenet_resnet18, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(recipe_module, "measure_images_per_second", lambda cfg, machine: 100.0)  # no ResNet timing
    out = tmp_path / "run"
    assert cli.main(["--data", str(folders["colour32"]), "--init", str(imagenet_resnet18), "--out", str(out),
                     "--set", "train.batch_size=4", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "# recipe from the data: 40 images" in printed
    assert "#   model.small_stem = false: the ImageNet stem" in printed
    assert "train.batch_size = " not in printed.split("variant:")[0]  # --set wins: no choice
    config = yaml.safe_load(printed)
    assert config["model"]["small_stem"] is False and config["train"]["batch_size"] == 4
    assert not out.exists()
    assert cli.main(["--data", str(folders["colour32"]), "--no-survey", "--print-config"]) == 0
    assert "recipe from the data" not in capsys.readouterr().out


def test_advice_fires_where_the_data_asks(caplog):
    large = DataSurvey("photos", 100_000, 300, 0, (700, 1000, 1400), 1300, None, False, {"JPEG": 300}, False)
    recipe = choose_recipe(large, CPU, None, {})
    cfg = load_config(None, ["data.source=photos"], recipe.settings())
    advice = advise(recipe, cfg, images_per_second=lambda cfg, machine: 50.0)
    assert len(advice) == 2
    assert "far larger than the training size (median shorter side 1000 px, 10x 96 px)" in advice[0]
    assert "about 0.5 epochs" in advice[1] and "raise --time-budget to about 334" in advice[1]
    few = DataSurvey("few", 800, 300, 0, (32, 32, 32), 32, (32, 32), False, {"PNG": 300}, False)
    recipe = choose_recipe(few, CPU, None, {})
    cfg = load_config(None, ["data.source=few"], recipe.settings())
    cfg.survey_advice = advise(recipe, cfg, images_per_second=lambda cfg, machine: 500.0)
    assert len(cfg.survey_advice) == 1 and "only 800 images" in cfg.survey_advice[0] and "--init" in cfg.survey_advice[0]
    with caplog.at_level(logging.INFO, logger="ssl_pretrain"):
        log_recipe(cfg.to_dict())
    assert any(record.levelno == logging.WARNING and "only 800 images" in record.message for record in caplog.records)
    assert any("model.backbone = smallconv-xs: a CPU" in record.message for record in caplog.records)


def test_a_slow_forecast_is_measured_again_before_warning(monkeypatch):
    # One slow forecast (a job sharing the cores) and then a fast one: no advice to train longer.
    large = DataSurvey("photos", 100_000, 300, 0, (90, 96, 100), 96, None, False, {"JPEG": 300}, False)
    recipe = choose_recipe(large, CPU, None, {})
    cfg = load_config(None, ["data.source=photos"], recipe.settings())
    rates = iter([4.0, 5_000.0])
    assert not [line for line in advise(recipe, cfg, images_per_second=lambda cfg, machine: next(rates))
                if "budget gives" in line]
    # Slow twice on a busy machine: the warning says the forecast may be low, and why.
    monkeypatch.setattr("os.getloadavg", lambda: (7.5, 7.0, 6.0))
    advice = advise(recipe, cfg, images_per_second=lambda cfg, machine: 4.0)
    few_epochs = next(line for line in advice if "budget gives" in line)
    assert "measured while the machine was busy (load average 7.5 on 2 cores)" in few_epochs


@pytest.mark.parametrize("make, message", [
    (lambda folder: None, "no image files under"),
    (lambda folder: [(folder / f"{i}.jpg").write_bytes(b"not a jpeg") for i in range(3)],
     "none of the 3 sampled files"),
])
def test_data_errors_are_one_line(tmp_path, capsys, make, message):
    folder = tmp_path / "images"
    folder.mkdir()
    make(folder)
    assert cli.main(["--data", str(folder), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_without_config_it_trains_and_records_the_recipe(folders, tmp_path):
    out = tmp_path / "run"
    argv = ["--data", str(folders["colour32"]), "--out", str(out), "--time-budget", "2", "--epochs", "1",
            "--set", "data.num_workers=0", "--no-progress"]
    assert cli.main(argv) == 0
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["survey"].startswith("40 images") and config["model"]["backbone"] == "smallconv-xs"
    assert "model.small_stem" in config["survey_choices"] and config["augment"]["local_views"] == 4
    log = (out / "train.log").read_text()
    assert "recipe from the data" in log and "model.backbone = smallconv-xs: a CPU" in log
    assert (out / "backbone.safetensors").is_file()
    # --resume continues with the choices the run started with, whatever a new survey would say
    args = cli.build_parser().parse_args([*argv, "--resume", "--set", "model.backbone=smallconv"])
    recipe, settings = cli.recipe_from_data(args, cli.resolve_overrides(args))
    assert recipe is None and settings["model.backbone"] == "smallconv-xs" and settings["survey"] == config["survey"]
    resumed = load_config(None, ["data.num_workers=0"], settings)
    assert resumed.to_dict()["survey_choices"] == config["survey_choices"]
    assert resumed.augment.local_views == 4 and resumed.train.batch_size == config["train"]["batch_size"]
