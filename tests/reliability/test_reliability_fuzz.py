"""Fuzzing the image loader: real PNG, JPEG, GIF, BMP, TIFF and WebP files with their bytes
mutated (overwritten, flipped, cut, inserted, deleted, size fields set to edge values; PNG chunk
checksums repaired so mutations get past the CRC check into the decoders).

The only allowed outcomes of ``load_image`` are an RGB image or ``UnreadableImage``: any other
exception would end a run that should have skipped one file.
"""

from __future__ import annotations

import os
import struct
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from ssl_pretrain.data import UnreadableImage, load_image

from badinput import fuzz_seeds

SEEDS = fuzz_seeds()
MAX_PIXELS = 1 << 22
"""A lower limit than the default keeps each case fast (a mutated header may claim millions of
pixels); the behaviour under test, decode or ``UnreadableImage``, does not depend on it."""
EDGE_VALUES = [0, 1, 2, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000,
               0xFFFFFFFF]


def fix_png_crcs(data: bytes) -> bytes:
    """Recompute every chunk's CRC, as far as the chunk lengths still make sense."""
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return data
    out, offset = bytearray(data), 8
    while offset + 12 <= len(out):
        (length,) = struct.unpack(">I", out[offset : offset + 4])
        end = offset + 8 + length
        if end + 4 > len(out):
            break
        out[end : end + 4] = struct.pack(">I", zlib.crc32(bytes(out[offset + 4 : end])))
        offset = end + 4
    return bytes(out)


@st.composite
def mutated_images(draw) -> tuple[str, bytes]:
    kind = draw(st.sampled_from(sorted(SEEDS)))
    data = bytearray(SEEDS[kind])
    for _ in range(draw(st.integers(1, 6))):
        size = len(data)
        # Headers hold the fields decoders trust (sizes, counts, offsets): aim half the hits there.
        position = draw(st.one_of(st.integers(0, min(64, max(size - 1, 0))), st.integers(0, max(size - 1, 0))))
        operation = draw(st.sampled_from(["set", "flip", "cut", "insert", "delete", "int16", "int32", "repeat"]))
        if operation == "set" and size:
            data[position] = draw(st.integers(0, 255))
        elif operation == "flip" and size:
            data[position] ^= 1 << draw(st.integers(0, 7))
        elif operation == "cut":
            del data[position:]
        elif operation == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=16))
        elif operation == "delete":
            del data[position : position + draw(st.integers(1, 32))]
        elif operation in ("int16", "int32"):
            width, value = (2, 0xFFFF) if operation == "int16" else (4, 0xFFFFFFFF)
            number = draw(st.sampled_from(EDGE_VALUES)) & value
            order = draw(st.sampled_from([">", "<"]))
            data[position : position + width] = struct.pack(order + ("H" if width == 2 else "I"), number)
        elif operation == "repeat":
            data[position:position] = data[position : position + draw(st.integers(1, 64))]
    if kind.startswith("png") and draw(st.booleans()):
        data = bytearray(fix_png_crcs(bytes(data)))
    return kind, bytes(data)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def check_outcome(folder, kind: str, payload: bytes) -> None:
    path = os.path.join(folder, f"case.{kind}")
    with open(path, "wb") as file:
        file.write(payload)
    try:
        image = load_image(path, max_pixels=MAX_PIXELS)
    except UnreadableImage as error:
        assert str(error), "a skip needs a reason"
        return
    assert isinstance(image, Image.Image) and image.mode == "RGB"
    assert image.width >= 1 and image.height >= 1


def test_the_seeds_themselves_decode(scratch):
    for kind, payload in SEEDS.items():
        path = os.path.join(scratch, f"seed.{kind}")
        with open(path, "wb") as file:
            file.write(payload)
        assert load_image(path).mode == "RGB", kind


@settings(max_examples=1000, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(case=mutated_images())
def test_mutated_images_decode_or_are_unreadable(scratch, case):
    """1,000 cases, the same every run (derandomized): a regression check of the cases found so far."""
    check_outcome(scratch, *case)


@pytest.mark.slow
@settings(max_examples=6_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=mutated_images())
def test_mutated_images_decode_or_are_unreadable_deep(scratch, case):
    """6,000 new random cases per run: every CI run searches somewhere new."""
    check_outcome(scratch, *case)
