"""Images -> features of a frozen backbone, saved as ``.npy`` and reused while nothing changed.

Extraction follows DINO's ``extract_features``: deterministic eval transform, ``eval()`` mode, no
gradients, batches in order. A cached file is named after a fingerprint of the weights, the data
and the transform: change any of them and it is recomputed.
The files: ``linear_probe.embedding_store``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from linear_probe.embedding_store import Embeddings, load_embeddings, save_embeddings, side_paths
from linear_probe.errors import EvaluationError
from ssl_pretrain.data import DecodedSource, ReducedLoader, UnreadableImage
from ssl_pretrain.augment.transforms import EvalTransform

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
"""Bump when the meaning of a cached file changes, so old caches are not reused. (The move from
``.npz`` to ``.npy`` + JSON changed the container only: an old ``.npz`` is converted.)"""
class _TransformedImages(Dataset):
    """``index -> (index, image tensor)``, or ``(index, reason)`` for an unreadable file."""

    def __init__(self, source, transform):
        self.source, self.transform = source, transform
        # the transform's size is known: a JPEG decodes at reduced size (both sides stay >= it)
        self.load = ReducedLoader(source, transform.input_size) if isinstance(transform, EvalTransform) else source.load

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        try:
            image = self.load(index)
            # An EvalTransform is split: decode (and resize) here, normalise whole batches later.
            return index, (self.transform.to_uint8(image) if isinstance(self.transform, EvalTransform)
                           else self.transform(image))
        except UnreadableImage as error:
            return index, str(error)


def _collate(samples):
    good = [(index, image) for index, image in samples if isinstance(image, torch.Tensor)]
    bad = [(index, reason) for index, reason in samples if not isinstance(reason, torch.Tensor)]
    images = torch.stack([image for _, image in good]) if good else None
    return [index for index, _ in good], images, bad


def extract_embeddings(backbone: nn.Module, source, transform, batch_size: int = 256, device="cpu",
                       num_workers: int = 0, progress: bool = True) -> Embeddings:
    """Features of every readable image of ``source``, in order, without gradients.

    The backbone runs in ``eval()`` mode (BatchNorm uses its running statistics); the mode of each
    submodule is restored afterwards, so a training loop can call this between steps. The
    backbone is not moved: it must already be on ``device``.

    Args:
        backbone: maps ``(B, 3, H, W)`` images to ``(B, D)`` features.
        source: ``len``, ``load(i)`` -> RGB PIL image, ``name(i)``, optional ``labels``.
        transform: PIL image -> ``(3, H, W)`` tensor (``build_eval_transform``).

    Returns:
        ``Embeddings``; unreadable images are listed in ``skipped`` (and counted in the log).
    """
    modes = {module: module.training for module in backbone.modules()}
    backbone.eval()
    try:
        decoded = _decoded_batches(source, transform)
        if decoded is not None:
            return _extract_decoded(backbone, source, transform, *decoded, batch_size, device, progress)
        return _extract_streamed(backbone, source, transform, batch_size, device, num_workers, progress)
    finally:
        for module, mode in modes.items():
            module.training = mode


def _decoded_batches(source, transform):
    """The in-memory array of a ``DecodedSource`` whose images already have the transform's
    size (nothing to resample: batches go straight to ``normalise``), else None."""
    if not (isinstance(source, DecodedSource) and isinstance(transform, EvalTransform)
            and source.size == (transform.input_size, transform.input_size)):
        return None
    return source.decoded()


def _extract_decoded(backbone, source, transform, images, kept, skipped, batch_size, device, progress):
    features = []
    with torch.inference_mode():
        for start in tqdm(range(0, len(kept), batch_size), desc="embeddings", unit="batch",
                          disable=not progress, leave=False):
            batch = torch.from_numpy(images[start:start + batch_size]).to(device, non_blocking=True)
            features.append(backbone(transform.normalise(batch)).float().cpu().numpy())
    return _assemble(source, kept.tolist(), features, list(skipped))


def _extract_streamed(backbone, source, transform, batch_size, device, num_workers, progress):
    loader = DataLoader(_TransformedImages(source, transform), batch_size=batch_size,
                        num_workers=num_workers, collate_fn=_collate,
                        pin_memory=torch.device(device).type == "cuda")
    indices, features, skipped = [], [], []
    with torch.inference_mode():
        for batch_indices, images, bad in tqdm(loader, desc="embeddings", unit="batch",
                                               disable=not progress, leave=False):
            skipped += [(source.name(index), reason) for index, reason in bad]
            if images is not None:
                images = images.to(device, non_blocking=True)
                if isinstance(transform, EvalTransform):
                    images = transform.normalise(images)
                features.append(backbone(images).float().cpu().numpy())
                indices += batch_indices
    return _assemble(source, indices, features, skipped)


def _assemble(source, indices: list[int], features: list[np.ndarray], skipped) -> Embeddings:
    if skipped:
        log.warning("%d of %d images could not be read and were skipped (first: %s: %s)",
                    len(skipped), len(source), *skipped[0])
    if not indices:
        raise EvaluationError(f"none of the {len(source)} images could be read")
    indices_array = np.asarray(indices, dtype=np.int64)
    labels = getattr(source, "labels", None)
    return Embeddings(
        features=np.concatenate(features),
        labels=None if labels is None else np.asarray(labels)[indices_array],
        names=[source.name(index) for index in indices],
        skipped=skipped,
        indices=indices_array,
        classes=list(getattr(source, "classes", [])),
    )


# ---------------------------------------------------------------------------------------------
# Files


def fingerprint_module(module: nn.Module) -> str:
    """SHA-256 of a module's class and every tensor of its state (weights and BatchNorm stats)."""
    digest = hashlib.sha256(type(module).__qualname__.encode())
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def fingerprint_source(source) -> str:
    """SHA-256 of what a source would yield: file names, sizes and modification times for files
    on disk (cheap: no image is read), the pixels themselves for in-memory arrays; plus labels.

    Names are hashed as the bytes the file system holds (``os.fsencode``), so a file name that
    is not valid UTF-8 is fingerprinted, not an error.
    """
    digest = hashlib.sha256(type(source).__name__.encode())
    if hasattr(source, "paths"):
        for index, path in enumerate(source.paths):
            try:
                stat = os.stat(path)
                details = f"\0{stat.st_size}\0{stat.st_mtime_ns}\n"
            except OSError:
                details = "\0missing\n"
            digest.update(os.fsencode(source.name(index)) + details.encode())
    elif hasattr(source, "images"):
        digest.update(np.ascontiguousarray(source.images).tobytes())
    else:
        digest.update(b"\n".join(os.fsencode(source.name(index)) for index in range(len(source))))
    labels = getattr(source, "labels", None)
    if labels is not None:
        digest.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    digest.update(json.dumps(list(getattr(source, "classes", []))).encode())
    return digest.hexdigest()


def cache_path(cache_dir: str | Path, tag: str, model_fingerprint: str, data_fingerprint: str,
               transform) -> Path:
    """``CACHE_DIR/TAG-KEY.npy``, the key a hash of the weights, the data and the transform."""
    key_text = json.dumps([CACHE_FORMAT, model_fingerprint, data_fingerprint, repr(transform)])
    return Path(cache_dir) / f"{tag}-{hashlib.sha256(key_text.encode()).hexdigest()[:16]}.npy"


def cached_embeddings(cache_dir: str | Path, tag: str, model_fingerprint: str, data_fingerprint: str,
                      backbone: nn.Module, source, transform, **extract_options) -> Embeddings:
    """``extract_embeddings`` through a cache in ``cache_dir``: the file name carries a key of the
    weights, the data and the transform, so any change to them means a new extraction. A cached
    set comes back memory-mapped; an old ``.npz`` of the same key is converted, then removed.

    Args:
        tag: readable prefix of the file name (``ssl-train``).
        model_fingerprint, data_fingerprint: from ``fingerprint_module`` / ``fingerprint_source``.
        extract_options: passed to ``extract_embeddings`` (batch size, device, workers, progress).
    """
    path = cache_path(cache_dir, tag, model_fingerprint, data_fingerprint, transform)
    old = path.with_suffix(".npz")
    try:
        if side_paths(path)["meta"].is_file():  # written last: the set is complete
            embeddings = load_embeddings(path)
            log.info("reusing cached embeddings %s", path)
            return embeddings
        if old.is_file():
            log.info("converting cached embeddings %s to memory-mappable .npy", old)
            save_embeddings(path, load_embeddings(old))
            old.unlink()
            return load_embeddings(path)
    except EvaluationError as error:
        log.warning("ignoring a broken cache file (%s); extracting again", error)
    embeddings = extract_embeddings(backbone, source, transform, **extract_options)
    save_embeddings(path, embeddings)
    old.unlink(missing_ok=True)
    return embeddings
