"""Which labelled images each method may see: a validation split and class-balanced label subsets.

Both are drawn per class from a seeded permutation, so they are stable for a seed, identical on
every machine, and nested: the 1% subset of a seed is inside its 10% subset. scikit-learn's
``train_test_split(stratify=...)`` is not used because it refuses classes with a single image,
which a real folder can have; here such a class simply stays in the training part.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import numpy as np

from linear_probe.errors import EvaluationError
from ssl_curate.selection import select_indices

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabelBudget:
    """How many labels a method gets: a fraction of each class, or a number per class.

    Exactly one of ``fraction`` and ``per_class`` is set.
    """

    fraction: float | None = None
    per_class: int | None = None

    @property
    def label(self) -> str:
        """Short name for tables: ``1%``, ``100%``, ``5/class``."""
        if self.per_class is not None:
            return f"{self.per_class}/class"
        return f"{self.fraction * 100:g}%"


def parse_label_budgets(text: str) -> tuple[LabelBudget, ...]:
    """``'0.01,0.1,1.0,5pc'`` -> budgets; ``Npc`` means N labelled images per class.

    Raises:
        EvaluationError: a value that is neither a fraction in (0, 1] nor ``Npc`` with N >= 1.
    """
    budgets = []
    for part in (item.strip() for item in text.split(",")):
        per_class = re.fullmatch(r"(\d+)\s*(pc|/class|perclass)", part)
        if per_class and int(per_class.group(1)) >= 1:
            budgets.append(LabelBudget(per_class=int(per_class.group(1))))
            continue
        try:
            fraction = float(part)
        except ValueError:
            fraction = -1.0
        if not 0.0 < fraction <= 1.0:
            raise EvaluationError(
                f"label budget '{part}' is neither a fraction in (0, 1] nor N per class like '5pc'"
            )
        budgets.append(LabelBudget(fraction=fraction))
    if not budgets:
        raise EvaluationError("no label budgets given")
    return tuple(dict.fromkeys(budgets))  # drop repeats, keep order


def _class_permutation(labels: np.ndarray, class_id: int, seed: int) -> np.ndarray:
    """The positions of one class, shuffled by a generator keyed on (seed, class) only, so one
    class's draw does not change when another class gains or loses images."""
    positions = np.flatnonzero(labels == class_id)
    return np.random.default_rng([seed, int(class_id)]).permutation(positions)


def sample_label_subset(labels: np.ndarray, budget: LabelBudget, seed: int) -> np.ndarray:
    """Class-balanced, seeded subset of positions in ``labels`` with at least one image per class.

    A fraction keeps ``max(1, round(fraction * n_c))`` images of a class with ``n_c`` images (the
    class proportions of the data, as in SimCLR's 1% / 10% ImageNet subsets); ``per_class`` keeps
    ``min(per_class, n_c)``.

    Args:
        labels: ``(N,)`` integer class of every image that may be labelled.

    Returns:
        Sorted positions into ``labels``, shape ``(n_selected,)``.
    """
    chosen = []
    for class_id in np.unique(labels):
        positions = _class_permutation(labels, class_id, seed)
        if budget.per_class is not None:
            count = min(budget.per_class, len(positions))
        else:
            count = max(1, int(round(budget.fraction * len(positions))))
        chosen.append(positions[:count])
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


LABEL_SELECTIONS = ("random", "uniform", "typiclust", "kcenter", "kmeans")
"""How a label budget's images are chosen: ``random`` is ``sample_label_subset`` (class-balanced:
it reads the labels, so it is the protocol of the papers, not a choice a user has); ``uniform`` is a
seeded uniform pick of the same number of images from the whole pool (``uniform_label_subset``:
what a user without labels can do, the baseline a selection strategy is compared with); the others
are ``ssl_curate.selection`` strategies on the pretrained embeddings, which never read a label."""
EMBEDDING_SELECTIONS = ("typiclust", "kcenter", "kmeans")
"""The selections that read the pool's ssl embeddings (``select_label_subset``)."""


def label_count(budget: LabelBudget, pool_size: int, num_classes: int) -> int:
    """Images a budget buys when they are chosen without labels: ``fraction x pool`` (at least 1)
    or ``per_class x classes``, at most the pool."""
    if budget.per_class is not None:
        return min(pool_size, budget.per_class * num_classes)
    return min(pool_size, max(1, int(round(budget.fraction * pool_size))))


def uniform_label_subset(pool_size: int, budget: LabelBudget, num_classes: int, seed: int) -> np.ndarray:
    """Sorted positions of ``label_count`` images drawn uniformly without replacement from a pool of
    ``pool_size``, seeded; no label is read, so a class may get none (as it may for a user)."""
    count = label_count(budget, pool_size, num_classes)
    return np.sort(np.random.default_rng(seed).choice(pool_size, size=count, replace=False))


def select_label_subset(features: np.ndarray, budget: LabelBudget, num_classes: int, strategy: str,
                        seed: int) -> np.ndarray:
    """Sorted rows of ``features`` (``(N, D)``, the pool's pretrained embeddings) that ``strategy``
    picks for ``budget``, without labels; ``label_count`` of them.

    Raises:
        SelectionError: an unknown strategy (``ssl_curate.selection``).
    """
    unit = features / np.linalg.norm(features, axis=1, keepdims=True).clip(min=1e-12)
    count = label_count(budget, len(features), num_classes)
    return np.sort(select_indices(unit, count, strategy, seed))


def stratified_split(labels: np.ndarray, fraction: float, seed: int, what: str = "validation"):
    """Split positions into ``(kept, held_out)`` with ``fraction`` of every class held out.

    Each class with at least two images gives ``max(1, round(fraction * n_c))`` images to the
    held-out part but always keeps one; a class with a single image stays whole in ``kept``
    (logged), since holding it out would leave nothing to learn it from.

    Args:
        labels: ``(N,)`` integer classes.
        fraction: share of each class to hold out, in (0, 1).

    Returns:
        Two sorted position arrays into ``labels``.
    """
    if not 0.0 < fraction < 1.0:
        raise EvaluationError(f"the {what} fraction must be between 0 and 1, got {fraction}")
    kept, held_out, singletons = [], [], []
    for class_id in np.unique(labels):
        positions = _class_permutation(labels, class_id, seed)
        if len(positions) < 2:
            singletons.append(int(class_id))
            kept.append(positions)
            continue
        count = min(len(positions) - 1, max(1, int(round(fraction * len(positions)))))
        held_out.append(positions[:count])
        kept.append(positions[count:])
    if singletons:
        log.warning(
            "%d class(es) with a single image kept out of the %s split: %s",
            len(singletons), what, ", ".join(map(str, singletons[:10])),
        )
    return np.sort(np.concatenate(kept)), np.sort(np.concatenate(held_out or [np.zeros(0, np.int64)]))
