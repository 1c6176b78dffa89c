"""Exact and near duplicates and train/test leaks (``ssl_curate.duplicates``, ``ssl-dedup``).

Real digits with planted copies: byte copies, copies re-saved as JPEG (quality 95) and copies made
5% brighter. The search itself is tested on centred raw pixels, where different digits stay below
the default threshold (at most 0.966) and the copies are above it (>= 0.994); faiss is checked
against a brute-force NumPy transcription. The command line runs end to end with a random-init
``smallconv``, which maps all digits close together, so it is given a stricter threshold.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from ssl_curate.dedup_cli import main
from ssl_curate.duplicates import (DEFAULT_THRESHOLD, DuplicateError, connected_groups, file_digest,
                                   find_exact_duplicates, find_leaks, find_near_duplicates, near_duplicate_pairs)
from ssl_pretrain.data import digits_source
from digit_files import export_random_backbone

SIZE = 16
OUTPUTS = ("duplicates.csv", "duplicates.json", "duplicates.png")


def digit(index: int, split: str = "test") -> Image.Image:
    return digits_source(split).load(index).resize((SIZE, SIZE), Image.BICUBIC)


def as_jpeg(image: Image.Image) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def brighter(image: Image.Image) -> Image.Image:
    return ImageEnhance.Brightness(image).enhance(1.05)


def grey(images: list[Image.Image]) -> np.ndarray:
    """``(N, SIZE * SIZE)`` float32 grey pixels."""
    return np.stack([np.asarray(image.convert("L"), dtype=np.float32).ravel() for image in images])


def pixels(images: list[Image.Image], mean: np.ndarray | None = None) -> np.ndarray:
    """Grey pixels centred by ``mean`` (default: their own). Raw pixels are all non-negative, which
    puts every pair of digits at a high cosine similarity; centred, different digits spread apart."""
    flat = grey(images)
    return flat - (flat.mean(0) if mean is None else mean)


def brute_force_pairs(features: np.ndarray, threshold: float) -> set[tuple[int, int]]:
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    similarity = unit.astype(np.float64) @ unit.T.astype(np.float64)
    first, second = np.nonzero(np.triu(similarity >= threshold, k=1))
    return set(zip(first.tolist(), second.tolist()))


@pytest.fixture(scope="module")
def planted() -> tuple[np.ndarray, list[list[int]]]:
    """200 distinct test digits, then copies of digits 0-4 (JPEG), 5-9 (brighter), 10-11 (both):
    centred pixel features and the expected groups."""
    originals = [digit(index) for index in range(200)]
    copies = ([as_jpeg(originals[i]) for i in range(5)] + [brighter(originals[i]) for i in range(5, 10)]
              + [as_jpeg(originals[i]) for i in (10, 11)] + [brighter(originals[i]) for i in (10, 11)])
    mean = grey(originals).mean(0)
    features = np.concatenate([pixels(originals, mean), pixels(copies, mean)])
    expected = [[i, 200 + i] for i in range(10)] + [[10, 210, 212], [11, 211, 213]]
    return features, sorted(expected)


# ---------------------------------------------------------------------------------------------
# The search, on pixels


def test_planted_copies_are_grouped_and_distinct_digits_are_not(planted):
    features, expected = planted
    groups = find_near_duplicates(features)
    assert sorted(group.members for group in groups) == expected
    assert [len(group.members) for group in groups] == [3, 3] + [2] * 10  # largest first
    for group in groups:
        assert DEFAULT_THRESHOLD <= group.min_similarity <= group.max_similarity <= 1.0 + 1e-6
        assert group.similarity_to_first[0] == pytest.approx(1.0, abs=1e-5)


def test_distinct_digits_stay_below_the_default_threshold(planted):
    features, _ = planted
    assert not brute_force_pairs(features[:200], DEFAULT_THRESHOLD)
    assert brute_force_pairs(features[:200], 0.95)  # a looser threshold would group different digits


@pytest.mark.parametrize("threshold", [0.9, 0.95, DEFAULT_THRESHOLD])
def test_faiss_pairs_match_brute_force(planted, threshold):
    features, _ = planted
    first, second, similarity = near_duplicate_pairs(features, threshold, query_rows=37)  # several blocks
    assert set(zip(first.tolist(), second.tolist())) == brute_force_pairs(features, threshold)
    assert (first < second).all() and (similarity >= np.float32(threshold)).all()


def test_too_many_pairs_is_an_error_not_a_full_memory(planted):
    with pytest.raises(DuplicateError, match="raise it"):
        near_duplicate_pairs(planted[0], 0.5, max_pairs=100)


@pytest.mark.parametrize("threshold", [0, -0.1, 1.01, float("nan")])
def test_threshold_outside_zero_one_is_refused(planted, threshold):
    with pytest.raises(DuplicateError, match=r"\(0, 1\]"):
        near_duplicate_pairs(planted[0], threshold)


def test_union_find_joins_chains():
    assert connected_groups(7, [(0, 1), (1, 2), (4, 5), (2, 0)]) == [[0, 1, 2], [4, 5]]
    assert connected_groups(3, []) == []


# ---------------------------------------------------------------------------------------------
# Leaks


def test_find_leaks_matches_brute_force():
    """Test digits against training digits, with copies of 7 test digits planted in training."""
    train = [digit(index, "train") for index in range(300)]
    test = [digit(index, "test") for index in range(100)]
    planted_in_train = {3: as_jpeg(test[3]), 17: test[17], 40: brighter(test[40]), 41: as_jpeg(test[41]),
                        60: test[60], 88: brighter(test[88]), 99: as_jpeg(test[99])}
    train_images = train + list(planted_in_train.values())
    mean = grey(train_images).mean(0)
    train_features, test_features = pixels(train_images, mean), pixels(test, mean)
    report = find_leaks(train_features, test_features, query_rows=33)
    assert sorted(test for test, _, _ in report.pairs) == sorted(planted_in_train)
    assert report.count == 7 and report.fraction == pytest.approx(0.07)
    train_of = {test: 300 + position for position, test in enumerate(planted_in_train)}
    assert all(train == train_of[test] for test, train, _ in report.pairs)
    for threshold in (0.8, 0.9, 0.95):  # the brute-force count, where distinct digits match too
        unit_train = train_features / np.linalg.norm(train_features, axis=1, keepdims=True)
        unit_test = test_features / np.linalg.norm(test_features, axis=1, keepdims=True)
        best = (unit_test.astype(np.float64) @ unit_train.T.astype(np.float64)).max(1)
        assert find_leaks(train_features, test_features, threshold).count == int((best >= threshold).sum())
    document = json.loads(json.dumps(report.to_dict()))
    assert document["count"] == 7 and len(document["pairs"]) == 7 and document["threshold"] == DEFAULT_THRESHOLD


def test_find_leaks_refuses_features_of_different_backbones():
    with pytest.raises(DuplicateError, match="same backbone"):
        find_leaks(np.ones((4, 8), np.float32), np.ones((2, 16), np.float32))


# ---------------------------------------------------------------------------------------------
# Exact duplicates


def test_exact_duplicates_by_content(tmp_path):
    paths = []
    for index in range(6):
        path = tmp_path / f"{index}.png"
        digit(index).save(path)
        paths.append(str(path))
    shutil.copyfile(paths[2], tmp_path / "copy-of-2.png")
    shutil.copyfile(paths[2], tmp_path / "another-copy-of-2.png")
    as_jpeg(digit(4)).save(tmp_path / "jpeg-of-4.jpg", quality=95)  # same image, other bytes
    (tmp_path / "empty-a.png").touch(), (tmp_path / "empty-b.png").touch()
    paths += [str(tmp_path / name) for name in ("copy-of-2.png", "jpeg-of-4.jpg", "another-copy-of-2.png",
                                                "empty-a.png", "empty-b.png", "missing.png")]
    groups, skipped = find_exact_duplicates(paths)
    assert groups == [[2, 6, 8]]
    assert sorted(Path(path).name for path, _ in skipped) == ["empty-a.png", "empty-b.png", "missing.png"]
    assert file_digest(paths[2], block=7) == file_digest(paths[6])  # blocks do not change the digest


# ---------------------------------------------------------------------------------------------
# ssl-dedup, end to end


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return export_random_backbone(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def planted_folder(tmp_path_factory) -> Path:
    """40 distinct digits in class folders, two byte copies of one, JPEG copies of two others and
    one file that is not an image."""
    folder = tmp_path_factory.mktemp("inbox")
    for index in range(40):
        (folder / str(index % 10)).mkdir(exist_ok=True)
        digit(index).save(folder / str(index % 10) / f"{index:04d}.png")
    shutil.copyfile(folder / "1" / "0001.png", folder / "1" / "copy-a.png")
    shutil.copyfile(folder / "1" / "0001.png", folder / "copy-b.png")
    digit(2).save(folder / "2" / "0002-again.jpg", quality=95)
    digit(3).save(folder / "3" / "0003-again.jpg", quality=95)
    (folder / "broken.png").write_bytes(b"not an image at all")
    return folder


def run(*argv) -> int:
    return main([str(arg) for arg in argv] + ["--quiet"])


def test_cli_finds_the_planted_groups(planted_folder, checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    # A random network maps all digits close together (distinct ones reach 0.996): strict threshold.
    assert run("--checkpoint", checkpoint, "--data", planted_folder, "--threshold", 0.9995, "--out", out) == 0
    summary = capsys.readouterr().out
    assert "44 images searched (1 of 45 files unreadable" in summary and "3 duplicate groups holding 7 images" in summary
    document = json.loads((out / "duplicates.json").read_text())
    groups = [sorted(member["path"] for member in group["members"]) for group in document["groups"]]
    assert groups[0] == ["1/0001.png", "1/copy-a.png", "copy-b.png"]  # the largest first
    assert sorted(groups) == [["1/0001.png", "1/copy-a.png", "copy-b.png"], ["2/0002-again.jpg", "2/0002.png"],
                      ["3/0003-again.jpg", "3/0003.png"]]
    assert document["counts"] == {"files": 45, "images": 44, "skipped": 1, "groups": 3, "images_in_groups": 7,
                                  "exact_images": 3}
    assert document["skipped"][0]["path"] == "broken.png"
    rows = (out / "duplicates.csv").read_text().splitlines()
    assert rows[0] == "group,path,similarity,exact" and len(rows) == 8
    assert {row.split(",")[3] for row in rows[1:4]} == {"yes"} and rows[4].split(",")[3] == "no"
    assert Image.open(out / "duplicates.png").size[0] > 100


def test_cli_exact_only_needs_no_checkpoint(planted_folder, tmp_path, capsys):
    assert run("--data", planted_folder, "--exact-only", "--no-plot", "--out", tmp_path) == 0
    document = json.loads((tmp_path / "duplicates.json").read_text())
    assert document["exact_only"] and document["counts"]["groups"] == 1 and document["counts"]["exact_images"] == 3
    assert not (tmp_path / "duplicates.png").exists()


def test_cli_refuses_to_overwrite_then_does(planted_folder, checkpoint, tmp_path, capsys):
    args = ["--checkpoint", checkpoint, "--data", planted_folder, "--threshold", 0.9995, "--out", tmp_path]
    assert run(*args, "--no-plot") == 0
    before = (tmp_path / "duplicates.json").read_bytes()
    capsys.readouterr()
    assert run(*args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "duplicates.json").read_bytes() == before
    assert run(*args, "--overwrite", "--exact-only", "--no-plot") == 0
    assert json.loads((tmp_path / "duplicates.json").read_text())["exact_only"]


def bad_inputs(folder: Path, checkpoint: Path, tmp: Path) -> dict[str, list]:
    (tmp / "empty").mkdir()
    (tmp / "junk").mkdir()
    (tmp / "junk" / "a.png").write_bytes(b"garbage")
    (tmp / "junk" / "b.jpg").write_bytes(b"")
    (tmp / "zeros").mkdir()
    (tmp / "zeros" / "a.png").touch(), (tmp / "zeros" / "b.png").touch()
    return {
        "missing checkpoint": ["--checkpoint", tmp / "nope", "--data", folder],
        "no checkpoint": ["--data", folder],
        "missing folder": ["--checkpoint", checkpoint, "--data", tmp / "nowhere"],
        "empty folder": ["--checkpoint", checkpoint, "--data", tmp / "empty"],
        "threshold 0": ["--checkpoint", checkpoint, "--data", folder, "--threshold", 0],
        "threshold 1.5": ["--checkpoint", checkpoint, "--data", folder, "--threshold", 1.5],
        "nothing readable": ["--checkpoint", checkpoint, "--data", tmp / "junk"],
        "nothing readable, exact": ["--data", tmp / "zeros", "--exact-only"],
    }


def test_every_bad_input_is_one_line_exit_2_and_writes_nothing(planted_folder, checkpoint, tmp_path, capsys):
    for name, args in bad_inputs(planted_folder, checkpoint, tmp_path).items():
        out = tmp_path / f"out-{name.replace(' ', '-')}"
        assert run(*args, "--out", out) == 2, name
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and err.startswith("ssl-dedup: error: "), (name, err)
        assert not out.exists(), name


def test_cli_exact_only_plots_copies_of_a_broken_file(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    for name in ("a.png", "b.png"):
        (tmp_path / "in" / name).write_bytes(b"not an image, twice")
    digit(0).save(tmp_path / "in" / "c.png")
    assert run("--data", tmp_path / "in", "--exact-only", "--out", tmp_path / "out") == 0
    assert (tmp_path / "out" / "duplicates.png").exists()
