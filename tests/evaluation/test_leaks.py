"""Leak check: test images that are exact or near copies of training images, counted on real
digits (``linear_probe.leaks``) and reported by ``linear-probe`` (warning, results.json, results.md)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from linear_probe.cli import main
from linear_probe.embeddings import Embeddings
from linear_probe.leaks import check_leaks, exact_copies, pixel_correlation
from ssl_pretrain.data import ArraySource, SubsetSource, digits_source, open_source

from digit_files import export_random_backbone, write_digits_folder


def centred_pixels(images: SubsetSource) -> Embeddings:
    """Stand-in embeddings that are deterministic: each image's pixels with its mean removed (distinct
    digits reach about 0.97 cosine there, copies 1.0)."""
    rows = []
    for position in range(len(images)):
        values = np.asarray(images.load(position).convert("L"), dtype=np.float32).ravel()
        rows.append(values - values.mean())
    return Embeddings(np.ascontiguousarray(np.stack(rows), dtype=np.float32), images.labels,
                      [images.name(p) for p in range(len(images))], indices=images.indices.copy())


def subset(source) -> SubsetSource:
    return SubsetSource(source, np.arange(len(source)))


def make_folders(root: Path) -> tuple[Path, Path, dict[str, str]]:
    """Train: 20 digits per class. Test: 5 other digits per class, plus a byte-identical copy of one
    training file and a brightened re-save of another (different bytes, the same picture)."""
    train = write_digits_folder(root / "train", 20)
    test = write_digits_folder(root / "test", 5, offset=20)
    first, second = sorted((train / "3").iterdir())[:2]
    shutil.copyfile(first, test / "3" / "copy.png")
    brighter = np.asarray(Image.open(second), dtype=np.float32) * 0.9 + 12
    Image.fromarray(brighter.clip(0, 255).astype(np.uint8)).save(test / "3" / "resaved.png")
    return train, test, {"3/copy.png": f"3/{first.name}", "3/resaved.png": f"3/{second.name}"}


def test_exact_and_near_copies_are_counted_and_named_and_distinct_digits_are_not(tmp_path):
    train_dir, test_dir, copies = make_folders(tmp_path)
    train, test = subset(open_source(str(train_dir), labelled=True)), subset(open_source(str(test_dir), labelled=True))
    check = check_leaks([(train, centred_pixels(train))], (test, centred_pixels(test)))
    assert (check.exact, check.near, check.leaked, check.n_test, check.n_train) == (1, 1, 2, 52, 200)
    found = {pair["test"]: pair for pair in check.pairs}
    assert {name: pair["train"] for name, pair in found.items()} == copies
    assert found["3/copy.png"]["exact"] and not found["3/resaved.png"]["exact"]
    assert found["3/resaved.png"]["pixel_correlation"] > 0.99 and found["3/resaved.png"]["similarity"] > 0.99
    record = check.to_dict()
    assert record["leaked"] == 2 and abs(record["fraction"] - 2 / 52) < 1e-12 and "copies of training" in check.warning()


def test_a_feature_neighbour_that_is_another_picture_is_not_a_leak(tmp_path):
    """Embeddings that put every image at the same point (as a weak backbone nearly does): the pixel
    check keeps distinct digits out, and the count at ssl >= 0.99 is recorded apart."""
    train = subset(ArraySource(digits_source("train").images[:100]))
    test = subset(ArraySource(digits_source("test").images[:30]))
    same = lambda images: Embeddings(np.ones((len(images), 4), np.float32), None,  # noqa: E731
                                     [images.name(p) for p in range(len(images))], indices=images.indices.copy())
    check = check_leaks([(train, same(train))], (test, same(test)))
    assert check.similar_in_features == 30 and check.exact == 0
    assert check.near == sum(pair["pixel_correlation"] >= 0.95 for pair in check.pairs) < 30


def test_exact_copies_of_in_memory_images_and_pixel_correlation():
    images = digits_source("train").images[:10]
    train = subset(ArraySource(images))
    test = subset(ArraySource(np.stack([images[7], 255 - images[7], images[2]])))
    assert exact_copies([train], test) == {0: (0, 7), 2: (0, 2)}
    picture = Image.fromarray(images[7])
    assert abs(pixel_correlation(picture, picture) - 1.0) < 1e-12
    assert pixel_correlation(picture, Image.fromarray(255 - images[7])) < -0.9  # a negative is not a copy
    assert pixel_correlation(picture, picture.resize((32, 32))) > 0.95  # compared at the smaller size


def test_linear_probe_warns_and_records_leaks_and_can_skip_the_check(tmp_path, caplog):
    train, test, copies = make_folders(tmp_path / "data")
    checkpoint = export_random_backbone(tmp_path / "run")
    argv = ["--checkpoint", str(checkpoint), "--train", str(train), "--test", str(test), "--methods", "knn",
            "--label-fractions", "1.0", "--seeds", "1", "--no-plots", "--no-baselines", "--device", "cpu", "--quiet"]
    assert main(argv + ["--out", str(tmp_path / "eval")]) == 0
    leaks = json.loads((tmp_path / "eval" / "results.json").read_text())["leaks"]
    assert leaks["checked"] and leaks["exact"] == 1 and leaks["leaked"] >= 1 and leaks["n_test"] == 52
    assert {"test": "3/copy.png", "train": copies["3/copy.png"]}.items() <= leaks["pairs"][0].items()
    assert any("copies of training images" in record.message for record in caplog.records if record.levelname == "WARNING")
    assert "**Leaks:" in (tmp_path / "eval" / "results.md").read_text()
    assert main(argv + ["--out", str(tmp_path / "unchecked"), "--no-leak-check"]) == 0
    assert json.loads((tmp_path / "unchecked" / "results.json").read_text())["leaks"] == {
        "checked": False, "reason": "--no-leak-check"}
