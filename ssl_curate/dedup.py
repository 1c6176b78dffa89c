"""A folder of images -> its duplicate groups, written as ``duplicates.csv``, ``duplicates.json`` and
``duplicates.png`` (what ``ssl-dedup`` writes; ``duplicates.py`` holds the search itself, and
``dedup_cli.find_duplicates`` embeds the images with a checkpoint's backbone and runs it).

Everything is computed before anything is written, and each file is written atomically (temporary
file, then rename), the JSON last: a failed run leaves ``--out`` as it was, and a folder with
``duplicates.json`` holds a complete result.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ssl_curate.duplicates import DuplicateError, DuplicateGroup, find_exact_duplicates
from ssl_pretrain.checkpoint import atomic_write
from ssl_pretrain.data import FileSource, UnreadableImage

log = logging.getLogger(__name__)

OUTPUT_FILES = ("duplicates.csv", "duplicates.json", "duplicates.png")
FORMAT = "ssl_curate/duplicates-v1"
PLOT_GROUPS, PLOT_MEMBERS = 12, 8
"""Rows (largest groups first) and images per row of ``duplicates.png``."""


@dataclass
class DedupResult:
    """Duplicate groups of one image source.

    Attributes:
        names: name (relative path) of every image searched; group members index this list.
        groups: sorted largest first (``find_near_duplicates``).
        skipped: ``(name, reason)`` of the files that could not be read.
        total: files in the source, readable or not.
    """

    names: list[str]
    groups: list[DuplicateGroup]
    skipped: list[tuple[str, str]]
    total: int
    threshold: float | None
    seconds: float = 0.0
    source_rows: list[int] = field(default_factory=list)
    source: Any = field(default=None, repr=False)
    """The opened source (``source_rows[i]`` is image ``i``'s position in it), for the plot."""

    @property
    def images_in_groups(self) -> int:
        return sum(len(group.members) for group in self.groups)

    @property
    def exact_images(self) -> int:
        return sum(sum(group.exact) for group in self.groups)

    def summary(self) -> str:
        searched = "byte-identical files only" if self.threshold is None else f"cosine similarity >= {self.threshold}"
        return (f"{len(self.names)} images searched ({len(self.skipped)} of {self.total} files unreadable, skipped), "
                f"{searched}: {len(self.groups)} duplicate groups holding {self.images_in_groups} images, "
                f"{self.exact_images} of them byte-identical to another member; {self.seconds:.1f} s.")


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse to replace earlier results unless asked to."""
    if out.exists() and not out.is_dir():
        raise DuplicateError(f"--out {out} exists and is not a folder")
    existing = [name for name in OUTPUT_FILES if (out / name).exists()]
    if existing and not overwrite:
        raise DuplicateError(f"{out} already holds {', '.join(existing)}; pass --overwrite to replace them")


def pixel_duplicates(source) -> tuple[list[list[int]], list[tuple[str, str]]]:
    """``find_exact_duplicates`` for images that are not files (built-in or tar sources):
    identical decoded pixels."""
    by_digest: dict[str, list[int]] = {}
    skipped = []
    for index in range(len(source)):
        try:
            image = source.load(index)
        except UnreadableImage as error:
            skipped.append((source.name(index), str(error)))
            continue
        digest = hashlib.sha256(f"{image.size}".encode() + image.tobytes()).hexdigest()
        by_digest.setdefault(digest, []).append(index)
    return sorted(group for group in by_digest.values() if len(group) > 1), skipped


def exact_groups_of(source) -> tuple[list[list[int]], list[tuple[str, str]]]:
    """Groups of identical images (file bytes, else pixels), as source positions."""
    if isinstance(source, FileSource):
        groups, skipped = find_exact_duplicates(source.paths)
        names = {path: source.name(index) for index, path in enumerate(source.paths)}
        return groups, [(names.get(path, path), reason) for path, reason in skipped]
    return pixel_duplicates(source)


def rows_of(groups: list[list[int]], rows: dict[int, int]) -> list[list[int]]:
    """Source positions -> feature rows; unreadable members drop out (and groups of one)."""
    mapped = [[rows[position] for position in group if position in rows] for group in groups]
    return [group for group in mapped if len(group) > 1]


# ---------------------------------------------------------------------------------------------
# Writing


def csv_text(result: DedupResult) -> str:
    """``group,path,similarity,exact``: one row per image in a group, the group's first member first."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["group", "path", "similarity", "exact"])
    for number, group in enumerate(result.groups, start=1):
        for member, similarity, exact in zip(group.members, group.similarity_to_first, group.exact):
            writer.writerow([number, result.names[member], f"{similarity:.6f}", "yes" if exact else "no"])
    return buffer.getvalue()


def json_document(result: DedupResult, data: str, checkpoint: str | None) -> dict[str, Any]:
    return {
        "format": FORMAT, "data": str(data), "checkpoint": None if checkpoint is None else str(checkpoint),
        "threshold": result.threshold, "exact_only": result.threshold is None,
        "counts": {"files": result.total, "images": len(result.names), "skipped": len(result.skipped),
                   "groups": len(result.groups), "images_in_groups": result.images_in_groups,
                   "exact_images": result.exact_images},
        "seconds": round(result.seconds, 3),
        "groups": [group.to_dict(result.names) for group in result.groups],
        "skipped": [{"path": name, "reason": reason} for name, reason in result.skipped],
    }


def write_results(out: Path, result: DedupResult, png: bytes | None, data: str, checkpoint: str | None) -> None:
    """The three files, each atomically, the JSON last; a stale ``duplicates.png`` is removed
    when no plot was asked for."""
    text = csv_text(result).encode()
    document = (json.dumps(json_document(result, data, checkpoint), indent=1) + "\n").encode()
    out.mkdir(parents=True, exist_ok=True)
    if png is None:
        (out / "duplicates.png").unlink(missing_ok=True)  # from an earlier run: not this result
    else:
        atomic_write(out / "duplicates.png", lambda file: file.write(png))
    atomic_write(out / "duplicates.csv", lambda file: file.write(text))
    atomic_write(out / "duplicates.json", lambda file: file.write(document))


def plot_groups(result: DedupResult, groups: int = PLOT_GROUPS, members: int = PLOT_MEMBERS) -> bytes | None:
    """PNG bytes of the largest groups side by side (a row per group), or None without groups."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = result.groups[:groups]
    if not shown:
        return None
    columns = min(members, max(len(group.members) for group in shown))
    figure, axes = plt.subplots(len(shown), columns, figsize=(1.6 * columns, 1.8 * len(shown)), squeeze=False,
                               layout="constrained")
    for row, group in enumerate(shown):
        for column, axis in enumerate(axes[row]):
            axis.axis("off")
            if column >= len(group.members):
                continue
            label = f"{group.similarity_to_first[column]:.3f}" + (" =" if group.exact[column] else "")
            try:
                axis.imshow(np.asarray(result.source.load(result.source_rows[group.members[column]])))
            except UnreadableImage:  # byte-identical copies of a broken file (--exact-only)
                label += " unreadable"
            axis.set_title((f"#{row + 1} ({len(group.members)})  " if column == 0 else "") + label, fontsize=7)
    figure.suptitle("duplicate groups (similarity to the first image; '=' byte-identical)", fontsize=8)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()
