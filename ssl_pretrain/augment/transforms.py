"""Two augmented views of each image: the SimCLR recipe through ``lightly.transforms``."""

from __future__ import annotations

import numpy as np
import torch
import torchvision.transforms as T
from lightly.transforms import SimCLRTransform
from PIL import Image

from ssl_pretrain.data.resize import resize_and_crop
from ssl_pretrain.settings import AugmentConfig


def build_view_transform(cfg: AugmentConfig) -> SimCLRTransform:
    """The SimCLR augmentation (Chen et al. 2020, Appendix A): random resized crop, flip,
    colour jitter, grey-scale and (ImageNet recipe) Gaussian blur.

    Calling it on a PIL image returns a list of two tensors, each ``(3, input_size, input_size)``.
    """
    return SimCLRTransform(
        input_size=cfg.input_size,
        cj_prob=cfg.cj_prob,
        cj_strength=cfg.cj_strength,
        min_scale=cfg.min_scale,
        random_gray_scale=cfg.gray_prob,
        gaussian_blur=cfg.blur_prob,
        hf_prob=cfg.hflip_prob,
        normalize={"mean": list(cfg.mean), "std": list(cfg.std)},
    )


class ResizeAndCrop:
    """PIL image -> PIL image: the short side to ``size``, the centre ``size x size``
    (``ssl_pretrain.data.resize.resize_and_crop``, which the classifier's ``predict`` uses too)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image: Image.Image) -> Image.Image:
        return Image.fromarray(resize_and_crop(image, self.size))

    def __repr__(self) -> str:
        return f"ResizeAndCrop(size={self.size}, antialiased bicubic)"


class EvalTransform(T.Compose):
    """Resize the short side (antialiased bicubic), centre-crop, to tensor, normalise - as a torchvision
    ``Compose``, and split in two for batch pipelines:

    * ``to_uint8(image)``: the per-image part, ``(H, W, 3)`` uint8 (no resampling when the image
      already has the input size, as CIFAR at 32 px);
    * ``normalise(batch)``: ``(B, H, W, 3)`` uint8 -> ``(B, 3, H, W)`` float, on any device, in
      a few whole-batch operations instead of per-image ``ToTensor`` and ``Normalize``.

    ``normalise(stack(to_uint8(x)))`` equals ``stack(self(x))`` to float rounding.
    """

    def __init__(self, input_size: int, mean, std):
        self.input_size, self.mean, self.std = input_size, tuple(mean), tuple(std)
        self.geometry = ResizeAndCrop(input_size)
        super().__init__([self.geometry, T.ToTensor(), T.Normalize(mean=list(mean), std=list(std))])

    def to_uint8(self, image) -> torch.Tensor:
        return torch.from_numpy(np.array(resize_and_crop(image, self.input_size)))

    def normalise(self, batch: torch.Tensor) -> torch.Tensor:
        # channel-first uint8 copy (a quarter of the bytes), then one fused multiply-add:
        # (x / 255 - mean) / std == x * (1 / (255 std)) + (-mean / std)
        mean = torch.tensor(self.mean, dtype=torch.float64).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float64).view(1, 3, 1, 1)
        scale = (1.0 / (255.0 * std)).float().to(batch.device)
        shift = (-mean / std).float().to(batch.device)
        return torch.addcmul(shift, batch.permute(0, 3, 1, 2).contiguous().float(), scale)


def build_eval_transform(input_size: int, mean, std) -> EvalTransform:
    """Deterministic transform for embeddings: resize the short side, centre-crop, normalise.

    For images no larger than the input size (CIFAR at 32 px) the resize is a plain resize, so
    nothing is cropped away.
    """
    return EvalTransform(input_size, mean, std)
