"""Finding and decoding images: every mode becomes RGB, every bad file is a reason, not a crash."""

import io
import os

import numpy as np
import pytest
from PIL import Image

from ssl_pretrain.data import (
    DataError,
    UnreadableImage,
    check_readable,
    digits_source,
    image_folder_source,
    load_image,
    open_source,
    random_subset,
    scan_images,
)


def _save(image: Image.Image, path, **params) -> str:
    image.save(path, **params)
    return str(path)


def test_digits_are_real_images_with_disjoint_splits():
    train, test, all_ = digits_source("train"), digits_source("test"), digits_source("all")
    assert (len(train), len(test), len(all_)) == (1347, 450, 1797)
    assert set(np.bincount(train.labels)) and len(set(train.labels)) == 10
    image = train.load(0)
    assert image.mode == "RGB" and image.size == (8, 8)
    assert np.asarray(image).max() > 200  # ink reaches full intensity
    train_pixels = {train.images[i].tobytes() for i in range(len(train))}
    assert sum(test.images[i].tobytes() in train_pixels for i in range(len(test))) < 5  # a few exact twins in the raw data


@pytest.mark.parametrize(
    "make",
    [
        lambda: Image.new("L", (9, 7), 128),
        lambda: Image.new("LA", (9, 7), (128, 40)),
        lambda: Image.new("RGBA", (9, 7), (10, 20, 30, 0)),
        lambda: Image.new("CMYK", (9, 7), (10, 20, 30, 40)),
        lambda: Image.new("1", (9, 7), 1),
        lambda: Image.fromarray(np.arange(63, dtype=np.uint16).reshape(7, 9) * 1000),  # I;16
        lambda: Image.fromarray(np.linspace(0, 1, 63, dtype=np.float32).reshape(7, 9)),  # F
    ],
    ids=["L", "LA", "RGBA", "CMYK", "1", "I;16", "F"],
)
def test_every_mode_becomes_rgb(tmp_path, make):
    image = make()
    path = _save(image, tmp_path / ("x.tif" if image.mode in ("CMYK", "F") else "x.png"))
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == (9, 7)


def test_sixteen_bit_keeps_its_contrast(tmp_path):
    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    loaded = np.asarray(load_image(_save(Image.fromarray(ramp), tmp_path / "ramp.png")))
    assert loaded.min() == 0 and loaded.max() == 255


def test_palette_with_transparency_and_exif_rotation(tmp_path):
    palette = Image.new("P", (5, 4), 0)
    palette.putpalette([255, 0, 0] + [0, 255, 0] * 255)
    assert load_image(_save(palette, tmp_path / "p.png", transparency=0)).mode == "RGB"
    rotated = Image.new("RGB", (6, 3), (200, 10, 10))
    exif = rotated.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees
    path = _save(rotated, tmp_path / "r.jpg", exif=exif.tobytes())
    assert load_image(path).size == (3, 6)


def _bad_files(folder) -> dict[str, str]:
    good = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(good, format="JPEG")
    png = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(png, format="PNG")
    files = {
        "empty.jpg": b"",
        "truncated.jpg": good.getvalue()[: len(good.getvalue()) // 2],
        "truncated.png": png.getvalue()[: len(png.getvalue()) // 2],
        "noise.png": np.random.default_rng(1).integers(0, 255, 500, dtype=np.uint8).tobytes(),
        "text.png": b"this is not an image\n",
    }
    for name, payload in files.items():
        (folder / name).write_bytes(payload)
    return files


def test_bad_files_raise_unreadable_with_a_reason(tmp_path):
    for name in _bad_files(tmp_path):
        with pytest.raises(UnreadableImage) as caught:
            load_image(str(tmp_path / name))
        assert str(caught.value), name


def test_decompression_bombs_and_tiny_images(tmp_path):
    path = _save(Image.new("RGB", (100, 100)), tmp_path / "big.png")
    with pytest.raises(UnreadableImage, match="exceeds 5000 pixels"):
        load_image(path, max_pixels=5000)
    assert load_image(_save(Image.new("RGB", (1, 1)), tmp_path / "one.png")).size == (1, 1)


def test_scan_is_recursive_sorted_and_survives_symlink_loops(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ["a/b/z.JPG", "a/y.png", "x.webp", "notes.txt", "a/b/data.npy"]:
        (tmp_path / name).write_bytes(b"x")
    os.symlink(tmp_path / "a", tmp_path / "a" / "b" / "loop")
    found = [os.path.relpath(p, tmp_path) for p in scan_images(tmp_path)]
    assert found == sorted(found) and set(found) == {"a/b/z.JPG", "a/y.png", "x.webp"}


def test_open_source_errors_are_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "readme.txt").write_text("no images")
    cases = {
        str(tmp_path / "missing"): "data not found",
        str(tmp_path / "empty"): "no image files under",
        str(tmp_path / "other"): "no image files under",
        "builtin:mnist": "unknown built-in dataset",
        "builtin:digits:val": "splits train, test and all",
        f"cifar10:{tmp_path}": "cifar10 not found",
    }
    for spec, message in cases.items():
        with pytest.raises(DataError, match=message) as caught:
            open_source(spec)
        assert "\n" not in str(caught.value)


def test_a_folder_of_only_bad_files_is_one_error(tmp_path):
    _bad_files(tmp_path)
    with pytest.raises(DataError, match="none of the 5 files could be read"):
        check_readable(open_source(str(tmp_path)))


def test_path_list_files(tmp_path, digits_folder):
    paths = scan_images(digits_folder)[:5]
    listing = tmp_path / "list.txt"
    listing.write_text("# my images\n" + "\n".join(paths) + "\n\n")
    source = open_source(str(listing))
    assert len(source) == 5 and source.load(0).mode == "RGB"


def test_labelled_folders_and_empty_classes(tmp_path, digits_folder):
    source = image_folder_source(digits_folder)
    assert source.classes == [str(i) for i in range(10)] and len(source) == 200
    assert source.name(0).startswith("0/")
    (tmp_path / "cats").mkdir()
    (tmp_path / "dogs").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "cats" / "c.png")
    with pytest.raises(DataError, match="class folder\\(s\\) with no images: dogs"):
        image_folder_source(tmp_path)


def test_random_subset_is_fixed_and_keeps_labels():
    source = digits_source("train")
    first, second = random_subset(source, 100), random_subset(source, 100)
    assert len(first) == 100 and np.array_equal(first.indices, second.indices)
    assert np.array_equal(first.labels, source.labels[first.indices])
    assert random_subset(source, None) is source


def test_decoding_in_worker_processes_gives_the_same_array(tmp_path, monkeypatch):
    import ssl_pretrain.data.decoding as data_module
    from digit_files import write_digit_images
    from ssl_pretrain.data import decode_all

    write_digit_images(tmp_path / "data", 60, size=16)
    (tmp_path / "data" / "4" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    source = open_source(str(tmp_path / "data"), labelled=True)
    serial = decode_all(source, (16, 16), progress=False)
    monkeypatch.setattr(data_module, "PARALLEL_DECODE_FROM", 1)
    parallel = decode_all(source, (16, 16), progress=False, workers=2)
    np.testing.assert_array_equal(parallel[0], serial[0])
    np.testing.assert_array_equal(parallel[1], serial[1])
    assert parallel[2] == serial[2] and len(serial[2]) == 1 and serial[2][0][0].endswith("broken.png")
    assert len(serial[1]) == 60
    # Without resizing, an image of another size ends the decoding (serial and parallel alike).
    Image.new("RGB", (20, 16)).save(tmp_path / "data" / "9" / "zz_wide.png")
    source = open_source(str(tmp_path / "data"), labelled=True)
    assert decode_all(source, (16, 16), progress=False, workers=2, resize=False) is None
    assert decode_all(source, (16, 16), progress=False, resize=False) is None
    assert decode_all(source, (16, 16), progress=False, workers=2)[0].shape == (61, 16, 16, 3)  # resized


def test_a_tiff_with_mistyped_strip_offsets_is_unreadable_not_a_crash(tmp_path):
    """Found by the deep fuzz test: Pillow raises TypeError (not OSError) in ``load`` when the
    StripOffsets tag (0x0111) is typed RATIONAL."""
    import struct

    from ssl_pretrain.data import UnreadableImage, load_image

    path = tmp_path / "mistyped.tif"
    Image.new("RGB", (24, 24), (40, 90, 200)).save(path, compression="raw")
    data = bytearray(path.read_bytes())
    assert data[:4] == b"II*\x00"
    ifd = struct.unpack_from("<I", data, 4)[0]
    for entry in range(struct.unpack_from("<H", data, ifd)[0]):
        at = ifd + 2 + 12 * entry
        if struct.unpack_from("<H", data, at)[0] == 0x0111:
            struct.pack_into("<H", data, at + 2, 5)  # LONG/SHORT -> RATIONAL
    path.write_bytes(bytes(data))
    with pytest.raises(UnreadableImage, match="Error"):
        load_image(str(path))


def test_worker_counts_follow_the_cores_this_process_may_use(monkeypatch):
    """Under ``taskset`` or a container's cpuset the machine has more cores than the process may
    use; decoding and loading size their workers by the latter."""
    import os

    from ssl_pretrain.data.dataset import worker_count
    from ssl_pretrain.data.decoding import decode_workers
    from ssl_pretrain.engine.devices import usable_cores

    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no CPU affinity on this platform")
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert usable_cores() == 2
    assert decode_workers() == 2 and decode_workers(ranks_per_machine=2) == 1
    assert worker_count("auto", num_samples=10_000) == 1 and worker_count("3") == 3
