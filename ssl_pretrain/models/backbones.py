"""Backbones by name: a registry mapping a name to a builder (timm-style).

A backbone maps images ``(B, 3, H, W)`` to features ``(B, feature_dim)``; the projection head is
kept apart (see ``ssl_pretrain.methods.simclr``), so the exported backbone is usable on its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torchvision
from torch import nn


@dataclass(frozen=True)
class BackboneSpec:
    builder: Callable[[bool], nn.Module]
    feature_dim: int
    description: str
    cpu_sized: bool = False
    """Small enough to pretrain on a few CPU cores (no "this is a GPU network" warning)."""


def _torchvision_resnet(name: str, small_stem: bool) -> nn.Module:
    """A torchvision ResNet without its classifier; ``small_stem`` swaps the 7x7/2 conv and the
    max-pool for a 3x3/1 conv (the CIFAR variant of SimCLR, Appendix B.9), which matters for
    inputs of 64 px or less: the ImageNet stem would shrink 32 px to 8 px before the first block."""
    model = getattr(torchvision.models, name)(weights=None)
    if small_stem:
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    model.fc = nn.Identity()
    return model


def _conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    ]


class SmallConvNet(nn.Module):
    """A VGG-style 8-layer CNN (~1.2 M parameters) for small images on a few CPU cores.

    Widths 32-64-128-256, one stride-2 conv per stage: about 70 M multiply-adds per 32 px image,
    8x fewer than a small-stem ResNet-18, so a CPU can run real SimCLR epochs on CIFAR-size data.
    """

    def __init__(self, small_stem: bool = True, widths: tuple[int, ...] = (32, 64, 128, 256)):
        super().__init__()
        layers: list[nn.Module] = _conv_bn_relu(3, widths[0], stride=1 if small_stem else 2)
        c_in = widths[0]
        for stage, width in enumerate(widths):
            layers += _conv_bn_relu(c_in, width, stride=1 if stage == 0 else 2)
            layers += _conv_bn_relu(width, width)
            c_in = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.pool(self.features(images)).flatten(1)


NARROW_WIDTHS = (24, 48, 96, 192)
XNARROW_WIDTHS = (16, 32, 64, 128)
XNARROW_WIDE_WIDTHS = (16, 32, 64, 256)

BACKBONES: dict[str, BackboneSpec] = {
    "resnet18": BackboneSpec(lambda s: _torchvision_resnet("resnet18", s), 512, "torchvision ResNet-18"),
    "resnet34": BackboneSpec(lambda s: _torchvision_resnet("resnet34", s), 512, "torchvision ResNet-34"),
    "resnet50": BackboneSpec(lambda s: _torchvision_resnet("resnet50", s), 2048, "torchvision ResNet-50"),
    "smallconv": BackboneSpec(lambda s: SmallConvNet(s), 256, "8-layer CNN, fast on CPU", cpu_sized=True),
    "smallconv-s": BackboneSpec(lambda s: SmallConvNet(s, NARROW_WIDTHS), NARROW_WIDTHS[-1],
                                "smallconv at 3/4 width: about 1.5x its fp32 speed on AVX2", cpu_sized=True),
    "smallconv-xs": BackboneSpec(lambda s: SmallConvNet(s, XNARROW_WIDTHS), XNARROW_WIDTHS[-1],
                                 "smallconv at 1/2 width: about 3x its fp32 speed on AVX2", cpu_sized=True),
    "smallconv-xsw": BackboneSpec(lambda s: SmallConvNet(s, XNARROW_WIDE_WIDTHS), XNARROW_WIDE_WIDTHS[-1],
                                  "smallconv-xs with a full-width last stage (256 features): 0.70x its speed; tried, not better", cpu_sized=True),
}


def resolve_small_stem(small_stem: bool | None, input_size: int) -> bool:
    """Default: the small-image stem for inputs of 64 px or less."""
    return input_size <= 64 if small_stem is None else bool(small_stem)


def build_backbone(name: str, small_stem: bool) -> tuple[nn.Module, int]:
    """Build the backbone ``name`` with random weights.

    Returns:
        ``(module, feature_dim)``; the module maps ``(B, 3, H, W)`` to ``(B, feature_dim)``.

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone '{name}' (available: {', '.join(sorted(BACKBONES))})")
    spec = BACKBONES[name]
    return spec.builder(small_stem), spec.feature_dim
