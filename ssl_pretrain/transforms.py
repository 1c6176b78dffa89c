"""Two augmented views of each image: the SimCLR recipe through ``lightly.transforms``."""

from __future__ import annotations

import torchvision.transforms as T
from lightly.transforms import SimCLRTransform

from ssl_pretrain.config import AugmentConfig


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


def build_eval_transform(input_size: int, mean, std) -> T.Compose:
    """Deterministic transform for embeddings: resize the short side, centre-crop, normalise.

    For images no larger than the input size (CIFAR at 32 px) the resize is a plain resize, so
    nothing is cropped away.
    """
    return T.Compose(
        [
            T.Resize(input_size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(input_size),
            T.ToTensor(),
            T.Normalize(mean=list(mean), std=list(std)),
        ]
    )
