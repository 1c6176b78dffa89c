"""Backbones by name: a registry mapping a name to a builder (timm-style).

A backbone maps images ``(B, 3, H, W)`` to features ``(B, feature_dim)``; the projection head is
kept apart (see ``ssl_pretrain.methods.simclr``), so the exported backbone is usable on its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torchvision
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer


@dataclass(frozen=True)
class BackboneSpec:
    builder: Callable[[bool, int], nn.Module]
    """``(small_stem, input_size) -> module``; only the ViTs use the input size (their patch grid)."""
    feature_dim: int
    description: str
    cpu_sized: bool = False
    """Small enough to pretrain on a few CPU cores (no "this is a GPU network" warning)."""
    patched: bool = False
    """A ViT: image sides must be multiples of its patch size (``vit_patch_size``)."""


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


class ViTBackbone(VisionTransformer):
    """torchvision's ``VisionTransformer`` without its classifier: images -> the class token after
    the final LayerNorm. Parameter names are torchvision's (``conv_proj``, ``class_token``,
    ``encoder.pos_embedding``, ``encoder.layers``, ``encoder.ln``), so masked-image methods can
    wrap it (lightly's ``MaskedVisionTransformerTorchvision``) and share its weights.

    Unlike torchvision's, it takes any image size that is a multiple of the patch size - DINO's
    local crops pass through the student, evaluation may use another size - by resampling the
    position embeddings of the patch grid (bicubic, antialiased when shrinking, as timm and
    lightly do); the class token's embedding is kept.

    Shape: ``(B, 3, H, W)`` -> ``(B, hidden_dim)``.
    """

    def __init__(self, image_size: int, patch_size: int, num_layers: int, num_heads: int, hidden_dim: int,
                 mlp_dim: int):
        if image_size % patch_size:
            raise ValueError(f"ViT input size {image_size} px is not a multiple of its patch size {patch_size} px")
        super().__init__(image_size, patch_size, num_layers, num_heads, hidden_dim, mlp_dim)
        self.heads = nn.Identity()

    def patch_grid(self, images: torch.Tensor) -> tuple[int, int]:
        """``(rows, columns)`` of patches; a clear error for sizes that do not tile."""
        height, width = images.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"ViT input {height}x{width} px is not a multiple of its patch size "
                             f"{self.patch_size} px (built for {self.image_size} px)")
        return height // self.patch_size, width // self.patch_size

    def position_embedding(self, rows: int, columns: int) -> torch.Tensor:
        """``(1, 1 + rows * columns, hidden_dim)``: the position embeddings, resampled to the grid."""
        embedding = self.encoder.pos_embedding
        side = self.image_size // self.patch_size
        if (rows, columns) == (side, side):
            return embedding
        grid = embedding[:, 1:].reshape(1, side, side, self.hidden_dim).permute(0, 3, 1, 2)
        grid = nn.functional.interpolate(grid, size=(rows, columns), mode="bicubic", align_corners=False,
                                         antialias=rows < side or columns < side)
        return torch.cat([embedding[:, :1], grid.permute(0, 2, 3, 1).reshape(1, rows * columns, -1)], dim=1)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Position embeddings of another square grid are adopted as they are, with the size they
        were learnt at: a backbone pretrained at 16 px stays a 16-px ViT (resampling for other
        sizes) inside a classifier described, and rebuilt, at 24 px."""
        saved = state_dict.get(prefix + "encoder.pos_embedding")
        own = self.encoder.pos_embedding
        if saved is not None and saved.dim() == 3 and saved.shape[0] == 1 and saved.shape[1:] != own.shape[1:]:
            side = math.isqrt(saved.shape[1] - 1)
            if side * side == saved.shape[1] - 1 and saved.shape[2] == own.shape[2]:
                self.encoder.pos_embedding = nn.Parameter(torch.empty_like(saved, device=own.device),
                                                          requires_grad=own.requires_grad)
                self.image_size, self.seq_length = side * self.patch_size, saved.shape[1]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        rows, columns = self.patch_grid(images)
        tokens = self.conv_proj(images).flatten(2).transpose(1, 2)  # (B, rows * columns, hidden_dim)
        # shape[0], not len(): len() fixes the batch size in an ONNX export
        tokens = torch.cat([self.class_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        tokens = tokens + self.position_embedding(rows, columns)
        encoder = self.encoder  # torchvision's Encoder.forward, without its fixed-length check
        return encoder.ln(encoder.layers(encoder.dropout(tokens)))[:, 0]


VIT_TINY = dict(num_layers=12, num_heads=3, hidden_dim=192, mlp_dim=768)
VIT_SMALL = dict(num_layers=12, num_heads=6, hidden_dim=384, mlp_dim=1536)
"""DeiT-Ti and DeiT-S (Touvron et al. 2021, Table 1): 12 blocks, 64-d heads, MLP 4x wide."""


def vit_patch_size(small_stem: bool) -> int:
    """4 px for small images (32 px -> an 8x8 grid, the usual CIFAR-size ViT), 16 px otherwise
    (224 px -> 14x14, ViT-B/16's grid): the ViT's counterpart of the ResNet's small stem."""
    return 4 if small_stem else 16


def vit_backbone(small_stem: bool, input_size: int, **shape: int) -> ViTBackbone:
    return ViTBackbone(input_size, vit_patch_size(small_stem), **shape)


BACKBONES: dict[str, BackboneSpec] = {
    "resnet18": BackboneSpec(lambda s, size: _torchvision_resnet("resnet18", s), 512, "torchvision ResNet-18"),
    "resnet34": BackboneSpec(lambda s, size: _torchvision_resnet("resnet34", s), 512, "torchvision ResNet-34"),
    "resnet50": BackboneSpec(lambda s, size: _torchvision_resnet("resnet50", s), 2048, "torchvision ResNet-50"),
    "smallconv": BackboneSpec(lambda s, size: SmallConvNet(s), 256, "8-layer CNN, fast on CPU", cpu_sized=True),
    "smallconv-s": BackboneSpec(lambda s, size: SmallConvNet(s, NARROW_WIDTHS), NARROW_WIDTHS[-1],
                                "smallconv at 3/4 width: faster in fp32 (the demo preset's fp32 variant)", cpu_sized=True),
    "smallconv-xs": BackboneSpec(lambda s, size: SmallConvNet(s, XNARROW_WIDTHS), XNARROW_WIDTHS[-1],
                                 "smallconv at 1/2 width: faster in fp32 (the CPU preset's fp32 variant)", cpu_sized=True),
    "smallconv-xsw": BackboneSpec(lambda s, size: SmallConvNet(s, XNARROW_WIDE_WIDTHS), XNARROW_WIDE_WIDTHS[-1],
                                  "smallconv-xs with a full-width last stage (256 features): slower; tried, not better", cpu_sized=True),
    "vit-tiny": BackboneSpec(lambda s, size: vit_backbone(s, size, **VIT_TINY), VIT_TINY["hidden_dim"],
                             "ViT-Ti/4 (small stem) or /16: DeiT-Tiny's transformer on torchvision's ViT", patched=True),
    "vit-small": BackboneSpec(lambda s, size: vit_backbone(s, size, **VIT_SMALL), VIT_SMALL["hidden_dim"],
                              "ViT-S/4 (small stem) or /16: DeiT-Small's transformer on torchvision's ViT", patched=True),
}


def resolve_small_stem(small_stem: bool | None, input_size: int) -> bool:
    """Default: the small-image stem for inputs of 64 px or less."""
    return input_size <= 64 if small_stem is None else bool(small_stem)


def input_multiple(name: str, small_stem: bool) -> int:
    """What every image side fed to backbone ``name`` must be a multiple of: 1 for the CNNs."""
    return vit_patch_size(small_stem) if BACKBONES[name].patched else 1


def build_backbone(name: str, small_stem: bool, input_size: Optional[int] = None) -> tuple[nn.Module, int]:
    """Build the backbone ``name`` with random weights, for images of ``input_size`` px (default
    32 with the small stem, else 224). The CNNs ignore it; a ViT sizes its position embeddings by
    it (other sizes still work, resampled) and needs it to be a multiple of its patch size.

    Returns:
        ``(module, feature_dim)``; the module maps ``(B, 3, H, W)`` to ``(B, feature_dim)``.

    Raises:
        ValueError: an unknown name (the message lists the known ones), or an input size a ViT's
            patches do not tile.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone '{name}' (available: {', '.join(sorted(BACKBONES))})")
    spec = BACKBONES[name]
    if input_size is None:
        input_size = 32 if small_stem else 224
    return spec.builder(small_stem, input_size), spec.feature_dim
