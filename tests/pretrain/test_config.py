"""Config: presets load, overrides apply, every mistake is one line that names the key."""

from pathlib import Path

import pytest

from ssl_pretrain.config import Config, load_config
from ssl_pretrain.presets import parse_override
from ssl_pretrain.settings import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


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


def test_a_preset_extends_another_key_by_key(tmp_path):
    """``extends:`` reads the base first and lays the file over it: sections, variants and recipes
    merged key by key; a relative base path is the preset's folder's; ``--set`` still wins."""
    (tmp_path / "base.yaml").write_text(
        "augment: {min_scale: 0.08, hflip_prob: 0.5}\noptim: {lr: 0.3}\nmethod: simclr\n"
        "variants: {no_fast_bf16: {model.backbone: smallconv-xs}}\nrecipes: {moco: {optim.lr: 0.12}}\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "top.yaml").write_text(
        "extends: ../base.yaml\naugment: {hflip_prob: 0.0}\nrecipes: {byol: {optim.lr: 1.0}}\n")
    cfg = load_config(tmp_path / "sub" / "top.yaml")
    assert cfg.augment.hflip_prob == 0.0 and cfg.augment.min_scale == 0.08 and cfg.optim.lr == 0.3
    assert load_config(tmp_path / "sub" / "top.yaml", ["method=moco"]).optim.lr == 0.12   # base's recipe
    assert load_config(tmp_path / "sub" / "top.yaml", ["method=byol"]).optim.lr == 1.0    # its own
    assert load_config(tmp_path / "sub" / "top.yaml", ["augment.min_scale=0.3"]).augment.min_scale == 0.3


def test_a_bad_extends_is_one_line(tmp_path):
    (tmp_path / "orphan.yaml").write_text("extends: gone.yaml\n")
    with pytest.raises(ConfigError, match=r"config file not found: .*gone.yaml \(extended by .*orphan.yaml\)"):
        load_config(tmp_path / "orphan.yaml")
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path)  # a folder, not a file
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "binary.yaml")
    (tmp_path / "num.yaml").write_text("extends: 3\n")
    with pytest.raises(ConfigError, match="must name another preset file"):
        load_config(tmp_path / "num.yaml")
    (tmp_path / "typo.yaml").write_text("extends: a_base.yaml\ntrain: {epoch: 3}\n")
    (tmp_path / "a_base.yaml").write_text("train: {epochs: 2}\n")
    with pytest.raises(ConfigError, match="unknown config key 'train.epoch'"):
        load_config(tmp_path / "typo.yaml")


def test_the_glyph_preset_is_the_cpu_preset_with_vicreg_and_its_digit_augmentation():
    configs = Path(__file__).resolve().parents[2] / "configs"
    glyphs, cpu = load_config(configs / "glyphs_cpu.yaml"), load_config(configs / "cifar10_cpu.yaml")
    assert glyphs.method == "vicreg" and glyphs.recipe == "vicreg"
    assert glyphs.optim.lr == load_config(configs / "cifar10_cpu.yaml", ["method=vicreg"]).optim.lr
    assert glyphs.augment.hflip_prob == 0.0 and glyphs.augment.min_scale == 0.25
    assert glyphs.train == cpu.train and glyphs.model == cpu.model and glyphs.vicreg == cpu.vicreg
