"""Photo folders in the batch pipeline: images of every size and mode decoded once at the training
size (JPEG at reduced size), kept in a cache file that later epochs and runs reuse and a changed
file invalidates; multi-crop on any folder; every preset trains on a folder of mixed images with
its hardware variant either way."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_pretrain import cli
from ssl_pretrain.config import load_config
from ssl_pretrain.data import open_source
from ssl_pretrain.data import pixel_cache
from ssl_pretrain.data.pipeline import build_loader
from ssl_pretrain.data.pixel_cache import fit_square, storage_side, store_source
from ssl_pretrain.engine import hardware

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
CPU = torch.device("cpu")


def photo(width: int, height: int, seed: int) -> np.ndarray:
    """A smooth colour image ``(height, width, 3)`` uint8: gradients and a few blobs."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    channels = [np.sin(x * rng.uniform(2, 9) + y * rng.uniform(2, 9) + rng.uniform(0, 6)) for _ in range(3)]
    return ((np.stack(channels, axis=-1) + 1) * 127.5).astype(np.uint8)


def write_mixed_folder(folder: Path, count: int = 20) -> Path:
    """``count`` readable images of 40-300 px in every mode a folder of photos and scans holds -
    RGB JPEG of any aspect, grey JPEG, RGBA PNG, palette PNG with transparency, 16-bit grey PNG,
    CMYK JPEG - and one corrupt JPEG."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        width, height = (int(side) for side in rng.integers(40, 301, size=2))
        pixels = photo(width, height, index)
        kind = index % 6
        if kind == 0:
            Image.fromarray(pixels).save(folder / f"{index:02d}.jpg", quality=90)
        elif kind == 1:
            Image.fromarray(pixels).convert("L").save(folder / f"{index:02d}-grey.jpg")
        elif kind == 2:
            alpha = np.full((height, width, 1), 200, np.uint8)
            Image.fromarray(np.concatenate([pixels, alpha], axis=-1)).save(folder / f"{index:02d}-rgba.png")
        elif kind == 3:
            Image.fromarray(pixels).quantize(16).save(folder / f"{index:02d}-palette.png", transparency=0)
        elif kind == 4:
            deep = (pixels[..., 0].astype(np.uint16) * 257)
            Image.fromarray(deep).save(folder / f"{index:02d}-16bit.png")
        else:
            Image.fromarray(pixels).convert("CMYK").save(folder / f"{index:02d}-cmyk.jpg")
    good = (folder / "00.jpg").read_bytes()
    (folder / "99-corrupt.jpg").write_bytes(good[: len(good) // 3])
    return folder


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory) -> Path:
    return write_mixed_folder(tmp_path_factory.mktemp("mixed") / "photos")


def test_fit_square_keeps_the_centre_at_the_storage_side():
    wide = Image.fromarray(photo(300, 100, 1))
    pixels = fit_square(wide, 64)
    assert pixels.shape == (64, 64, 3) and pixels.dtype == np.uint8
    centre = np.asarray(wide.crop((100, 0, 200, 100)).resize((64, 64), Image.BICUBIC))
    assert np.abs(pixels.astype(int) - centre).mean() < 2  # the centre square, not the whole squashed
    assert storage_side(224) == 256 and storage_side(32) == 64 and storage_side(96) == 110


def test_a_mixed_folder_is_decoded_once_into_a_cache_that_later_runs_reuse(mixed_folder, tmp_path, monkeypatch):
    source = open_source(str(mixed_folder))
    stored = store_source(source, 64, progress=False, cache_dir=tmp_path)
    assert stored.images.shape == (20, 64, 64, 3) and not stored.reused and not stored.grey
    assert [name for name, _ in stored.skipped] == ["99-corrupt.jpg"]
    opened = []
    monkeypatch.setattr(type(source), "load", lambda self, index, min_side=None: opened.append(index))
    again = store_source(source, 64, progress=False, cache_dir=tmp_path)  # a later run: no file opened
    assert again.reused and opened == [] and np.array_equal(again.images, stored.images)
    assert isinstance(again.images, np.memmap) and again.skipped == stored.skipped
    assert len(list(tmp_path.iterdir())) == 2  # pixels and their description, no temporary left


def test_decoding_in_worker_processes_gives_the_same_pixels(mixed_folder, tmp_path, monkeypatch):
    source = open_source(str(mixed_folder))
    serial = store_source(source, 64, progress=False, cache_dir=tmp_path / "serial")
    monkeypatch.setattr(pixel_cache, "PARALLEL_FIT_FROM", 4)
    parallel = store_source(source, 64, workers=2, progress=False, cache_dir=tmp_path / "parallel")
    assert np.array_equal(parallel.images, serial.images) and parallel.skipped == serial.skipped


def test_a_changed_file_or_another_size_makes_a_new_cache(mixed_folder, tmp_path):
    folder = write_mixed_folder(tmp_path / "photos", count=6)
    cache = tmp_path / "cache"
    first = store_source(open_source(str(folder)), 64, progress=False, cache_dir=cache)
    Image.fromarray(photo(90, 70, 99)).save(folder / "00.jpg")
    os.utime(folder / "00.jpg", ns=(1, 1))  # a new modification time, as an edit leaves
    changed = store_source(open_source(str(folder)), 64, progress=False, cache_dir=cache)
    assert not changed.reused and not np.array_equal(changed.images[0], first.images[0])
    assert not store_source(open_source(str(folder)), 80, progress=False, cache_dir=cache).reused
    assert store_source(open_source(str(folder)), 80, progress=False, cache_dir=cache).reused


def test_jpegs_decode_at_reduced_size_for_a_small_storage_side(tmp_path, monkeypatch):
    Image.fromarray(photo(1200, 900, 3)).save(tmp_path / "big.jpg", quality=90)
    source = open_source(str(tmp_path))
    decoded = []
    real_fit = pixel_cache.fit_square
    monkeypatch.setattr(pixel_cache, "fit_square", lambda image, side: decoded.append(image.size) or real_fit(image, side))
    stored = store_source(source, 64, progress=False, cache_dir=tmp_path / "cache")
    assert decoded == [(150, 113)]  # 1/8 of the size by DCT scaling, both sides still >= 64
    full = fit_square(source.load(0), 64).astype(int)
    assert np.abs(stored.images[0].astype(int) - full).mean() < 3  # the same picture


def test_an_unwritable_cache_falls_back_to_memory_then_to_files(mixed_folder, tmp_path, caplog):
    blocked = tmp_path / "file"
    blocked.write_text("a file where the cache folder would be")
    source = open_source(str(mixed_folder))
    with caplog.at_level(logging.WARNING, logger="ssl_pretrain"):
        stored = store_source(source, 64, progress=False, cache_dir=blocked / "pixels")
        assert stored.images.shape == (20, 64, 64, 3) and stored.cache_file is None
        assert "decoding into memory for this run only" in caplog.text
        assert store_source(source, 64, progress=False, cache_dir=blocked / "pixels", memory_limit=1000) is None
    assert "streaming the files through per-image loaders" in caplog.text


def test_the_batch_pipeline_serves_a_photo_folder_with_multi_crop(mixed_folder, tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("SSL_PRETRAIN_CACHE", str(tmp_path))
    cfg = load_config(None, [f"data.source={mixed_folder}", "augment.input_size=32", "augment.local_views=2",
                             "train.batch_size=8", "model.backbone=smallconv"])
    with caplog.at_level(logging.INFO, logger="ssl_pretrain"):
        batches, sampler = build_loader(cfg, open_source(str(mixed_folder)), CPU, progress=False)
    assert "20 images of 64x64 px (shorter side resized, centre-cropped) decoded in" in caplog.text
    assert "+ 2 local views" in caplog.text
    batch = next(iter(batches))
    assert [tuple(view.shape) for view in batch["views"]] == [(8, 3, 32, 32)] * 2 + [(8, 3, 14, 14)] * 2
    assert [name for name, _ in batch["skipped"]] == ["99-corrupt.jpg"] and len(sampler) == 2


def test_multi_crop_on_the_per_image_pipeline_is_turned_off_with_a_warning(mixed_folder, caplog):
    cfg = load_config(None, [f"data.source={mixed_folder}", "augment.input_size=32", "augment.local_views=2",
                             "train.batch_size=8", "data.pipeline=pil", "data.num_workers=0"])
    with caplog.at_level(logging.WARNING, logger="ssl_pretrain"):
        batches, _ = build_loader(cfg, open_source(str(mixed_folder)), CPU, progress=False)
    assert "trained without the 2 local views" in caplog.text and cfg.augment.local_views == 0
    assert len(next(iter(batches))["views"]) == 2


# Each preset on the mixed folder, its hardware variant forced both ways: the network and batch cut
# down, the data, augmentation and multi-crop choices the preset's own.
PRESETS = sorted(path.name for path in CONFIGS.glob("*.yaml"))
TINY = ["train.epochs=1", "train.batch_size=8", "train.time_budget_minutes=null", "data.num_workers=0",
        "monitor.train=null", "monitor.val=null", "model.init=null", "train.precision=fp32"]


def preset_args(preset: str, data: Path, out: Path) -> list[str]:
    settings = list(TINY)
    if load_config(CONFIGS / preset).model.backbone.startswith("resnet"):
        settings.append("model.backbone=smallconv-xs")  # the GPU presets' ResNets take seconds a step here
    return ["--config", str(CONFIGS / preset), "--data", str(data), "--out", str(out), "--no-progress",
            *[part for setting in settings for part in ("--set", setting)]]


def train_preset(preset: str, fast_bf16: bool, data: Path, out: Path, monkeypatch) -> str:
    """Train the preset on ``data``; returns its log."""
    monkeypatch.setattr(hardware, "fast_bf16", lambda device, *probe: fast_bf16)
    assert cli.main(preset_args(preset, data, out)) == 0
    text = (out / "train.log").read_text()
    assert "skipped unreadable image 99-corrupt.jpg" in text and (out / "backbone.safetensors").exists()
    return text


def test_the_cpu_preset_trains_multi_crop_on_a_photo_folder_where_bf16_is_slow(mixed_folder, tmp_path, monkeypatch):
    text = train_preset("cifar10_cpu.yaml", False, mixed_folder, tmp_path / "run", monkeypatch)
    assert "preset variant 'no_fast_bf16' applied" in text and "+ 4 local views of 16 px" in text


@pytest.mark.slow
@pytest.mark.parametrize("fast_bf16", [False, True], ids=["no_fast_bf16", "fast_bf16"])
@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_trains_on_a_folder_of_mixed_images(preset, fast_bf16, mixed_folder, tmp_path, monkeypatch):
    text = train_preset(preset, fast_bf16, mixed_folder, tmp_path / "run", monkeypatch)
    assert "augmented in batches" in text and "Traceback" not in text


@pytest.mark.slow  # the messy folder takes seconds to make (a decompression bomb, a fuzzed set)
def test_a_messy_folder_keeps_every_good_image_and_names_every_bad_one(tmp_path):
    from badinput import make_messy_folder, restore_permissions

    folder = make_messy_folder(tmp_path / "messy")  # odd names, modes, sizes, EXIF rotation; bombs, truncations
    try:
        source = open_source(str(folder.root))
        stored = store_source(source, 64, progress=False, cache_dir=tmp_path / "cache")
    finally:
        restore_permissions(folder.root)
    reasons = dict(stored.skipped)
    assert len(stored.images) == len(source) - len(reasons) and set(folder.bad) <= set(reasons)
    for name, fragment in folder.bad.items():
        assert fragment.lower() in reasons[name].lower(), (name, reasons[name])


def test_embeddings_and_fine_tuning_decode_photos_at_reduced_size(tmp_path, monkeypatch):
    """The pixel cache, embeddings and fine-tuning read a JPEG through ``ReducedLoader``: decoded
    at a fraction of its size (both sides still >= the input), the framing of a full decode."""
    from linear_probe.embeddings import _TransformedImages
    from linear_probe.images import load_pixels
    from ssl_pretrain.augment.transforms import build_eval_transform
    from ssl_pretrain.data import ArraySource, ReducedLoader

    folder = tmp_path / "photos" / "a"
    folder.mkdir(parents=True)
    Image.fromarray(photo(800, 600, 1)).save(folder / "big.jpg", quality=95)
    source = open_source(str(tmp_path / "photos"), labelled=True)
    assert ReducedLoader(source, 64)(0).size == (100, 75)  # 1/8: the short side stays >= 64
    assert source.load(0).size == (800, 600)
    sizes = []
    original = type(source).load

    def spy(self, index, min_side=None):
        image = original(self, index, min_side)
        sizes.append(image.size)
        return image

    monkeypatch.setattr(type(source), "load", spy)
    transform = build_eval_transform(64, (0.5,) * 3, (0.25,) * 3)
    _, reduced = _TransformedImages(source, transform)[0]
    pixels = load_pixels(source, transform)
    assert sizes == [(100, 75), (100, 75)]
    assert torch.equal(pixels.pixels[0], reduced)
    full = transform.to_uint8(original(source, 0))
    assert (reduced.float() - full.float()).abs().mean() < 3  # the same picture, resampled differently
    arrays = ArraySource(np.zeros((1, 9, 9, 3), np.uint8))
    assert ReducedLoader(arrays, 64)(0).size == (9, 9)  # a source that decodes nothing: as it is
