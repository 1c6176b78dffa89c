"""The SimCLR augmentation on whole batches of tensors, for in-memory small images.

Per-image PIL work in data-loader processes is what limits SimCLR on small images: on a CPU the
workers compete with training for the same cores, on a GPU they cannot feed tens of thousands
of images a second. Here the images are decoded once into a uint8 tensor, and each batch is
cropped, flipped, jittered and grey-scaled in a few batched tensor operations, on the training
device. Same recipe and parameters as ``transforms.build_view_transform`` (lightly's
``SimCLRTransform``); crop, jitter and grey-scale (ours, below) follow torchvision's semantics;
kornia provides the Gaussian blur of the ImageNet recipe.
"""

from __future__ import annotations

import math

import kornia.augmentation as K
import torch
from torch import nn

from ssl_pretrain.settings import AugmentConfig


GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale


def _gray(images: torch.Tensor) -> torch.Tensor:
    """Luma ``(B, 1, H, W)`` with torchvision's weights."""
    r, g, b = images.unbind(dim=1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _shift_hue(images: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """torchvision's ``adjust_hue`` per image (shift in turns, ``(B,)``), fused: RGB -> hue ->
    shifted RGB without materialising HSV.

    Hue in sixths of a turn is ``(next - next2) / chroma + 2 * argmax`` (channels after the largest,
    cyclically; ties go to R, then G, as in torchvision); value and saturation are unchanged, so
    channel ``n`` of (R, G, B) = (5, 3, 1) comes back as ``max - chroma * clamp(min(k, 4 - k), 0, 1)``
    with ``k = (n + hue6) mod 6``. Written for a CPU: the three-channel part runs in place (fresh
    multi-megabyte results cost page faults), no ``torch.remainder`` or ``where`` on three channels
    (both slow there).
    """
    r, g, b = images[:, 0:1], images[:, 1:2], images[:, 2:3]
    maxc = torch.maximum(torch.maximum(r, g), b)
    chroma = maxc - torch.minimum(torch.minimum(r, g), b)
    # chroma 0: every difference below is 0 too, so the hue is 0 before the shift, as torchvision's
    scale = chroma.clamp_min(1e-12).reciprocal_()
    hue6 = torch.where(maxc == r, (g - b).mul_(scale),
                       torch.where(maxc == g, (b - r).mul_(scale).add_(2.0), (r - g).mul_(scale).add_(4.0)))
    hue6.add_(6.0 * turns.view(-1, 1, 1, 1))
    offsets = torch.tensor([5.0, 3.0, 1.0], device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    k = hue6 + offsets
    k.sub_(torch.floor_(k * (1.0 / 6.0)).mul_(6.0))  # mod 6; torch.remainder is slow on CPUs
    # clamp(min(k, 4 - k), 0, 1) == clamp(2 - |k - 2|, 0, 1) on [0, 6), in place
    k.sub_(2.0).abs_().neg_().add_(2.0).clamp_(0.0, 1.0)
    return k.mul_(chroma).neg_().add_(maxc)


class BatchColorJitter(nn.Module):
    """Colour jitter with per-image factors, torchvision's semantics, in whole-batch operations.

    Each image is jittered with probability ``p``: brightness, contrast and saturation factors
    drawn from ``[1 - x, 1 + x]`` and a hue shift from ``[-hue, hue]`` (turns), applied in a random
    order (one order per batch, as kornia's ``ColorJitter``), clamped to [0, 1] after each step.
    Same distribution as kornia's ``ColorJitter`` (and torchvision's), but the hue step is a few
    fused element-wise operations (``_shift_hue``) instead of kornia's HSV round trip, which was
    most of the augmentation's time on a CPU.
    """

    def __init__(self, brightness: float, contrast: float, saturation: float, hue: float, p: float = 1.0,
                 grey: bool = False):
        super().__init__()
        self.brightness, self.contrast, self.saturation, self.hue, self.p = brightness, contrast, saturation, hue, p
        self.grey = grey  # grey images: saturation and hue leave them as they are, so those steps are skipped

    def draw(self, batch: int, device) -> dict[str, torch.Tensor]:
        """Per-image factors (neutral for images left alone) and the order of the four steps."""
        applied = torch.rand(batch, device=device) < self.p

        def factors(spread: float, centre: float) -> torch.Tensor:
            drawn = centre + spread * (2 * torch.rand(batch, device=device) - 1)
            return torch.where(applied, drawn, torch.full_like(drawn, centre))

        return {"brightness": factors(self.brightness, 1.0), "contrast": factors(self.contrast, 1.0),
                "saturation": factors(self.saturation, 1.0), "hue": factors(self.hue, 0.0),
                "order": torch.randperm(4)}

    def apply(self, images: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        images = images.clamp(0.0, 1.0)  # a new tensor: the steps below work in place on it
        for step in params["order"].tolist():
            if step == 0 and self.brightness > 0:
                images.mul_(params["brightness"].view(-1, 1, 1, 1))
            elif step == 1 and self.contrast > 0:
                mean = _gray(images).mean(dim=(1, 2, 3), keepdim=True)
                factor = params["contrast"].view(-1, 1, 1, 1)
                images.mul_(factor).add_((1 - factor) * mean)
            elif step == 2 and self.saturation > 0 and not self.grey:
                factor = params["saturation"].view(-1, 1, 1, 1)
                gray = (1 - factor) * _gray(images)  # before images changes in place
                images.mul_(factor).add_(gray)
            elif step == 3 and self.hue > 0 and not self.grey:
                images = _shift_hue(images, params["hue"])
            images.clamp_(0.0, 1.0)
        return images

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.apply(images, self.draw(len(images), images.device))


class BatchResizedCropFlip(nn.Module):
    """Random resized crop (torchvision's box sampling) and horizontal flip, in one resampling.

    Per image: 10 candidate boxes of area ``scale`` x the image and aspect ratio log-uniform in
    ``ratio``; the first that fits wins, else the whole image's centre crop at the nearest allowed
    ratio (torchvision's ``RandomResizedCrop.get_params``); a uniform position; then the box is
    resampled to ``size`` x ``size`` with bilinear interpolation, mirrored with probability
    ``flip_prob`` - one ``affine_grid`` + ``grid_sample`` for the whole batch, crop and flip folded
    into one affine map: much faster on a CPU than kornia's crop followed by its flip (BENCHMARKS.md,
    "Pretraining throughput").
    """

    def __init__(self, size: int, scale: tuple[float, float], ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 flip_prob: float = 0.5):
        super().__init__()
        self.size, self.scale, self.ratio, self.flip_prob = size, scale, ratio, flip_prob

    def draw(self, batch: int, height: int, width: int, device) -> dict[str, torch.Tensor]:
        """Boxes ``(x0, y0, w, h)`` in pixels and flips, one per image."""
        area = height * width * (self.scale[0] + (self.scale[1] - self.scale[0]) * torch.rand(batch, 10, device=device))
        log_ratio = math.log(self.ratio[0]) + (math.log(self.ratio[1]) - math.log(self.ratio[0])) * torch.rand(
            batch, 10, device=device)
        w = torch.sqrt(area * torch.exp(log_ratio)).round()
        h = torch.sqrt(area / torch.exp(log_ratio)).round()
        fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        first = torch.where(fits.any(dim=1), fits.float().argmax(dim=1), torch.zeros_like(fits[:, 0], dtype=torch.long))
        rows = torch.arange(batch, device=device)
        w, h, found = w[rows, first], h[rows, first], fits.any(dim=1)
        # torchvision's fallback: the whole image, cropped to the nearest allowed aspect ratio
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            fallback_w, fallback_h = width, round(width / self.ratio[0])
        elif in_ratio > self.ratio[1]:
            fallback_w, fallback_h = round(height * self.ratio[1]), height
        else:
            fallback_w, fallback_h = width, height
        w = torch.where(found, w, torch.full_like(w, fallback_w))
        h = torch.where(found, h, torch.full_like(h, fallback_h))
        x0 = torch.floor(torch.rand(batch, device=device) * (width - w + 1))
        y0 = torch.floor(torch.rand(batch, device=device) * (height - h + 1))
        x0 = torch.where(found, x0, (width - w) // 2)
        y0 = torch.where(found, y0, (height - h) // 2)
        flip = torch.rand(batch, device=device) < self.flip_prob
        return {"boxes": torch.stack((x0, y0, w, h), dim=1), "flip": flip}

    def apply(self, images: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        batch, _, height, width = images.shape
        x0, y0, w, h = params["boxes"].to(images.dtype).unbind(dim=1)
        sign = 1.0 - 2.0 * params["flip"].to(images.dtype)
        theta = torch.zeros(batch, 2, 3, dtype=images.dtype, device=images.device)
        theta[:, 0, 0] = sign * w / width  # normalised coordinates, align_corners=False
        theta[:, 0, 2] = (2 * x0 + w) / width - 1
        theta[:, 1, 1] = h / height
        theta[:, 1, 2] = (2 * y0 + h) / height - 1
        grid = torch.nn.functional.affine_grid(theta, [batch, 3, self.size, self.size], align_corners=False)
        return torch.nn.functional.grid_sample(images, grid, mode="bilinear", padding_mode="border",
                                               align_corners=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.apply(images, self.draw(len(images), images.shape[2], images.shape[3], images.device))


class BatchGrayscale(nn.Module):
    """Random grey-scale with torchvision's weights (``RandomGrayscale``): each image, with
    probability ``p``, becomes its luma in all three channels. One ``where`` for the batch (kornia's
    ``RandomGrayscale`` costs more in per-call bookkeeping than the arithmetic)."""

    def __init__(self, p: float, grey: bool = False):
        super().__init__()
        self.p, self.grey = p, grey

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.p <= 0:
            return images
        chosen = torch.rand(len(images), device=images.device) < self.p
        if self.grey:  # already grey: drawn all the same, so the random stream is what it would be
            return images
        return torch.where(chosen.view(-1, 1, 1, 1), _gray(images).expand_as(images), images)


class BatchNormalize(nn.Module):
    """``(images - mean) / std`` per channel, as one fused multiply-add."""

    def __init__(self, mean, std):
        super().__init__()
        std = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        mean = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.register_buffer("scale", 1.0 / std, persistent=False)
        self.register_buffer("shift", -mean / std, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.shift.to(images.dtype), images, self.scale.to(images.dtype))


def is_grey(images) -> bool:
    """Are all these ``(N, H, W, 3)`` images grey (R = G = B)? Scans, X-rays, digits are."""
    return bool((images[..., 0] == images[..., 1]).all() and (images[..., 1] == images[..., 2]).all())


def build_batch_augment(cfg: AugmentConfig, local: bool = False, grey: bool = False) -> nn.Module:
    """Float images in [0, 1] ``(B, 3, H, W)`` -> one normalised random view ``(B, 3, S, S)``:
    a full-size view, or with ``local`` a small multi-crop view (``local_size``, ``local_scale``)
    with the same colour steps. ``grey``: every image is grey (R = G = B); the saturation, hue and
    grey-scale steps, which would leave such images as they are (up to rounding), are skipped, with
    the same random draws."""
    strength = cfg.cj_strength
    size, scale = (cfg.local_size, cfg.local_scale) if local else (cfg.input_size, (cfg.min_scale, 1.0))
    steps: list[nn.Module] = [
        BatchResizedCropFlip(size, scale, flip_prob=cfg.hflip_prob),
        BatchColorJitter(0.8 * strength, 0.8 * strength, 0.8 * strength, 0.2 * strength, p=cfg.cj_prob, grey=grey),
        BatchGrayscale(cfg.gray_prob, grey=grey),
    ]
    if cfg.blur_prob > 0:
        # lightly: kernel about 10% of the image, sigma in (0.1, 2)
        kernel = 2 * math.floor(0.05 * size) + 1
        steps.append(K.RandomGaussianBlur((kernel, kernel), sigma=(0.1, 2.0), p=cfg.blur_prob))
    steps.append(BatchNormalize(cfg.mean, cfg.std))
    return nn.Sequential(*steps)


def batch_views(images: torch.Tensor, augment: nn.Module, seed: int, local_augment: nn.Module | None = None,
                local_views: int = 0) -> tuple[torch.Tensor, ...]:
    """Two independent views of a uint8 batch ``(B, H, W, 3)``, reproducible from ``seed``, then
    ``local_views`` small crops by ``local_augment`` (multi-crop; drawn after the two, so the two
    are the same with or without them).

    The steps draw from torch's global generator; seeding it per batch makes a resumed run draw
    exactly what the uninterrupted run drew. Both views are augmented in one call on the batch
    stacked twice (every parameter is drawn per image, so the two halves are independent views):
    half the per-call overhead, which matters for small images on a CPU. (The colour jitter's
    random order of its four steps is drawn per call, as kornia's, so the two views of a batch
    share it; the factors themselves are drawn per image and view.)
    """
    floats = images.permute(0, 3, 1, 2).float().div_(255)
    torch.manual_seed(seed)
    if floats.device.type == "cuda":
        torch.cuda.manual_seed(seed)
    views = augment(torch.cat((floats, floats)))
    global_views = (views[: len(images)], views[len(images):])
    if not local_views:
        return global_views
    return global_views + tuple(local_augment(torch.cat([floats] * local_views)).chunk(local_views))
