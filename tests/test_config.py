"""Config: presets load, overrides apply, every mistake is one line that names the key."""

from pathlib import Path

import pytest

from ssl_pretrain.config import Config, ConfigError, load_config, parse_override

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_there_are_presets_for_demo_cpu_cifar_and_imagenet():
    names = {path.stem for path in CONFIGS}
    assert {"demo_digits", "cifar10_cpu", "cifar10_resnet18", "imagenet_resnet50"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_preset_loads(path):
    cfg = load_config(path)
    assert cfg.augment.input_size > 0 and cfg.train.epochs >= 1


def test_recipes_fill_what_is_not_set():
    cifar = load_config(None, ["augment.recipe=cifar"]).augment
    imagenet = load_config(None, ["augment.recipe=imagenet"]).augment
    assert (cifar.input_size, cifar.cj_strength, cifar.blur_prob) == (32, 0.5, 0.0)
    assert (imagenet.input_size, imagenet.cj_strength, imagenet.blur_prob) == (224, 1.0, 0.5)
    explicit = load_config(None, ["augment.recipe=imagenet", "augment.blur_prob=0.0"]).augment
    assert explicit.blur_prob == 0.0 and explicit.cj_strength == 1.0


def test_overrides_are_typed_and_nested():
    cfg = load_config(None, ["optim.lr=0.3", "train.epochs=7", "optim.name=lars", "augment.mean=[0.5,0.5,0.5]"])
    assert cfg.optim.lr == 0.3 and cfg.train.epochs == 7 and cfg.optim.name == "lars"
    assert cfg.augment.mean == (0.5, 0.5, 0.5)
    assert parse_override("data.source=/a=b") == (["data", "source"], "/a=b")


@pytest.mark.parametrize(
    "override, expected",
    [
        ("optim.lrr=0.1", "unknown config key 'optim.lrr'; did you mean 'lr'?"),
        ("optimiser.lr=0.1", "unknown config key 'optimiser'; did you mean 'optim'?"),
        ("train.epochs=many", "bad value for 'train.epochs'"),
        ("optim.name=adam", "bad value for 'optim.name'"),
        ("simclr.temperature=0", "bad value for 'simclr.temperature'"),
    ],
)
def test_a_mistake_is_one_line_naming_the_key(override, expected):
    with pytest.raises(ConfigError) as caught:
        load_config(None, [override])
    assert expected in str(caught.value) and "\n" not in str(caught.value)


def test_bad_files_and_bad_overrides(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("optim: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "typo.yaml").write_text("train:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: unknown config key 'train.epoch'; did you mean 'epochs'"):
        load_config(tmp_path / "typo.yaml")
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, ["optim.lr"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_config(None, ["train.epochs=3", "train.epochs.x=1"])


def test_resolved_config_round_trips_through_a_dict():
    cfg = load_config(None, ["optim.lr=0.2"])
    assert Config.model_validate(cfg.to_dict()) == cfg
