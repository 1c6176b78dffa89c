"""The file index: a folder scanned once, reused while its folders' times are unchanged."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import pytest

from ssl_pretrain.data import file_index, sources
from ssl_pretrain.data import image_folder_source, open_source, scan_images


def _age(root: Path, seconds: float = 3600) -> None:
    """Set every folder's time an hour back, as for a data set written long before training
    (a folder changed within seconds of a scan is not trusted)."""
    past = time.time() - seconds
    for folder, _, _ in os.walk(root):
        os.utime(folder, (past, past))


def _make_tree(root: Path) -> Path:
    """Three classes of a few hundred tiny files (scanning never decodes), with the names and
    entries that the scan filters: other extensions, upper case, hidden files, a symlink loop,
    a line break, a leading quote and bytes that are not UTF-8."""
    for label, class_name in enumerate(["cat", "dog", "eel"]):
        for part in range(3):
            folder = root / class_name / f"part{part}"
            folder.mkdir(parents=True)
            for index in range(40):
                (folder / f"{label}_{part}_{index:03d}.jpg").write_bytes(b"x")
        (root / class_name / "notes.txt").write_text("not an image")
        (root / class_name / "UPPER.PNG").write_bytes(b"x")
        (root / class_name / ".hidden.png").write_bytes(b"x")
    (root / "dog" / "line\nbreak.png").write_bytes(b"x")
    (root / "dog" / '"quoted".png').write_bytes(b"x")
    (root / "eel" / "with space.webp").write_bytes(b"x")
    os.close(os.open(os.fsencode(root / "eel") + b"/latin1-\xe9.png", os.O_CREAT | os.O_WRONLY))
    os.symlink(root / "cat", root / "cat" / "part0" / "loop")
    (root / "top-level.jpg").write_bytes(b"x")
    _age(root)
    return root


@pytest.fixture
def tree(tmp_path) -> Path:
    return _make_tree(tmp_path / "images")


def _forbid_walking(monkeypatch) -> list[str]:
    """Make any walk of the tree fail; returns the folders listed (only the top one may be, by
    the check for a folder of tar shards, which stops at its first entry)."""
    def refuse(*args, **kwargs):
        raise AssertionError("the folder tree was walked although the index is valid")
    listed: list[str] = []
    real_scandir = os.scandir
    monkeypatch.setattr(sources, "walk_tree", refuse)
    monkeypatch.setattr(sources, "walk_class_folders", refuse)
    monkeypatch.setattr(os, "scandir", lambda path=".": listed.append(os.fspath(path)) or real_scandir(path))
    return listed


def test_cached_and_uncached_scans_are_identical(tree, tmp_path, monkeypatch):
    index = tmp_path / "run" / "file_index.txt"
    uncached = open_source(str(tree)).paths
    assert uncached == scan_images(tree) and len(uncached) == 3 * 3 * 40 + 3 * 2 + 4 + 1
    assert any("\n" in path for path in uncached) and any("\udce9" in path for path in uncached)
    first = open_source(str(tree), index_cache=index).paths
    assert index.is_file() and first == uncached
    listed = _forbid_walking(monkeypatch)
    assert open_source(str(tree), index_cache=index).paths == uncached
    assert listed == [str(tree)]


def test_labelled_cache_keeps_classes_labels_and_order(tree, tmp_path, monkeypatch):
    index = tmp_path / "file_index.txt"
    plain = image_folder_source(tree)
    image_folder_source(tree, index_cache=index)
    _forbid_walking(monkeypatch)
    cached = image_folder_source(tree, index_cache=index)
    assert cached.paths == plain.paths and cached.classes == plain.classes == ["cat", "dog", "eel"]
    np.testing.assert_array_equal(cached.labels, plain.labels)
    assert "top-level.jpg" not in {cached.name(i) for i in range(len(cached))}
    # the same index file never serves the other layout
    monkeypatch.undo()
    assert open_source(str(tree), index_cache=index).paths == scan_images(tree)


@pytest.mark.parametrize("change", ["add", "remove", "rename", "remove folder", "add folder"])
def test_a_change_in_any_subfolder_is_seen(tree, tmp_path, change):
    index = tmp_path / "file_index.txt"
    open_source(str(tree), index_cache=index)
    deep = tree / "dog" / "part2"
    if change == "add":
        (deep / "new.png").write_bytes(b"x")
    elif change == "remove":
        (deep / "1_2_000.jpg").unlink()
    elif change == "rename":
        (deep / "1_2_000.jpg").rename(deep / "1_2_000-renamed.jpg")
    elif change == "remove folder":
        for path in deep.iterdir():
            path.unlink()
        deep.rmdir()
    else:
        (deep / "deeper").mkdir()
        (deep / "deeper" / "x.png").write_bytes(b"x")
    assert open_source(str(tree), index_cache=index).paths == scan_images(tree)


def test_a_folder_changed_during_the_scan_is_not_trusted(tmp_path, monkeypatch):
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / "a.png").write_bytes(b"x")
    index = tmp_path / "file_index.txt"
    open_source(str(tmp_path / "fresh"), index_cache=index)
    calls = []
    real_walk = sources.walk_tree
    monkeypatch.setattr(sources, "walk_tree", lambda *args: calls.append(args) or real_walk(*args))
    assert len(open_source(str(tmp_path / "fresh"), index_cache=index)) == 1
    assert calls, "a folder modified a moment before the scan must be rescanned"


@pytest.mark.parametrize("damage", ["garbage", "truncated", "edited", "empty", "other root"])
def test_a_corrupt_or_foreign_index_is_rebuilt_with_a_warning(tree, tmp_path, caplog, monkeypatch, damage):
    index = tmp_path / "file_index.txt"
    open_source(str(tree), index_cache=index)
    content = index.read_bytes()
    if damage == "garbage":
        index.write_bytes(b"\x00\xff not an index")
    elif damage == "truncated":
        index.write_bytes(content[: len(content) // 2])
    elif damage == "edited":
        index.write_bytes(content.replace(b"0_1_003.jpg", b"0_1_003.jpx"))
    elif damage == "empty":
        index.write_bytes(b"")
    else:
        other = _make_tree(tmp_path / "other")
        open_source(str(other), index_cache=index)
    expected = scan_images(tree)
    with caplog.at_level(logging.INFO, logger="ssl_pretrain.data.file_index"):
        assert open_source(str(tree), index_cache=index).paths == expected
    if damage != "other root":
        assert "ignoring corrupt index" in caplog.text
    _forbid_walking(monkeypatch)  # rebuilt, and valid again
    assert open_source(str(tree), index_cache=index).paths == expected


def test_an_unwritable_index_location_only_warns(tree, tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("a file where a folder should be")
    with caplog.at_level(logging.WARNING):
        source = open_source(str(tree), index_cache=blocker / "file_index.txt")
    assert source.paths == scan_images(tree) and "could not write index" in caplog.text
    assert not list(tmp_path.glob("*.tmp"))


def test_a_scan_that_skipped_a_folder_is_not_cached(tree, tmp_path, monkeypatch, caplog):
    locked = str(tree / "cat" / "part1")
    real_scandir = os.scandir

    def scandir(path="."):
        if os.fspath(path) == locked:  # as chmod 0 would, for a user other than root
            raise PermissionError(13, "Permission denied", locked)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    index = tmp_path / "file_index.txt"
    with caplog.at_level(logging.WARNING):
        found = open_source(str(tree), index_cache=index).paths
    assert not index.exists() and "skipped folder" in caplog.text
    assert not any(path.startswith(locked) for path in found)


def test_index_file_is_text_with_a_header(tree, tmp_path):
    index = tmp_path / "file_index.txt"
    open_source(str(tree), index_cache=index)
    header, lines = file_index.read_index_file(index, file_index.FILE_INDEX_FORMAT)
    assert header["root"] == os.path.abspath(tree) and header["count"] == len(scan_images(tree))
    assert len(lines) == header["count"] + header["directories"] and "cat/part0/0_0_000.jpg" in lines


def test_benchmark_script_at_a_tiny_size(tmp_path, capsys):
    import importlib.util

    script = Path(__file__).resolve().parents[2] / "scripts" / "bench_file_index.py"
    spec = importlib.util.spec_from_file_location("bench_file_index", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--files", "200", "--folders", "10", "--shard-samples", "40", "--shards", "2",
                        "--dir", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "| cached open" in table and table.count("| 200 |") == 3 and table.count("| 40 |") == 3
