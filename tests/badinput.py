"""A folder with every kind of trouble a real image folder holds, and what should become of each file.

``make_messy_folder(root)`` writes real digits (scikit-learn's, as PNG) in class subfolders, then
beside them: files that decode but are unusual (1x1, 16-bit, palette with transparency, CMYK JPEG,
EXIF rotation, GIF/BMP/TIFF/WebP, a PNG named ``.jpg``, a non-UTF-8 name, a symlink) and files
that must be skipped with a reason (empty, truncated, random bytes, text, decompression bombs, a
zero-width header, no read permission). Some entries must never be listed at all (a symlink loop,
dangling links, a FIFO that would block a reader, a ``.txt`` file).

The layout is image-folder (``root/<digit>/<file>``), so the same folder serves pretraining
(subfolders ignored) and evaluation (subfolders are the classes). Names are what
``FileSource.name`` gives: paths relative to ``root``; non-UTF-8 bytes appear as surrogate
escapes (``os.fsdecode``).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import os
import struct
import subprocess
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ssl_pretrain.data import digits_source

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
BOMB_SIZE = (9000, 10000)  # 90,000,000 pixels: just over Pillow's 89,478,485 (and our default)
CLAIMED_SIZE = (100_000, 100_000)  # a header that claims 10^10 pixels: Pillow's own error


@dataclass
class MessyFolder:
    """What ``make_messy_folder`` wrote.

    Attributes:
        root: the folder (``root/<digit>/...``).
        good: names of files that must decode to RGB images and be used.
        bad: name -> a fragment the skip reason must contain (compare case-insensitively).
        ignored: names of entries that must never be listed as images (loops, FIFOs, ``.txt``).
        sizes: name -> ``(width, height)`` a good image must have once decoded (EXIF applied).
        labels: name -> class digit, for every good and bad file.
        permission_enforced: whether the mode-000 file is really unreadable to this process
            (as root it is not: root reads it anyway, so it is listed as good).
    """

    root: Path
    good: set[str] = field(default_factory=set)
    bad: dict[str, str] = field(default_factory=dict)
    ignored: set[str] = field(default_factory=set)
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)
    labels: dict[str, int] = field(default_factory=dict)
    permission_enforced: bool = True
    no_permission: str = ""

    @property
    def scanned(self) -> set[str]:
        return self.good | set(self.bad)

    def without_read_override(self) -> "MessyFolder":
        """What a process that cannot read mode-000 files (not root, or root run through
        ``privilege_drop_prefix``) must see: the mode-000 file moves from good to bad."""
        good = self.good - {self.no_permission}
        bad = {**self.bad, self.no_permission: "Permission denied"}
        return dataclasses.replace(self, good=good, bad=bad, permission_enforced=True)


# ---------------------------------------------------------------------------------------------
# Payloads


def _encode(image: Image.Image, format: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **params)
    return buffer.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_with_size(png: bytes, width: int, height: int) -> bytes:
    """A real PNG whose IHDR is rewritten to claim another size (CRC fixed, so it parses)."""
    assert png[12:16] == b"IHDR"
    ihdr = struct.pack(">II", width, height) + png[24:29]
    return png[:8] + _png_chunk(b"IHDR", ihdr) + png[33:]


def decompression_bomb_png(width: int = BOMB_SIZE[0], height: int = BOMB_SIZE[1]) -> bytes:
    """A *valid* all-black 8-bit grayscale PNG of ``width x height`` in a few hundred kB.

    Built without compressing 90 MB: one deflate block of zero rows, ended with a full flush
    (which makes it independent of what precedes it), repeated; the Adler-32 of ``n`` zero bytes
    is ``(n mod 65521) << 16 | 1``.
    """
    rows_per_block = 100
    assert height % rows_per_block == 0
    raw_block = b"\0" * ((width + 1) * rows_per_block)  # filter byte 0 + zero pixels per row
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = compressor.compress(raw_block) + compressor.flush(zlib.Z_FULL_FLUSH)
    total = (width + 1) * height
    stream = b"\x78\xda" + block * (height // rows_per_block) + b"\x03\x00"  # empty final block
    stream += struct.pack(">I", ((total % 65521) << 16) | 1)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return PNG_SIGNATURE + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", stream) + _png_chunk(b"IEND", b"")


@functools.lru_cache(maxsize=1)
def _digits():
    return digits_source("train")


def _digit(index: int, size: int = 16) -> tuple[Image.Image, int]:
    source = _digits()
    return source.load(index).resize((size, size), Image.BICUBIC), int(source.labels[index])


def _unusual_good_images(first_index: int) -> list[tuple[str, bytes, tuple[int, int] | None]]:
    """``(file name, payload, decoded size or None)`` of files that decode, each made from a digit."""
    index = iter(range(first_index, first_index + 100))
    digit = lambda: _digit(next(index))[0]  # noqa: E731
    sixteen_bit = Image.fromarray((np.asarray(digit().convert("L"), dtype=np.uint16) * 257))
    palette = digit().convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    rotated = digit().resize((20, 10))
    exif = rotated.getexif()
    exif[0x0112] = 6  # orientation 6: display rotated 90 degrees clockwise
    frames = [digit(), digit()]
    return [
        ("one_pixel.png", _encode(Image.new("RGB", (1, 1), (200, 30, 30)), "PNG"), (1, 1)),
        ("sixteen_bit_gray.png", _encode(sixteen_bit, "PNG"), (16, 16)),
        ("palette_transparent.png", _encode(palette, "PNG", transparency=0), (16, 16)),
        ("cmyk.jpg", _encode(digit().convert("CMYK"), "JPEG", quality=90), (16, 16)),
        ("exif_rotated.jpg", _encode(rotated, "JPEG", exif=exif.tobytes()), (10, 20)),
        ("grey_alpha.png", _encode(digit().convert("LA"), "PNG"), (16, 16)),
        ("animated.gif", _encode(frames[0], "GIF", save_all=True, append_images=frames[1:]), (16, 16)),
        ("bitmap.bmp", _encode(digit(), "BMP"), (16, 16)),
        ("float.tif", _encode(Image.fromarray(np.asarray(digit().convert("L"), np.float32) / 255), "TIFF"), (16, 16)),
        ("lossless.webp", _encode(digit(), "WEBP", lossless=True), (16, 16)),
        ("png_named.jpg", _encode(digit(), "PNG"), (16, 16)),
        ("UPPER_CASE.PNG", _encode(digit(), "PNG"), (16, 16)),
    ]


def _bad_payloads(rng: np.random.Generator, real_png: bytes, real_jpeg: bytes) -> list[tuple[str, bytes, str]]:
    """``(file name, payload, fragment of the expected reason)``."""
    return [
        ("zero_bytes.png", b"", "empty file"),
        ("zero_bytes.jpg", b"", "empty file"),
        ("truncated.jpg", real_jpeg[: len(real_jpeg) // 2], "truncated"),  # fragments: any case
        ("truncated.png", real_png[: len(real_png) - 30], "truncated"),
        ("header_only.png", real_png[:33], "not an image"),
        ("random_bytes.jpg", rng.integers(0, 256, 2048, dtype=np.uint8).tobytes(), "not an image"),
        ("random_bytes.tif", rng.integers(0, 256, 2048, dtype=np.uint8).tobytes(), "not an image"),
        ("text.png", b"this is a shopping list, not a picture\n", "not an image"),
        ("html.jpg", b"<!doctype html><title>404 Not Found</title>\n", "not an image"),
        ("bomb_90mpx.png", decompression_bomb_png(), "exceeds 89478485 pixels"),
        ("claims_1e10px.png", _png_with_size(real_png, *CLAIMED_SIZE), "decompression bomb"),
        ("zero_width.png", _png_with_size(real_png, 0, 16), "not an image"),
    ]


# ---------------------------------------------------------------------------------------------
# The folder


def make_messy_folder(root: str | Path, good_count: int = 40, unusual: bool = True,
                      non_utf8: bool = True) -> MessyFolder:
    """Write the messy folder under ``root`` (created) and return what each entry should become.

    Args:
        good_count: plain digit PNGs (real images), spread over the 10 class folders.
        unusual: add the decodable oddities (1x1, 16-bit, palette, CMYK, EXIF, GIF...: 12 files,
            of several sizes). Without them every good image is a 16x16 digit.
        non_utf8: add the two files whose names are not valid UTF-8.
    """
    root = Path(root)
    result = MessyFolder(root)
    rng = np.random.default_rng(0)

    def write(digit: int, name: str | bytes, payload: bytes) -> str:
        folder = root / str(digit)
        folder.mkdir(parents=True, exist_ok=True)
        path = os.path.join(os.fsencode(folder), os.fsencode(name))  # bytes: any name the OS allows
        with open(path, "wb") as file:
            file.write(payload)
        relative = os.path.relpath(os.fsdecode(path), root)
        result.labels[relative] = digit
        return relative

    for index in range(good_count):
        image, label = _digit(index)
        result.good.add(write(label, f"digit_{index:04d}.png", _encode(image, "PNG")))
    oddities = _unusual_good_images(good_count) if unusual else []
    for position, (name, payload, size) in enumerate(oddities):
        relative = write(position % 10, name, payload)
        result.good.add(relative)
        result.sizes[relative] = size

    image, _ = _digit(good_count + len(oddities) + 1)
    real_png, real_jpeg = _encode(image, "PNG"), _encode(image.resize((64, 64)), "JPEG")
    big_png = _encode(image.resize((64, 64)), "PNG")  # big enough that cutting 30 bytes leaves a header
    for position, (name, payload, reason) in enumerate(_bad_payloads(rng, big_png, real_jpeg)):
        result.bad[write(position % 10, name, payload)] = reason

    _add_odd_names(result, write, real_png, rng, non_utf8)
    _add_unreadable(result, write, real_png)
    _add_links_and_specials(result, root)
    return result


def _add_odd_names(result: MessyFolder, write, real_png: bytes, rng, non_utf8: bool) -> None:
    """Names that are not valid UTF-8 (Latin-1 and stray bytes), one good and one bad; a space,
    a leading dash and a newline in a name."""
    if non_utf8:
        result.good.add(write(3, b"caf\xe9_latin1_\xff.png", real_png))
        noise = rng.integers(0, 256, 700, dtype=np.uint8).tobytes()
        result.bad[write(4, b"broken_\xfe\xfd.jpg", noise)] = "not an image"
    result.good.add(write(5, "-leading dash and space.png", real_png))
    result.good.add(write(6, "new\nline.png", real_png))


def _add_unreadable(result: MessyFolder, write, real_png: bytes) -> None:
    """A valid PNG with mode 000. Root (and CAP_DAC_OVERRIDE) reads it anyway: then it is good."""
    name = write(7, "no_permission.png", real_png)
    result.no_permission = name
    path = result.root / name
    os.chmod(path, 0)
    try:
        with open(path, "rb"):
            pass
        result.permission_enforced = False
        result.good.add(name)
    except PermissionError:
        result.bad[name] = "Permission denied"


def _add_links_and_specials(result: MessyFolder, root: Path) -> None:
    """A symlink to a good image (followed: good), a looping folder link, two file links that
    point at each other, a dangling link, a FIFO named ``.png`` and a ``.txt`` file (never listed)."""
    target = sorted(name for name in result.good if "/digit_" in name)[0]
    link = os.path.join(os.path.dirname(target), "link_to_digit.png")
    os.symlink(os.path.basename(target), root / link)
    result.good.add(link)
    result.labels[link] = result.labels[target]
    result.sizes[link] = (16, 16)
    os.symlink("..", root / "9" / "loop")  # 9/loop/9/loop/... : a folder cycle
    os.symlink("ping.png", root / "9" / "pong.png")
    os.symlink("pong.png", root / "9" / "ping.png")
    os.symlink("does_not_exist.png", root / "9" / "dangling.png")
    os.mkfifo(root / "9" / "pipe.png")  # opening it would block forever
    (root / "9" / "notes.txt").write_text("camera settings")
    result.ignored |= {"9/loop", "9/pong.png", "9/ping.png", "9/dangling.png", "9/pipe.png", "9/notes.txt"}


def privilege_drop_prefix() -> list[str] | None:
    """A command prefix that runs a program as root *without* the right to read any file
    (``setpriv`` dropping CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH), so that a mode-000 file is
    really unreadable; ``[]`` when not root (nothing to drop); None when root and it cannot be done."""
    if os.geteuid() != 0:
        return []
    caps = "-dac_override,-dac_read_search"
    prefix = ["setpriv", "--bounding-set", caps, "--inh-caps", caps]
    try:
        done = subprocess.run(prefix + ["true"], capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return prefix if done.returncode == 0 else None


def restore_permissions(root: str | Path) -> None:
    """Make every file readable again (so pytest can clean the folder up as any user)."""
    for folder, _, files in os.walk(os.fsencode(root)):
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path) and os.path.isfile(path):
                os.chmod(path, 0o644)


# ---------------------------------------------------------------------------------------------
# Seeds for fuzzing: one small real image per format


def fuzz_seeds() -> dict[str, bytes]:
    """A real digit (24 px RGB) as PNG, JPEG, GIF, BMP, TIFF, WebP and PPM; plus a JPEG with EXIF
    orientation and a 16-bit PNG, so that mutations reach those code paths too."""
    image = _digit(7, size=24)[0]
    exif = image.getexif()
    exif[0x0112] = 8
    sixteen_bit = Image.fromarray(np.asarray(image.convert("L"), dtype=np.uint16) * 257)
    return {
        "png": _encode(image, "PNG"),
        "jpeg": _encode(image, "JPEG", quality=80),
        "jpeg_exif": _encode(image, "JPEG", quality=80, exif=exif.tobytes()),
        "gif": _encode(image.convert("P", palette=Image.Palette.ADAPTIVE, colors=8), "GIF"),
        "bmp": _encode(image.resize((8, 8)), "BMP"),
        "tiff": _encode(image, "TIFF"),
        "png16": _encode(sixteen_bit, "PNG"),
        "webp": _encode(image, "WEBP", lossless=True),
        "ppm": _encode(image.resize((8, 8)), "PPM"),
    }
