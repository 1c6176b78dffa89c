"""Labelled images -> augmented training batches, for the methods that see pixels while they
train (fine-tuning, the scratch baseline, and the linear probe through the frozen backbone).

Two routes with the same augmentation: per-image PIL transforms in a ``DataLoader`` (any size of
image, any number), and, for sets that fit in memory, images decoded once (``load_pixels``) and
augmented a whole batch at a time (``augmented_batches``), as pretraining's tensor pipeline does:
no per-image Python work per epoch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms as T
from torch.utils.data import DataLoader, Dataset

from ssl_pretrain.augment.batch_transforms import BatchNormalize, BatchResizedCropFlip
from ssl_pretrain.data import ReducedLoader, UnreadableImage
from ssl_pretrain.augment.transforms import EvalTransform

MIN_CROP_SCALE = 0.5
"""Light augmentation for supervised training on few labels: crops of at least half the image
(SimCLR's 0.08 is for learning invariances without labels, too strong here) and a flip, the
recipe of MoCo v3's linear probe with a milder crop."""


def build_train_transform(input_size: int, mean, std, hflip: bool = True) -> T.Compose:
    """Random resized crop (scale 0.5-1) + horizontal flip (unless ``hflip`` is off: a mirrored
    digit or letter is another glyph) + normalisation.

    Returns a callable: RGB PIL image -> ``(3, input_size, input_size)`` float tensor.
    """
    crop = T.RandomResizedCrop(input_size, scale=(MIN_CROP_SCALE, 1.0), interpolation=T.InterpolationMode.BICUBIC)
    flip = [T.RandomHorizontalFlip()] if hflip else []
    return T.Compose([crop, *flip, T.ToTensor(), T.Normalize(mean=list(mean), std=list(std))])


class LabelledImages(Dataset):
    """``index -> (image tensor, label)``, or None for an unreadable file (dropped by collate)."""

    def __init__(self, source, transform):
        if source.labels is None:
            raise ValueError("training needs a labelled source")
        self.source, self.transform = source, transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        try:
            image = self.source.load(index)
        except UnreadableImage:
            return None  # already reported when the embeddings were extracted
        return self.transform(image), int(self.source.labels[index])


def _collate_labelled(samples):
    samples = [sample for sample in samples if sample is not None]
    if not samples:
        return torch.zeros(0), torch.zeros(0, dtype=torch.int64)
    return torch.stack([image for image, _ in samples]), torch.tensor([label for _, label in samples])


def balanced_batches(order: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, ...]:
    """``order`` cut into ``ceil(n / batch_size)`` batches whose sizes differ by at most one.

    Not ``batch_size``-sized batches and a remainder: 450 images in batches of 64 would end every
    epoch on a batch of 2, whose BatchNorm statistics enter the running averages the network is
    scored with (momentum 0.1 a step) and whose gradient is two images' worth; 8 batches of 56-57
    see every image once with none of that (``scripts/bench_last_batch.py`` measures the two cuts).
    """
    return order.tensor_split(max(1, -(-len(order) // batch_size))) if len(order) else ()


class BalancedBatchSampler:
    """A ``DataLoader`` batch sampler: a fresh permutation of ``n`` indices every epoch (fixed by
    ``seed``), cut by ``balanced_batches``."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size = n, batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def __iter__(self):
        for part in balanced_batches(torch.randperm(self.n, generator=self.generator), self.batch_size):
            yield part.tolist()


def build_train_loader(source, transform, batch_size: int, seed: int, num_workers: int = 0) -> DataLoader:
    """Shuffled batches of augmented labelled images, the order fixed by ``seed``, in batches of
    near-equal size (``balanced_batches``)."""
    return DataLoader(
        LabelledImages(source, transform),
        batch_sampler=BalancedBatchSampler(len(source), batch_size, seed),
        num_workers=num_workers,
        collate_fn=_collate_labelled,
    )


# ---------------------------------------------------------------------------------------------
# Small images held in memory: decoded once, augmented a batch at a time


IN_MEMORY_BYTES = 2 * 1024**3
"""Labelled images are held decoded (uint8, at the input size) up to this size; larger sets stream
from disk through ``build_train_loader``. CIFAR-10's 50,000 images at 32 px: 154 MB."""


@dataclass
class PixelSet:
    """Readable images of a labelled source at the input size, decoded once.

    Attributes:
        pixels: ``(N, S, S, 3)`` uint8, the eval geometry applied (resize short side, centre crop).
        labels: ``(N,)`` int64.
    """

    pixels: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


def load_pixels(source, transform: EvalTransform, max_bytes: int = IN_MEMORY_BYTES) -> PixelSet | None:
    """Decode every readable image of a labelled ``source`` once (None when it would exceed
    ``max_bytes``). Unreadable files are left out, as they are from every extraction."""
    size = transform.input_size
    if len(source) * size * size * 3 > max_bytes or len(source) == 0:
        return None
    pixels = torch.empty(len(source), size, size, 3, dtype=torch.uint8)
    labels, count, load = [], 0, ReducedLoader(source, size)  # a JPEG decodes at reduced size
    for index in range(len(source)):
        try:
            pixels[count] = transform.to_uint8(load(index))
        except UnreadableImage:
            continue
        labels.append(int(source.labels[index]))
        count += 1
    return PixelSet(pixels[:count], torch.tensor(labels, dtype=torch.int64))


def augmented_batches(images: PixelSet, input_size: int, mean, std, batch_size: int, seed: int,
                      hflip: bool = True):
    """``epoch -> [(normalised augmented images (B, 3, S, S), labels (B,))]``: the training
    augmentation of ``build_train_transform`` (crop scale 0.5-1, flip) done on whole batches in
    memory (one ``grid_sample``), in an order and with draws fixed by ``(seed, epoch)``.

    Batches of near-equal size (``balanced_batches``), as ``build_train_loader`` makes.
    """
    crop = BatchResizedCropFlip(input_size, (MIN_CROP_SCALE, 1.0), flip_prob=0.5 if hflip else 0.0)
    normalise = BatchNormalize(mean, std)

    def batches(epoch: int):
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(len(images), generator=generator)
        parts = balanced_batches(order, batch_size)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 100_003 + epoch)
            for part in parts:
                floats = images.pixels[part].permute(0, 3, 1, 2).float().div_(255)
                yield normalise(crop(floats)), images.labels[part]

    return batches


@torch.no_grad()
def pixel_logits(model: torch.nn.Module, images: PixelSet, transform: EvalTransform, device,
                 batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """``(N, C)`` outputs of ``model`` (eval mode, restored after) and ``(N,)`` labels."""
    was_training = model.training
    model.eval()
    outputs = [model(transform.normalise(images.pixels[start:start + batch_size].to(device))).float().cpu()
               for start in range(0, len(images), batch_size)]
    model.train(was_training)
    return torch.cat(outputs).numpy(), images.labels.numpy()
