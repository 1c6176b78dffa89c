"""What a run is given, looked at before it trains: the images (a sample of their headers), the
machine it runs on (and how fast it trains a network), and the ``--init`` weights, if any. ``ssl_pretrain.recipe`` turns these
answers into settings; nothing here chooses anything.

The images are judged from a seeded sample of at most ``SAMPLE_FILES`` files, read header-only
(Pillow opens a file lazily: size, mode and format come from the header), so a survey of a folder
of large photos takes about a second; only a few files are decoded, to tell grey pictures saved as
RGB from colour ones.
"""

from __future__ import annotations

import math
import os
import stat
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from PIL import Image

from ssl_pretrain.checkpoint import CheckpointError, read_backbone_file, resolve_backbone_path
from ssl_pretrain.data.images import DEFAULT_MAX_PIXELS, DataError, UnreadableImage, load_image
from ssl_pretrain.data.sources import ArraySource, FileSource, open_source
from ssl_pretrain.engine import hardware
from ssl_pretrain.engine.devices import resolve_device, usable_cores
from ssl_pretrain.models.backbones import BACKBONES, build_backbone, resolve_small_stem
from ssl_pretrain.models.warm_start import TORCHVISION_PREFIX, parse_torchvision_name, read_state_dict

SAMPLE_FILES = 300
"""Files whose headers are read (a seeded random sample; all of them in a smaller set)."""
SAMPLE_DECODED = 64
"""Images sampled from sources without headers to read (tar shards): each is decoded whole."""
GREY_CHECK_FILES = 16
"""Colour-mode files decoded (at reduced size) to see whether their pixels are grey all the same."""
GREY_TOLERANCE = 2
"""Largest channel difference (of 255) still counted as grey: JPEG's chroma rounding."""
GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
"""Pillow modes that hold one channel of intensity."""


@dataclass
class DataSurvey:
    """What a sample of the images looks like."""

    source: str
    count: int
    """Images in the source (files found; unreadable ones included)."""
    sampled: int
    unreadable: int
    """Sampled files that could not be opened as an image."""
    short_side: tuple[int, int, int]
    """10th percentile, median and 90th percentile of the shorter side, in pixels."""
    long_side: int
    """Median of the longer side, in pixels."""
    one_size: Optional[tuple[int, int]]
    """``(width, height)`` when every sampled image has it, else None."""
    grey: bool
    """Every sampled image is grey (one channel, or R = G = B)."""
    formats: dict[str, int]
    """File format (or ``array`` for images held in memory) -> sampled images."""
    in_memory: bool
    """The source is an array in memory (``builtin:digits``, ``cifar10:ROOT``): no decoding cost."""

    def summary(self) -> str:
        low, median, high = self.short_side
        size = f"{self.one_size[0]}x{self.one_size[1]} px" if self.one_size else \
            f"shorter side {median} px (10-90%: {low}-{high} px)"
        formats = ", ".join(f"{name} {count}" for name, count in sorted(self.formats.items(), key=lambda kv: -kv[1]))
        unreadable = f", {self.unreadable} unreadable" if self.unreadable else ""
        return (f"{self.count:,} images; {self.sampled} sampled{unreadable}: {size}, "
                f"{'grey' if self.grey else 'colour'}, {formats}")


@dataclass
class MachineSurvey:
    """Where the run computes."""

    device: str
    """``cpu``, ``cuda`` or ``mps`` (the type of the device ``train.device`` resolves to)."""
    fast_bf16: bool
    """bf16 autocast runs natively and faster here (``ssl_pretrain.engine.hardware``)."""
    cores: int
    name: str

    def summary(self) -> str:
        precision = "fast bf16" if self.fast_bf16 else "fp32 (no fast bf16)"
        return f"{self.device} ({self.name}), {precision}, {self.cores} cores"


@dataclass
class InitSurvey:
    """What the ``--init`` weights fit."""

    path: str
    architecture: Optional[str]
    """The backbone the weights fit, None when none of ours does."""
    small_stem: Optional[bool]
    """The stem they were trained with (None: both fit, e.g. a smallconv's stride is no weight)."""
    input_size: Optional[int]
    """The size they were trained at, when the file says (our own runs)."""

    def summary(self) -> str:
        if self.architecture is None:
            return f"{self.path}: fits none of our backbones"
        stem = {True: ", small-image stem", False: ", ImageNet stem (7x7/2 conv + max-pool)", None: ""}[self.small_stem]
        size = f", trained at {self.input_size} px" if self.input_size else ""
        return f"{self.path}: a {self.architecture}{stem}{size}"


def as_dict(*surveys: Any) -> dict[str, Any]:
    """The surveys as one JSON-ready dict (``data``, ``machine``, ``init``)."""
    names = {DataSurvey: "data", MachineSurvey: "machine", InitSurvey: "init"}
    return {names[type(survey)]: asdict(survey) for survey in surveys if survey is not None}


# ---------------------------------------------------------------------------------------------
# The images


def survey_data(spec: str, sample: int = SAMPLE_FILES, seed: int = 0, download: bool = False,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> DataSurvey:
    """Open ``spec`` as training would (``open_source``) and look at a sample of its images.

    Raises:
        DataError: the source is missing or empty (``open_source``'s errors), or none of the sampled
            files can be read as an image (one line).
    """
    source = open_source(spec, download=download, max_pixels=max_pixels)
    if isinstance(source, ArraySource):
        return _survey_array(spec, source, sample, seed)
    indices = _sample(len(source), sample if isinstance(source, FileSource) else min(sample, SAMPLE_DECODED), seed)
    headers, reasons = [], []
    for index in indices:
        try:
            headers.append((index, *_header(source, index, max_pixels)))
        except UnreadableImage as error:
            reasons.append(f"{source.name(index)}: {error}")
    if not headers:
        raise DataError(f"none of the {len(indices)} sampled files of {spec} could be read as an image "
                        f"(first: {reasons[0]})")
    sizes = [(width, height) for _, width, height, _, _ in headers]
    grey = all(mode in GREY_MODES for *_, mode, _ in headers) or _pixels_grey(source, headers, max_pixels)
    formats = Counter(image_format for *_, image_format in headers)
    return _summarise(spec, len(source), len(indices), len(reasons), sizes, grey, dict(formats), False)


def _sample(count: int, sample: int, seed: int) -> list[int]:
    if count <= sample:
        return list(range(count))
    return sorted(int(index) for index in np.random.default_rng(seed).choice(count, size=sample, replace=False))


def _header(source, index: int, max_pixels: int) -> tuple[int, int, str, str]:
    """``(width, height, mode, format)`` of one image: from the file's header where the source is
    files on disk, else from the decoded image (tar shards, path lists of other kinds)."""
    if not isinstance(source, FileSource):
        image = source.load(index)  # RGB already: the grey check then looks at its pixels
        return image.size[0], image.size[1], image.mode, "decoded"
    path = source.paths[index]
    try:
        status = os.stat(path)
        if not stat.S_ISREG(status.st_mode) or status.st_size == 0:
            raise UnreadableImage("not a regular file, or empty")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's bomb warning: the size is checked below
            with Image.open(path) as image:
                width, height, mode, image_format = *image.size, image.mode, image.format or "unknown"
    except UnreadableImage:
        raise
    except Exception as error:  # noqa: BLE001 - any file Pillow cannot identify counts as unreadable
        raise UnreadableImage(f"{type(error).__name__}: {error}") from None
    if width < 1 or height < 1 or width * height > max_pixels:
        raise UnreadableImage(f"{width}x{height} px")
    return width, height, mode, image_format


def _pixels_grey(source, headers: list[tuple], max_pixels: int) -> bool:
    """Whether the colour-mode images of the sample hold grey pixels all the same (scans and
    X-rays are often saved as RGB): a few are decoded, JPEGs at reduced size."""
    coloured = [index for index, _, _, mode, _ in headers if mode not in GREY_MODES][:GREY_CHECK_FILES]
    for index in coloured:
        try:
            if isinstance(source, FileSource):
                image = load_image(source.paths[index], max_pixels, min_side=32)
            else:
                image = source.load(index)
        except UnreadableImage:
            continue
        pixels = np.asarray(image, dtype=np.int16)
        if pixels.ndim == 3 and np.abs(pixels - pixels[..., :1]).max() > GREY_TOLERANCE:
            return False
    return True


def _survey_array(spec: str, source: ArraySource, sample: int, seed: int) -> DataSurvey:
    images = source.images
    height, width = images.shape[1:3]
    picked = images[_sample(len(images), sample, seed)]
    grey = picked.ndim == 3 or bool((np.abs(picked.astype(np.int16) - picked[..., :1]) <= GREY_TOLERANCE).all())
    return _summarise(spec, len(images), len(picked), 0, [(width, height)] * len(picked), grey,
                      {"array": len(picked)}, True)


def _summarise(spec: str, count: int, sampled: int, unreadable: int, sizes: list[tuple[int, int]], grey: bool,
               formats: dict[str, int], in_memory: bool) -> DataSurvey:
    short = np.array([min(size) for size in sizes])
    long = np.array([max(size) for size in sizes])
    low, median, high = (int(round(value)) for value in np.percentile(short, [10, 50, 90]))
    one_size = sizes[0] if len(set(sizes)) == 1 else None
    return DataSurvey(spec, count, sampled, unreadable, (low, median, high), int(round(float(np.median(long)))),
                      one_size, grey, formats, in_memory)


# ---------------------------------------------------------------------------------------------
# The machine


def survey_machine(device_setting: str = "auto", probe: Optional[Callable[[], dict[str, float]]] = None,
                   workload: str = "") -> MachineSurvey:
    """The device ``train.device`` names, whether bf16 is fast there, and the usable cores.

    ``probe`` and ``workload``: where only a timing can tell (a CPU with AVX512-BF16 but no AMX),
    the network to time in both precisions (``hardware.fast_bf16``; the answer is cached per
    machine and workload); without one such a CPU counts as fp32 unless an answer is cached.

    Raises:
        ConfigError: not a device, or a GPU this torch cannot see (``resolve_device``'s one line).
    """
    device = resolve_device(device_setting)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        hardware.cpu_name() if device.type == "cpu" else device.type
    fast = hardware.fast_bf16(str(device), probe, workload)
    return MachineSurvey(device.type, fast, usable_cores(), name)


def measure_images_per_second(cfg, machine: MachineSurvey, batch: int = 16, steps: int = 3) -> float:
    """Images/s of forward and backward through ``cfg``'s backbone (a ``Config``) at its input
    size, each image counting its two views and its multi-crop views by their pixels: a forecast
    before the run (the run's own, after 20 steps, is the precise one). A second or two: the
    fastest of ``steps`` timed steps after an untimed one, as other processes may share the cores.
    The random state is left as it was."""
    device = torch.device("cuda" if machine.device == "cuda" else "cpu")
    small_stem = resolve_small_stem(cfg.model.small_stem, cfg.augment.input_size)
    views = 2 + cfg.augment.local_views * (cfg.augment.local_size / cfg.augment.input_size) ** 2
    dtype = torch.bfloat16 if machine.fast_bf16 else None
    fastest = math.inf
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        network, _ = build_backbone(cfg.model.backbone, small_stem, cfg.augment.input_size)
        memory_format = torch.channels_last if cfg.train.channels_last is not False else torch.contiguous_format
        network = network.to(device, memory_format=memory_format).train()  # as the run: channels-last by default
        images = torch.randn(batch, 3, cfg.augment.input_size, cfg.augment.input_size, device=device)
        images = images.contiguous(memory_format=memory_format)
        for index in range(steps + 1):
            started = time.perf_counter()
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                network(images).float().square().mean().backward()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if index:
                fastest = min(fastest, time.perf_counter() - started)
    return batch / fastest / views


# ---------------------------------------------------------------------------------------------
# The --init weights


def survey_init(path: str) -> InitSurvey:
    """Which of our backbones (and which stem) the weights at ``path`` fit: our own runs say so
    in their metadata; a foreign state dict (torchvision, timm) is matched by its tensors' names
    and shapes against each CNN, built on the ``meta`` device (no memory, no time).

    Raises:
        CheckpointError: the file cannot be read (``read_state_dict``'s one-line errors).
    """
    if str(path).startswith(TORCHVISION_PREFIX):
        model, _ = parse_torchvision_name(str(path))
        return InitSurvey(str(path), model if model in BACKBONES else None, False, None)
    ours = _our_backbone(path)
    if ours is not None:
        return ours
    tensors = read_state_dict(path)
    shapes = {key: tuple(value.shape) for key, value in tensors.items()}
    fits = []  # (tensors matched, name, small stem)
    for name, spec in BACKBONES.items():
        if spec.patched:
            continue  # a ViT's position embeddings depend on the input size; matched by load time
        for small_stem in (True, False):
            with torch.device("meta"):
                own = {key: tuple(value.shape) for key, value in spec.builder(small_stem, 224).state_dict().items()}
            common = [key for key in own if key in shapes]
            if common and all(own[key] == shapes[key] for key in common):
                fits.append((len(common) / len(own), len(common), name, small_stem))
    if not fits:
        return InitSurvey(str(path), None, None, None)
    best = max(fits, key=lambda fit: fit[:2])
    stems = {fit[3] for fit in fits if fit[:3] == best[:3]}
    return InitSurvey(str(path), best[2], best[3] if len(stems) == 1 else None, None)


def _our_backbone(path: str) -> Optional[InitSurvey]:
    """An export or run of ours, read from its metadata; None for anything else."""
    candidate = Path(path)
    if not (candidate.is_dir() or candidate.suffix == ".safetensors"):
        return None
    try:
        _, info = read_backbone_file(resolve_backbone_path(candidate))
    except CheckpointError:
        return None  # a foreign .safetensors: matched by its tensors
    return InitSurvey(str(path), info.architecture, info.small_stem, info.input_size)
