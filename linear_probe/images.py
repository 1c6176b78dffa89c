"""Labelled images -> augmented training batches, for the methods that see pixels while they
train (fine-tuning, the scratch baseline, and the linear probe through the frozen backbone)."""

from __future__ import annotations

import torch
import torchvision.transforms as T
from torch.utils.data import DataLoader, Dataset

from ssl_pretrain.data import UnreadableImage

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


def build_train_loader(source, transform, batch_size: int, seed: int, num_workers: int = 0) -> DataLoader:
    """Shuffled batches of augmented labelled images, the order fixed by ``seed``.

    A last batch of a single image is dropped: BatchNorm in training mode cannot normalise one
    value per channel (the ResNet stem at 1x1 resolution).
    """
    return DataLoader(
        LabelledImages(source, transform),
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
        num_workers=num_workers,
        collate_fn=_collate_labelled,
        drop_last=len(source) % batch_size == 1 and len(source) > 1,
    )
