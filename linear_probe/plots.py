"""PNG figures of an evaluation (matplotlib, Agg back-end: no display needed).

- the label-efficiency curve: top-1 against the number of labels, every method and baseline;
- the confusion matrix of the best pretrained method at the largest label budget;
- a 2-D map (PCA) of the test embeddings coloured by class;
- a grid of test images, each followed by its nearest training images in feature space.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the back-end)
import numpy as np  # noqa: E402
from sklearn.decomposition import PCA  # noqa: E402
from sklearn.metrics import confusion_matrix  # noqa: E402

from linear_probe.knn import search_neighbours  # noqa: E402
from linear_probe.report import summarise  # noqa: E402


def plot_label_efficiency(rows: list[dict], path: str | Path) -> Path:
    """Top-1 (mean ± std over seeds) against labelled images; pretrained solid, baselines dashed."""
    summary = summarise(rows)
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for method, kind in dict.fromkeys((key[0], key[2]) for key in summary):
        points = sorted((stats["n_train"], stats["mean"], stats["std"])
                        for key, stats in summary.items() if key[0] == method and key[2] == kind)
        n_train, means, stds = (np.array(column) for column in zip(*points))
        axes.errorbar(n_train, 100 * means, yerr=100 * stds, marker="o", capsize=3,
                      linestyle="-" if kind == "ssl" else "--", label=f"{method} / {kind}")
    axes.set(xscale="log", xlabel="labelled training images", ylabel="test top-1 (%)",
             title="Label efficiency")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, ncol=2)
    return _save(figure, path)


def plot_confusion_matrix(labels: np.ndarray, predictions: np.ndarray, classes: list[str], title: str,
                          path: str | Path) -> Path:
    """Row-normalised confusion matrix: row = true class, column = predicted class."""
    matrix = confusion_matrix(labels, predictions, labels=np.arange(len(classes)), normalize="true")
    size = max(4.0, 0.45 * len(classes) + 2)
    figure, axes = plt.subplots(figsize=(size, size))
    image = axes.imshow(matrix, cmap="Blues", vmin=0, vmax=1)
    if len(classes) <= 30:
        axes.set_xticks(range(len(classes)), classes, rotation=90, fontsize=7)
        axes.set_yticks(range(len(classes)), classes, fontsize=7)
    axes.set(xlabel="predicted", ylabel="true", title=title)
    figure.colorbar(image, ax=axes, fraction=0.046)
    return _save(figure, path)


def plot_embedding_map(features: np.ndarray, labels: np.ndarray, classes: list[str], path: str | Path,
                       max_points: int = 5000) -> Path:
    """First two principal components of L2-normalised test features, coloured by class."""
    chosen = np.random.default_rng(0).permutation(len(features))[:max_points]
    unit = features[chosen] / np.maximum(np.linalg.norm(features[chosen], axis=1, keepdims=True), 1e-12)
    points = PCA(n_components=2, random_state=0).fit_transform(unit)
    figure, axes = plt.subplots(figsize=(6, 6))
    colours = plt.get_cmap("tab20" if len(classes) > 10 else "tab10")
    for class_id, name in enumerate(classes):
        mask = labels[chosen] == class_id
        axes.scatter(points[mask, 0], points[mask, 1], s=6, color=colours(class_id % colours.N), label=name)
    axes.set(title="Test embeddings (PCA)", xticks=[], yticks=[])
    if len(classes) <= 20:
        axes.legend(fontsize=7, markerscale=2, loc="best")
    return _save(figure, path)


def plot_nearest_neighbours(test_images, test_features: np.ndarray, train_images, train_features: np.ndarray,
                            path: str | Path, queries: int = 8, neighbours: int = 6) -> Path:
    """One row per test image (the first of each class, then more): the image, then its nearest
    training images by cosine similarity, titled green when of the same class, red otherwise."""
    labels, train_labels = test_images.labels, train_images.labels
    firsts = [int(np.flatnonzero(labels == c)[0]) for c in np.unique(labels)]
    others = np.setdiff1d(np.arange(len(labels)), firsts)
    chosen = (firsts + others.tolist())[:queries]
    similarities, indices = search_neighbours(train_features, test_features[chosen], neighbours)
    count = indices.shape[1]  # fewer when the training set is smaller than ``neighbours``
    figure, grid = plt.subplots(len(chosen), count + 1, figsize=(1.3 * (count + 1), 1.4 * len(chosen)),
                                squeeze=False)
    for row, query in enumerate(chosen):
        _show(grid[row, 0], test_images.load(query), f"test: {test_images.classes[labels[query]]}", "black")
        for column in range(count):
            match = int(indices[row, column])
            colour = "green" if train_labels[match] == labels[query] else "red"
            title = f"{train_images.classes[train_labels[match]]} {similarities[row, column]:.2f}"
            _show(grid[row, column + 1], train_images.load(match), title, colour)
    figure.suptitle("Test images and their nearest training images (cosine similarity)", fontsize=9)
    return _save(figure, path)


def _show(axes, image, title: str, colour: str) -> None:
    axes.imshow(image)
    axes.set_title(title, fontsize=6, color=colour)
    axes.axis("off")


def _save(figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
