"""Tar shards in WebDataset layout: real digits written with ``tarfile``, read back by offset."""

from __future__ import annotations

import functools
import gzip
import io
import logging
import os
import pickle
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_pretrain.data import shard_index as shard_index_module
from ssl_pretrain.data import (
    DataError,
    UnreadableImage,
    check_readable,
    decode_all,
    digits_source,
    open_source,
    random_subset,
)
from ssl_pretrain.data.shards import TarShardSource, expand_braces, find_shards


@functools.cache
def _digits():
    return digits_source("train")


def _digit_png(index: int) -> tuple[bytes, np.ndarray, int]:
    """Training digit ``index`` upscaled to 16x16 RGB: PNG bytes, the pixels, the label."""
    source = _digits()
    image = source.load(index).resize((16, 16), Image.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue(), np.asarray(image), int(source.labels[index])


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def _write_shards(folder: Path, n_shards: int = 3, per_shard: int = 20, labels: bool = True):
    """``folder/train-00000{i}.tar``, each sample a ``.png`` and a ``.cls``; a ``.json`` member
    too, which is not an image. Returns the pixels and labels in order."""
    folder.mkdir(parents=True, exist_ok=True)
    pixels, targets = [], []
    for shard in range(n_shards):
        with tarfile.open(folder / f"train-{shard:06d}.tar", "w") as archive:
            for position in range(per_shard):
                index = shard * per_shard + position
                png, array, label = _digit_png(index)
                key = f"sample{index:06d}"
                _add(archive, f"{key}.png", png)
                if labels:
                    _add(archive, f"{key}.cls", f"{label}\n".encode())
                _add(archive, f"{key}.json", b'{"source": "digits"}')
                pixels.append(array)
                targets.append(label)
    past = time.time() - 3600  # written long before training: trusted by the index cache
    for shard in folder.glob("*.tar"):
        os.utime(shard, (past, past))
    return np.stack(pixels), np.asarray(targets)


@pytest.fixture(scope="module")
def shard_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    pixels, labels = _write_shards(folder)
    return folder, pixels, labels


def test_round_trip_pixels_labels_and_names(shard_folder):
    folder, pixels, labels = shard_folder
    source = open_source(str(folder), labelled=True)
    assert isinstance(source, TarShardSource) and len(source) == 60
    np.testing.assert_array_equal(source.labels, labels)
    assert source.classes == [str(c) for c in range(labels.max() + 1)]
    for index in range(len(source)):
        image = source.load(index)
        assert image.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(image), pixels[index])
    assert source.name(21) == "train-000001.tar/sample000021.png"
    # what pretraining and evaluation do with any source
    check_readable(source)
    decoded, kept, skipped = decode_all(source, (16, 16), progress=False)
    assert skipped == [] and len(kept) == 60 and np.array_equal(decoded, pixels)
    subset = random_subset(source, 10, seed=1)
    np.testing.assert_array_equal(subset.labels, labels[subset.indices])


def test_one_file_brace_pattern_glob_and_folder_agree(shard_folder):
    folder, _, labels = shard_folder
    expected = [str(folder / f"train-{i:06d}.tar") for i in range(3)]
    assert find_shards(str(folder)) == expected
    assert find_shards(str(folder / "train-{000000..000002}.tar")) == expected
    assert find_shards(str(folder / "*.tar")) == expected
    assert find_shards(str(folder / "train-000001.tar")) == expected[1:2]
    one = open_source(str(folder / "train-000001.tar"))
    np.testing.assert_array_equal(one.labels, labels[20:40])
    pattern = open_source(str(folder / "train-{000000..000002}.tar"))
    assert [pattern.name(i) for i in range(60)] == [open_source(str(folder)).name(i) for i in range(60)]
    with pytest.raises(DataError, match="shard not found: .*train-000003.tar"):
        open_source(str(folder / "train-{000000..000003}.tar"))


def test_expand_braces():
    assert expand_braces("a-{000..002}.tar") == ["a-000.tar", "a-001.tar", "a-002.tar"]
    assert expand_braces("{train,val}-{8..10}.tar") == [
        "train-8.tar", "train-9.tar", "train-10.tar", "val-8.tar", "val-9.tar", "val-10.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_bad_members_missing_images_and_labels(tmp_path, caplog):
    png, array, _ = _digit_png(0)
    with tarfile.open(tmp_path / "mixed.tar", "w") as archive:
        _add(archive, "good.png", png)
        _add(archive, "good.cls", b"3")
        _add(archive, "broken.jpg", b"not a jpeg at all")
        _add(archive, "broken.cls", b"1")
        _add(archive, "empty.webp", b"")
        _add(archive, "nolabel.png", png)
        _add(archive, "textonly.txt", b"no image in this sample")
        _add(archive, "dir/nested.seg.png", png)  # a "seg.png" field is not the sample's image
        _add(archive, "dir/nested.jpeg", png)  # the content decides, not the extension
    with caplog.at_level(logging.WARNING):
        source = open_source(str(tmp_path / "mixed.tar"))
    assert "1 sample(s) without an image member" in caplog.text
    names = [source.name(i) for i in range(len(source))]
    assert names == ["mixed.tar/good.png", "mixed.tar/broken.jpg", "mixed.tar/empty.webp",
                     "mixed.tar/nolabel.png", "mixed.tar/dir/nested.jpeg"]
    np.testing.assert_array_equal(np.asarray(source.load(0)), array)
    with pytest.raises(UnreadableImage, match="not an image"):
        source.load(1)
    with pytest.raises(UnreadableImage, match="empty"):
        source.load(2)
    np.testing.assert_array_equal(np.asarray(source.load(4)), array)
    assert source.labels is None  # three samples have no label
    with pytest.raises(DataError, match="3 of 5 samples have no valid .cls label"):
        open_source(str(tmp_path / "mixed.tar"), labelled=True)


def test_huge_images_are_refused_like_files(tmp_path):
    buffer = io.BytesIO()
    Image.new("I;16", (100, 100), 500).save(buffer, format="PNG")
    with tarfile.open(tmp_path / "big.tar", "w") as archive:
        _add(archive, "big.png", buffer.getvalue())
    assert open_source(str(tmp_path / "big.tar")).load(0).mode == "RGB"
    with pytest.raises(UnreadableImage, match="exceeds 5000 pixels"):
        open_source(str(tmp_path / "big.tar"), max_pixels=5000).load(0)


def test_compressed_truncated_and_foreign_shards_are_one_line_errors(tmp_path, shard_folder):
    folder, _, _ = shard_folder
    content = (folder / "train-000000.tar").read_bytes()
    (tmp_path / "a.tar.gz").write_bytes(gzip.compress(content))
    (tmp_path / "disguised.tar").write_bytes(gzip.compress(content))
    (tmp_path / "cut.tar").write_bytes(content[: len(content) // 2])
    (tmp_path / "cut-in-header.tar").write_bytes(content[: 512 * 7 + 100])
    (tmp_path / "random.tar").write_bytes(os.urandom(4096))
    gz_only = tmp_path / "gz-folder"
    gz_only.mkdir()
    (gz_only / "x.tar.gz").write_bytes(b"")
    cases = {
        "a.tar.gz": "is compressed: random access needs uncompressed .tar",
        "disguised.tar": "is compressed",
        "cut.tar": "cut.tar is truncated or corrupt",
        "cut-in-header.tar": "cut-in-header.tar is truncated or corrupt",
        "random.tar": "random.tar is truncated or corrupt",
        "gz-folder": "is compressed",
    }
    for name, message in cases.items():
        with pytest.raises(DataError, match=message) as caught:
            open_source(str(tmp_path / name))
        assert "\n" not in str(caught.value)


def test_shard_index_is_cached_and_reread_only_for_changed_shards(tmp_path, monkeypatch):
    folder = tmp_path / "shards"
    _write_shards(folder, n_shards=3, per_shard=4)
    index_file = tmp_path / "run" / "file_index.txt"
    first = open_source(str(folder), index_cache=index_file)
    read = []
    real_index_shard = shard_index_module.index_shard
    monkeypatch.setattr(shard_index_module, "index_shard", lambda path: read.append(path) or real_index_shard(path))
    second = open_source(str(folder), index_cache=index_file)
    assert read == [] and len(second) == 12
    np.testing.assert_array_equal(second.offsets, first.offsets)
    np.testing.assert_array_equal(second.labels, first.labels)
    assert [second.name(i) for i in range(12)] == [first.name(i) for i in range(12)]
    # one shard re-written with one more sample: only it is read again
    changed = folder / "train-000001.tar"
    png, _, _ = _digit_png(100)
    with tarfile.open(changed, "a") as archive:
        _add(archive, "extra.png", png)
        _add(archive, "extra.cls", b"7")
    past = time.time() - 3600
    os.utime(changed, (past, past))
    third = open_source(str(folder), index_cache=index_file)
    assert read == [str(changed)] and len(third) == 13 and third.name(8) == "train-000001.tar/extra.png"
    index_file.write_bytes(b"garbage")
    assert len(open_source(str(folder), index_cache=index_file)) == 13


class _Pixels(torch.utils.data.Dataset):
    def __init__(self, source):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        return torch.from_numpy(np.asarray(self.source.load(index))), index, os.getpid()


def test_forked_dataloader_workers_read_their_own_handles(shard_folder):
    folder, pixels, _ = shard_folder
    source = open_source(str(folder))
    source.load(0)  # the parent holds a descriptor before the workers fork
    loader = torch.utils.data.DataLoader(_Pixels(source), batch_size=8, shuffle=True, num_workers=2,
                                         multiprocessing_context="fork",
                                         generator=torch.Generator().manual_seed(0))
    seen, workers = [], set()
    for images, indices, pids in loader:
        for image, index in zip(images.numpy(), indices.tolist()):
            np.testing.assert_array_equal(image, pixels[index])
            seen.append(index)
        workers.update(pids.tolist())
    assert sorted(seen) == list(range(60)) and len(workers) == 2 and os.getpid() not in workers
    copy = pickle.loads(pickle.dumps(source))  # spawn-style workers get a pickled copy
    np.testing.assert_array_equal(np.asarray(copy.load(59)), pixels[59])
