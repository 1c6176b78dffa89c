"""Checkpoints that are never half-written and never run code when loaded.

Two kinds of file:

- ``checkpoints/last.pt``: everything to resume (model, optimiser, scheduler, RNG states, epoch
  and step, the resolved config). Plain tensors and Python values only, read back with
  ``torch.load(weights_only=True)``.
- ``backbone.safetensors``: the backbone alone, with what is needed to rebuild it (architecture,
  stem, feature dim, input size, normalisation) in the safetensors metadata. Loading it runs no
  code at all.

Every write goes to a temporary file in the same folder, is fsync'ed, then renamed over the old
file: a kill or a full disk at any moment leaves the previous file intact.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ssl_pretrain.errors import SSLError
from ssl_pretrain.models.backbones import build_backbone

FORMAT_VERSION = 1
CHECKPOINT_KIND = "ssl_pretrain/training-checkpoint"
BACKBONE_FILE = "backbone.safetensors"
LAST_CHECKPOINT = Path("checkpoints") / "last.pt"


class CheckpointError(SSLError, RuntimeError):
    """A checkpoint that cannot be written or used; the message is one line."""


@dataclass(frozen=True)
class BackboneInfo:
    """What it takes to rebuild a backbone and feed it images."""

    architecture: str
    small_stem: bool
    feature_dim: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    format_version: int = FORMAT_VERSION
    epoch: int = 0
    # Whether pretraining flipped images (False: a mirror changes what they show, digits and
    # text); evaluation and fine-tuning follow it. None: not known (older or foreign weights).
    hflip: bool | None = None

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "BackboneInfo":
        known = {key: values[key] for key in cls.__dataclass_fields__ if key in values}
        known["mean"], known["std"] = tuple(known["mean"]), tuple(known["std"])
        return cls(**known)


def resolve_hflip(requested: bool | None, info: BackboneInfo, log: logging.Logger) -> bool:
    """Flip training images when fine-tuning? ``requested`` (``--flip`` / ``--no-flip``) wins; else
    as pretraining did (``info.hflip``), and flips where that is not known."""
    if requested is not None:
        return requested
    if info.hflip is False:
        log.info("no horizontal flips when training on images: pretraining did not flip them (a mirror "
                 "changes what they show, e.g. digits and text); --flip to flip")
        return False
    return True


def atomic_write(path: str | Path, write: Callable[[Any], None]) -> None:
    """Call ``write(file_object)`` on a temporary file next to ``path``, fsync it, rename it.

    Raises:
        CheckpointError: the write failed (for example a full disk); ``path`` is untouched.
    """
    path = Path(path)
    temp_name = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(handle, _new_file_mode())
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_name, path)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except BaseException as failure:
        if temp_name is not None:
            _remove_quietly(temp_name)
        error = _os_error_behind(failure)
        if error is None:
            raise
        hint = " (disk full)" if error.errno == errno.ENOSPC else ""
        raise CheckpointError(
            f"could not write {path}{hint}: {error.strerror or error}; the previous file is intact"
        ) from None


def _os_error_behind(failure: BaseException) -> OSError | None:
    """The ``OSError`` that caused ``failure``, if any. A real full disk reaches us from
    ``torch.save`` as a ``RuntimeError`` of its zip writer, with the ``OSError`` as its context."""
    seen: set[int] = set()
    error: BaseException | None = failure if isinstance(failure, Exception) else None
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _new_file_mode() -> int:
    """``0o666`` less the umask, what ``open()`` gives a new file; mkstemp's own ``0o600`` would
    hide checkpoints and exports from the other users of a shared run folder."""
    umask = os.umask(0o077)  # the strictest mask in the instant before it is put back
    os.umask(umask)
    return 0o666 & ~umask


def _remove_quietly(name: str) -> None:
    try:
        os.unlink(name)
    except OSError:
        pass


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Atomically write a training checkpoint (``state`` holds tensors and plain values only)."""
    state = {"format_version": FORMAT_VERSION, "kind": CHECKPOINT_KIND, **state}
    atomic_write(path, lambda file: torch.save(state, file))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a training checkpoint without executing code (``weights_only=True``).

    Raises:
        CheckpointError: missing, truncated, unsafe, foreign or from a newer format (one line).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        what = f" ({found.group(1)})" if found else ""
        raise CheckpointError(
            f"{path} was refused: it holds objects other than tensors and plain values{what}, and "
            "unpickling them could run code"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt?): {first}") from None
    if not isinstance(state, dict) or state.get("kind") != CHECKPOINT_KIND:
        raise CheckpointError(f"{path} is not an ssl_pretrain training checkpoint")
    _check_version(path, state.get("format_version"))
    return state


def _check_version(path: Path, version: Any) -> None:
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format version {version}, this ssl_pretrain reads up to {FORMAT_VERSION}: "
            "upgrade the package"
        )


def load_state_dict_strict(module: nn.Module, state_dict: dict, what: str) -> None:
    """``module.load_state_dict(strict=True)`` with a one-line error instead of a wall of keys."""
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0]
        raise CheckpointError(f"{what} does not match the model: {detail[:200]}") from None


# ---------------------------------------------------------------------------------------------
# The exported backbone


def export_backbone(path: str | Path, backbone: nn.Module, info: BackboneInfo) -> None:
    """Write the backbone's weights (and BatchNorm statistics) as safetensors, atomically."""
    from safetensors.torch import save

    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in backbone.state_dict().items()}
    metadata = {"ssl_pretrain": json.dumps(asdict(info))}
    payload = save(tensors, metadata=metadata)
    atomic_write(path, lambda file: file.write(payload))
    description = (json.dumps(asdict(info), indent=2) + "\n").encode()
    atomic_write(Path(path).with_suffix(".json"), lambda file: file.write(description))


def read_backbone_file(path: str | Path) -> tuple[dict[str, torch.Tensor], BackboneInfo]:
    """Weights and info from a ``.safetensors`` export or a training checkpoint ``.pt``."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        if not path.is_file():
            raise CheckpointError(f"backbone file not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as file:
                metadata = file.metadata() or {}
                tensors = {key: file.get_tensor(key) for key in file.keys()}
        except (SafetensorError, ValueError, OSError) as error:
            raise CheckpointError(f"{path} is not a readable safetensors file: {error}") from None
        if "ssl_pretrain" not in metadata:
            raise CheckpointError(f"{path} has no ssl_pretrain metadata (architecture, input size)")
        values = json.loads(metadata["ssl_pretrain"])
        _check_version(path, values.get("format_version"))
        return tensors, BackboneInfo.from_dict(values)
    state = load_checkpoint(path)
    prefix = "backbone."
    tensors = {key[len(prefix):]: value for key, value in state["model"].items() if key.startswith(prefix)}
    return tensors, BackboneInfo.from_dict({**state["backbone_info"], "epoch": state["epoch"]})


def resolve_backbone_path(path: str | Path) -> Path:
    """A run folder -> its exported backbone (or, mid-run, its last checkpoint); files as given."""
    path = Path(path)
    if path.is_dir():
        for candidate in (path / BACKBONE_FILE, path / LAST_CHECKPOINT):
            if candidate.is_file():
                return candidate
        raise CheckpointError(f"{path} holds neither {BACKBONE_FILE} nor {LAST_CHECKPOINT}")
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    return path


def load_backbone(path: str | Path, expect_architecture: str | None = None) -> tuple[nn.Module, BackboneInfo]:
    """Rebuild a backbone from a run folder, ``backbone.safetensors`` or ``last.pt``; eval mode.

    Raises:
        CheckpointError: missing, unreadable or unsafe file, or an architecture mismatch.
    """
    path = resolve_backbone_path(path)
    tensors, info = read_backbone_file(path)
    if expect_architecture and expect_architecture != info.architecture:
        raise CheckpointError(
            f"{path} holds a '{info.architecture}' backbone, but '{expect_architecture}' was expected"
        )
    try:
        backbone, _ = build_backbone(info.architecture, info.small_stem, info.input_size)
    except ValueError as error:
        raise CheckpointError(f"{path}: {error}") from None
    load_state_dict_strict(backbone, tensors, f"{path} ('{info.architecture}')")
    return backbone.eval(), info
