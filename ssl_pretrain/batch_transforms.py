"""The SimCLR augmentation on whole batches of tensors (kornia), for in-memory small images.

Per-image PIL work in data-loader processes is what limits SimCLR on small images: on a CPU the
workers compete with training for the same cores, on a GPU they cannot feed tens of thousands
of images a second. Here the images are decoded once into a uint8 tensor, and each batch is
cropped, flipped, jittered and grey-scaled in a few batched tensor operations, on the training
device. Same recipe and parameters as ``transforms.build_view_transform`` (lightly's
``SimCLRTransform``); kornia's ``ColorJitter`` follows torchvision's semantics.
"""

from __future__ import annotations

import math

import kornia.augmentation as K
import torch
from torch import nn

from ssl_pretrain.config import AugmentConfig


def build_batch_augment(cfg: AugmentConfig) -> nn.Module:
    """Float images in [0, 1] ``(B, 3, H, W)`` -> one normalised random view ``(B, 3, S, S)``."""
    strength = cfg.cj_strength
    steps: list[nn.Module] = [
        # "resample" warps the whole batch at once; kornia's default "slice" loops over images.
        K.RandomResizedCrop((cfg.input_size, cfg.input_size), scale=(cfg.min_scale, 1.0),
                            cropping_mode="resample"),
        K.RandomHorizontalFlip(p=cfg.hflip_prob),
        K.ColorJitter(0.8 * strength, 0.8 * strength, 0.8 * strength, 0.2 * strength, p=cfg.cj_prob),
        K.RandomGrayscale(p=cfg.gray_prob),
    ]
    if cfg.blur_prob > 0:
        # lightly: kernel about 10% of the image, sigma in (0.1, 2)
        kernel = 2 * math.floor(0.05 * cfg.input_size) + 1
        steps.append(K.RandomGaussianBlur((kernel, kernel), sigma=(0.1, 2.0), p=cfg.blur_prob))
    steps.append(K.Normalize(mean=torch.tensor(cfg.mean), std=torch.tensor(cfg.std)))
    return nn.Sequential(*steps)


def batch_views(images: torch.Tensor, augment: nn.Module, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independent views of a uint8 batch ``(B, H, W, 3)``, reproducible from ``seed``.

    kornia draws from torch's global generator; seeding it per batch makes a resumed run draw
    exactly what the uninterrupted run drew.
    """
    floats = images.permute(0, 3, 1, 2).float().div_(255)
    torch.manual_seed(seed)
    if floats.device.type == "cuda":
        torch.cuda.manual_seed(seed)
    return augment(floats), augment(floats)
