"""The sections of a pretraining run's config, its constants and its error: the schema every
stage may read without pulling in the methods (``ssl_pretrain.config`` adds one section per method
and loads presets).

Every default lives here or in its method's file and names its source. Unknown or mistyped keys are
rejected with a one-line message that names the key (nanoGPT-style: fail loudly).
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ssl_pretrain.errors import SSLError
from ssl_pretrain.models.backbones import BACKBONES

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ConfigError(SSLError, ValueError):
    """A config that cannot be used; the message is one line and names the offending key."""


class Section(BaseModel):
    """A config section: unknown keys rejected, assignments validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
    source: Optional[str] = None
    """Folder (scanned recursively), text file of paths, ``builtin:digits[:train|:test]``,
    or a torchvision dataset on disk: ``cifar10:ROOT``, ``cifar100:ROOT``, ``stl10:ROOT``."""
    download: bool = False
    """Let torchvision download ``cifar10:``/``cifar100:``/``stl10:`` if missing (needs internet)."""
    pipeline: Literal["auto", "pil", "tensor"] = "auto"
    """``tensor``: decode every image once and augment whole batches on the training device (fast):
    small images of one size as they are, any others at the training size (shorter side 8/7 of
    ``augment.input_size``, at least 64 px, centre-cropped) into a cache file that later epochs
    and runs reuse (``ssl_pretrain.data.pixel_cache``; ``$SSL_PRETRAIN_CACHE/pixels``, else
    ``~/.cache/ssl-pretrain/pixels``). ``pil``: per-image lightly/PIL transforms in data-loader
    workers (streams from disk, decodes every epoch). ``auto``: tensor, or pil (with a warning)
    where the decoded images fit neither on the cache's disk nor in 2 GB of memory."""
    num_workers: int | Literal["auto"] = "auto"
    """Data loader processes; ``auto`` = one per core beyond the training thread, at most 8."""
    max_images: Optional[int] = Field(None, ge=1)
    """Use a fixed random subset of this many images (quick trials, tests); default: all."""
    max_image_pixels: int = 89_478_485
    """Images with more pixels are skipped as decompression bombs (Pillow's own limit)."""


class AugmentConfig(Section):
    """SimCLR augmentations (Chen et al. 2020, Appendix A) through ``lightly.transforms``.

    ``recipe`` picks the defaults; any field set explicitly wins over the recipe.
    cifar: crop scale 0.08-1, colour jitter strength 0.5, no blur (SimCLR Appendix B.9).
    imagenet: crop scale 0.08-1, colour jitter strength 1.0, blur with p=0.5 (SimCLR Appendix A).
    """

    recipe: Literal["cifar", "imagenet"] = "cifar"
    input_size: Optional[int] = None
    min_scale: float = 0.08
    cj_prob: float = 0.8
    cj_strength: Optional[float] = None
    gray_prob: float = 0.2
    blur_prob: Optional[float] = None
    hflip_prob: float = 0.5
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    local_views: int = Field(0, ge=0)
    """Multi-crop (SwAV, Caron et al. 2020, Sec. 3.2; DINO): this many small crops of every image on
    top of the two full-size views, for the methods that use them (dino: DINO uses 6-10; simclr). The
    batch pipeline makes them, from images of any size; with ``data.pipeline=pil`` they are turned
    off, with a warning."""
    local_size: Optional[int] = None
    """Side of the local crops; default 3/7 of ``input_size`` (DINO's 96 px of 224), at least 8."""
    local_scale: tuple[float, float] = (0.05, 0.4)
    """Area range of the local crops (DINO: 0.05-0.4; it then crops the global views at 0.4-1,
    ``min_scale: 0.4``)."""

    @model_validator(mode="after")
    def _fill_from_recipe(self) -> "AugmentConfig":
        recipe = {
            "cifar": {"input_size": 32, "cj_strength": 0.5, "blur_prob": 0.0},
            "imagenet": {"input_size": 224, "cj_strength": 1.0, "blur_prob": 0.5},
        }[self.recipe]
        for key, value in recipe.items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, value)
        if self.local_size is None:
            object.__setattr__(self, "local_size", max(8, round(self.input_size * 3 / 7)))
        if not 0 < self.local_scale[0] <= self.local_scale[1] <= 1:
            raise ValueError(f"local_scale must be 0 < low <= high <= 1, got {self.local_scale}")
        return self


class ModelConfig(Section):
    backbone: str = "resnet18"
    """A name from ``ssl_pretrain.models.backbones.BACKBONES`` (``ssl-pretrain --list-backbones``)."""
    small_stem: Optional[bool] = None
    """ResNet stem for small images (3x3 conv, no max-pool). Default: on for inputs <= 64 px."""
    init: Optional[str] = None
    """Start the backbone from these weights (``--init``): a torchvision/timm state dict (``.pth``,
    loaded with ``weights_only=True``), a ``.safetensors`` file or one of our runs; the head starts
    fresh. ``ssl_pretrain.models.warm_start``. With a warm start, a lower ``optim.lr`` usually suits."""

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, name: str) -> str:
        if name not in BACKBONES:
            raise ValueError(f"unknown backbone; available: {', '.join(sorted(BACKBONES))}")
        return name


class OptimConfig(Section):
    name: Literal["sgd", "lars", "adamw"] = "sgd"
    """``sgd`` (lightly's CIFAR-10 benchmarks), ``lars`` (SimCLR, BYOL, Barlow Twins on ImageNet) or
    ``adamw`` (DINO, MAE; ``momentum`` is then unused, ``betas`` apply)."""
    lr: float = Field(0.12, gt=0)
    """Base learning rate for a batch of 256; scaled by ``lr_scaling``. 0.12 x bs/256 with SGD is
    lightly's CIFAR-10 benchmark (its scripts: ``6e-2 * batch_size / 128``); SimCLR uses LARS with 0.3 x bs/256 on ImageNet."""
    lr_scaling: Literal["linear", "sqrt", "none"] = "linear"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    """5e-4 for CIFAR with SGD (lightly benchmark); SimCLR uses 1e-6 with LARS on ImageNet.
    Never applied to norm layers and biases."""
    weight_decay_end: Optional[float] = Field(None, ge=0)
    """Cosine schedule of the weight decay from ``weight_decay`` to this value over training (DINO:
    0.04 -> 0.4); default: constant."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW's moment decay rates (DINO and MAE: 0.9, 0.999 and 0.9, 0.95)."""
    warmup_epochs: float = 10
    """Linear warm-up, then cosine decay to zero (SimCLR: 10 epochs of warm-up)."""
    grad_clip: Optional[float] = None
    """Clip the gradient's global norm to this value; off by default."""


class TrainConfig(Section):
    epochs: int = Field(100, ge=1)
    """Number of epochs; with ``time_budget_minutes``, the most epochs to run."""
    time_budget_minutes: Optional[float] = Field(None, gt=0)
    """Train for this wall-clock time, counted from the start of the run (data decoding
    included): the cosine learning-rate decay ends at the budget and the run stops there, mid-epoch
    if need be, with a checkpoint and the exported backbone. A host that runs slower trains fewer
    steps instead of overrunning. ``train.epochs`` still caps the run (the decay then ends at
    whichever comes first). The steps taken depend on the machine's speed, so two budgeted runs
    are not step-for-step identical; a resumed run continues the clock from its checkpoint."""
    batch_size: int = Field(256, ge=2)
    seed: int = 0
    device: str = "auto"
    """``auto`` (CUDA, then MPS, then CPU), or any torch device string."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """``auto``: bf16 autocast where the hardware runs bf16 natively - CUDA from compute
    capability 8, CPUs with AMX or AVX512-BF16 (faster than fp32 there) - and fp32 elsewhere,
    where bf16 is emulated and much slower (``ssl_pretrain.engine.hardware``; BENCHMARKS.md,
    "Pretraining throughput"). A forced ``bf16`` on such a CPU runs with a warning."""
    channels_last: Optional[bool] = None
    """Default: on for CUDA and CPU (oneDNN's convolutions train faster channels-last; BENCHMARKS.md,
    "Pretraining throughput"), off for MPS."""
    compile: bool = False
    """``torch.compile`` the model (GPU; slow to start)."""
    sync_batchnorm: bool = False
    """Distributed runs: BatchNorm statistics over the global batch instead of each rank's share
    (torch's SyncBatchNorm on GPUs, an all-reduce BatchNorm on CPUs). Worth it when the batch
    per GPU is small; each BatchNorm layer then costs a collective."""
    checkpoint_every_steps: int = Field(0, ge=0)
    """Also write ``checkpoints/last.pt`` every N steps (0: only at the end of each epoch)."""
    keep_every_epochs: int = Field(0, ge=0)
    """Keep a copy ``checkpoints/epoch-NNNN.pt`` every N epochs (0: keep only the last)."""
    log_every_steps: int = Field(10, ge=1)
    tensorboard: bool = False
    threads: Optional[int] = None
    """torch intra-op threads; default leaves torch's choice."""
    keep_freed_memory: bool = True
    """CPU runs on Linux: let glibc's heap keep freed blocks for reuse instead of mapping fresh
    pages for every multi-megabyte tensor (``ssl_pretrain.engine.allocator``: faster steps and
    augmentation, BENCHMARKS.md "Pretraining throughput"; the process keeps its peak memory, "Memory")."""


class MonitorConfig(Section):
    """Online kNN monitor: kNN top-1 of the backbone's features on labelled data."""

    train: Optional[str] = None
    """Labelled source for the kNN memory (image-folder layout or ``builtin:digits:train``)."""
    val: Optional[str] = None
    """Labelled source to classify (image-folder layout or ``builtin:digits:test``)."""
    every_epochs: int = Field(1, ge=1)
    k: int = Field(200, ge=1)
    temperature: float = Field(0.1, gt=0)
    """k=200, T=0.1: the InstDisc protocol used by lightly's benchmarks."""

