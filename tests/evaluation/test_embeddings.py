"""Embeddings: extraction in eval mode without side effects, unreadable files skipped, ``.npz``
files without pickle, and a cache that is reused only while weights, data and transform match."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import linear_probe.embeddings as embeddings_module
from linear_probe.embeddings import (Embeddings, cached_embeddings, extract_embeddings, fingerprint_module,
                                     fingerprint_source, load_embeddings, save_embeddings)
from linear_probe.errors import EvaluationError
from ssl_pretrain.models.backbones import build_backbone
from ssl_pretrain.checkpoint import load_backbone
from ssl_pretrain.data import open_source
from ssl_pretrain.augment.transforms import build_eval_transform

from digit_files import DIGITS_MEAN, DIGITS_STD, write_digits_folder

TRANSFORM = build_eval_transform(16, DIGITS_MEAN, DIGITS_STD)


def test_extraction_gives_one_row_per_image_and_restores_training_mode(random_checkpoint, digits_folders):
    backbone, info = load_backbone(random_checkpoint)
    backbone.train()  # as the pretraining loop's kNN monitor hands it over
    stats_before = {name: tensor.clone() for name, tensor in backbone.state_dict().items()}
    source = open_source(str(digits_folders[1]), labelled=True)
    embeddings = extract_embeddings(backbone, source, TRANSFORM, batch_size=32, progress=False)
    assert embeddings.features.shape == (len(source), info.feature_dim)
    assert embeddings.features.dtype == np.float32 and embeddings.labels.dtype == np.int64
    assert np.array_equal(embeddings.labels, source.labels)
    assert embeddings.names[0] == os.path.join("0", os.listdir(digits_folders[1] / "0")[0]) or "/" in embeddings.names[0]
    assert backbone.training and all(module.training for module in backbone.modules())
    assert all(torch.equal(tensor, backbone.state_dict()[name]) for name, tensor in stats_before.items())
    # Eval mode: the same images give the same features whatever the batch size.
    again = extract_embeddings(backbone, source, TRANSFORM, batch_size=7, progress=False)
    np.testing.assert_allclose(again.features, embeddings.features, rtol=1e-4, atol=1e-5)


def test_unreadable_images_are_skipped_and_named(tmp_path, caplog):
    folder = write_digits_folder(tmp_path / "data", 3, classes=[0, 1])
    (folder / "1" / "broken.png").write_bytes(b"not a png at all")
    (folder / "0" / "empty.png").write_bytes(b"")
    source = open_source(str(folder), labelled=True)
    embeddings = extract_embeddings(torch.nn.Flatten(), source, TRANSFORM, progress=False)
    assert len(embeddings) == 6 and len(embeddings.skipped) == 2
    assert {name for name, _ in embeddings.skipped} == {os.path.join("1", "broken.png"), os.path.join("0", "empty.png")}
    assert "2 of 8 images could not be read" in caplog.text
    # Rows keep their source positions, so a subset of the source finds the readable ones.
    assert len(embeddings.take(np.arange(len(source)))) == 6


def test_npz_round_trip_without_pickle(tmp_path):
    original = Embeddings(np.random.default_rng(0).standard_normal((4, 3)), np.array([0, 1, 1, 0]),
                          ["a/1.png", "b/é.png", "c", "d"], [("x.png", "empty file")], classes=["a", "b"])
    save_embeddings(tmp_path / "e.npz", original)
    with np.load(tmp_path / "e.npz", allow_pickle=False) as arrays:
        assert arrays["names"].dtype.kind == "U"
    loaded = load_embeddings(tmp_path / "e.npz")
    np.testing.assert_array_equal(loaded.features, original.features.astype(np.float32))
    assert loaded.names == original.names and loaded.skipped == original.skipped and loaded.classes == ["a", "b"]
    assert np.array_equal(loaded.labels, original.labels)


def test_mismatched_lengths_are_one_line_errors(tmp_path):
    np.savez(tmp_path / "bad.npz", features=np.zeros((10, 4), np.float32), labels=np.zeros(9, np.int64))
    with pytest.raises(EvaluationError) as error:
        load_embeddings(tmp_path / "bad.npz")
    assert "mismatched lengths" in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(EvaluationError, match="not found"):
        load_embeddings(tmp_path / "missing.npz")


def test_cache_is_reused_until_weights_or_data_change(tmp_path, monkeypatch):
    folder = write_digits_folder(tmp_path / "data", 2, classes=[0, 1])
    source = open_source(str(folder), labelled=True)
    backbone, _ = build_backbone("smallconv", small_stem=True)
    backbone.eval()
    calls = []
    real_extract = embeddings_module.extract_embeddings
    monkeypatch.setattr(embeddings_module, "extract_embeddings",
                        lambda *args, **kwargs: calls.append(1) or real_extract(*args, **kwargs))

    def run():
        return cached_embeddings(tmp_path / "cache", "ssl-train", fingerprint_module(backbone),
                                 fingerprint_source(open_source(str(folder), labelled=True)), backbone, source,
                                 TRANSFORM, progress=False)

    first = run()
    np.testing.assert_array_equal(run().features, first.features)
    assert len(calls) == 1  # the second call read the file
    one_file = folder / "0" / os.listdir(folder / "0")[0]
    os.utime(one_file, ns=(0, 0))  # the data changed on disk
    run()
    with torch.no_grad():
        backbone.features[0].weight.add_(1.0)  # the weights changed
    run()
    assert len(calls) == 3 and len(list((tmp_path / "cache").glob("*.json"))) == 3  # one .npy set each


def test_take_picks_rows_by_source_position_in_the_order_asked():
    embeddings = Embeddings(np.arange(8, dtype=np.float32).reshape(4, 2), np.array([0, 1, 0, 1]),
                            ["a", "b", "c", "d"], indices=np.array([9, 2, 5, 7]))
    picked = embeddings.take(np.array([7, 2, 3]))  # 3 is not there (an unreadable image)
    assert picked.names == ["d", "b"] and picked.labels.tolist() == [1, 1]
    assert picked.indices.tolist() == [7, 2]


def test_file_names_that_are_not_utf8_are_fingerprinted_and_saved(tmp_path):
    folder = write_digits_folder(tmp_path / "data", 2, classes=[0, 1])
    odd = os.path.join(os.fsencode(folder / "1"), b"caf\xe9.png")  # Latin-1 bytes, not UTF-8
    with open(odd, "wb") as file, open(sorted((folder / "1").iterdir())[0], "rb") as png:
        file.write(png.read())
    source = open_source(str(folder), labelled=True)
    assert len(fingerprint_source(source)) == 64
    embeddings = extract_embeddings(torch.nn.Flatten(), source, TRANSFORM, progress=False)
    save_embeddings(tmp_path / "e.npz", embeddings)
    assert load_embeddings(tmp_path / "e.npz").names == embeddings.names
    assert os.fsdecode(os.path.join(b"1", b"caf\xe9.png")) in embeddings.names


def test_batched_eval_transform_equals_the_per_image_transform():
    """Extraction decodes to uint8 per image and normalises whole batches: same numbers."""
    from PIL import Image

    from ssl_pretrain.data import digits_source
    from ssl_pretrain.augment.transforms import build_eval_transform

    transform = build_eval_transform(16, (0.4, 0.45, 0.5), (0.2, 0.25, 0.3))
    source = digits_source("train")
    images = [source.load(i) for i in range(8)]  # 8x8: resized
    images += [image.resize((16, 16)) for image in images]  # input size: no resampling
    images += [image.resize((24, 40), Image.BICUBIC) for image in images[:4]]  # cropped
    for group in (images[:8], images[8:16], images[16:]):
        per_image = torch.stack([transform(image) for image in group])
        batched = transform.normalise(torch.stack([transform.to_uint8(image) for image in group]))
        torch.testing.assert_close(batched, per_image, rtol=0, atol=1e-6)


def _digits_16px(folder):
    from digit_files import write_digit_images

    write_digit_images(folder, 120, size=16)
    (folder / "3" / "broken.png").write_bytes(b"not a png at all")
    return open_source(str(folder), labelled=True)


def test_images_decoded_once_in_memory_give_the_same_embeddings(tmp_path, random_checkpoint):
    from ssl_pretrain.data import decoded_in_memory
    from ssl_pretrain.data import DecodedSource, UnreadableImage

    source = _digits_16px(tmp_path / "data")
    backbone, _ = load_backbone(random_checkpoint)
    plain = extract_embeddings(backbone, source, TRANSFORM, batch_size=32, progress=False)
    plain_pixels = extract_embeddings(torch.nn.Flatten(), source, TRANSFORM, batch_size=32, progress=False)

    decoded = decoded_in_memory(source)
    assert isinstance(decoded, DecodedSource) and decoded.size == (16, 16)
    reads = {"n": 0}
    real_load = source.load

    def counting_load(index):
        reads["n"] += 1
        return real_load(index)

    source.load = counting_load
    first = extract_embeddings(backbone, decoded, TRANSFORM, batch_size=32, progress=False)
    pixels = extract_embeddings(torch.nn.Flatten(), decoded, TRANSFORM, batch_size=32, progress=False)
    assert reads["n"] == len(source)  # one decode for both feature sets
    np.testing.assert_allclose(first.features, plain.features, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(pixels.features, plain_pixels.features)
    for embeddings in (first, pixels):
        assert embeddings.names == plain.names and embeddings.skipped == plain.skipped
        np.testing.assert_array_equal(embeddings.indices, plain.indices)
        np.testing.assert_array_equal(embeddings.labels, plain.labels)
    # load() serves the decoded pixels, and an unreadable file's reason
    broken = [i for i in range(len(source)) if source.name(i).endswith("broken.png")][0]
    with pytest.raises(UnreadableImage, match="not an image"):
        decoded.load(broken)
    assert np.array_equal(np.asarray(decoded.load(0)), np.asarray(real_load(0)))
    assert reads["n"] == len(source)  # served from memory


def test_images_of_several_sizes_are_decoded_as_needed(tmp_path, random_checkpoint):
    from PIL import Image

    from ssl_pretrain.data import DecodedSource

    source = _digits_16px(tmp_path / "data")
    Image.new("RGB", (20, 24), (200, 10, 10)).save(tmp_path / "data" / "7" / "zz_larger.png")
    source = open_source(str(tmp_path / "data"), labelled=True)
    backbone, _ = load_backbone(random_checkpoint)
    decoded = DecodedSource(source, (16, 16))
    assert decoded.decoded() is None
    plain = extract_embeddings(backbone, source, TRANSFORM, batch_size=32, progress=False)
    through = extract_embeddings(backbone, decoded, TRANSFORM, batch_size=32, progress=False)
    np.testing.assert_allclose(through.features, plain.features, rtol=1e-4, atol=1e-5)
    assert through.names == plain.names and through.skipped == plain.skipped


def test_only_small_images_of_one_size_are_held_in_memory(digits_folders, monkeypatch):
    import ssl_pretrain.data.decoding as decoding_module
    from ssl_pretrain.data import DecodedSource

    source = open_source(str(digits_folders[1]), labelled=True)  # 8x8 digits
    assert isinstance(decoding_module.decoded_in_memory(source), DecodedSource)
    monkeypatch.setattr(decoding_module, "IN_MEMORY_BYTES", len(source) * 8 * 8 * 3 - 1)
    assert decoding_module.decoded_in_memory(source) is source
