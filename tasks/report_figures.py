"""The figures of a run's report, as PNG files: each trial's learning curves, the best model's confusion matrix and
a grid of the test digits it got wrong. matplotlib is imported inside the functions: only the report task draws."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

MISCLASSIFIED_SHOWN = 40


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, no GUI toolkit
    import matplotlib.pyplot as plt

    return plt


def plot_curves(histories: Mapping[str, list[dict]], path: Path, title: str = "hidden_channels") -> bool:
    """Train and test loss, and test accuracy, per epoch for every trial (by its label, ``title`` in the legend);
    False when no trial has a history."""
    if not any(histories.values()):
        return False
    plt = _pyplot()
    figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for label, history in histories.items():
        epochs = [epoch["epoch"] for epoch in history]
        (line,) = loss_axes.plot(epochs, [e["train_loss"] for e in history], marker="o", label=label)
        loss_axes.plot(epochs, [e["test_loss"] for e in history], marker="x", linestyle="--", color=line.get_color())
        accuracy_axes.plot(epochs, [100 * e["test_accuracy"] for e in history], marker="o", label=label)
    loss_axes.set(title="Loss (solid: train, dashed: test)", xlabel="epoch", ylabel="loss")
    accuracy_axes.set(title="Test accuracy", xlabel="epoch", ylabel="%")
    for axes in (loss_axes, accuracy_axes):
        axes.grid(alpha=0.3)
        axes.xaxis.get_major_locator().set_params(integer=True)
    accuracy_axes.legend(title=title, fontsize="small")
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


def plot_confusion_matrix(matrix: list[list[int]], path: Path) -> None:
    import numpy as np

    plt = _pyplot()
    counts = np.asarray(matrix)
    figure, axes = plt.subplots(figsize=(6, 5.4), constrained_layout=True)
    image = axes.imshow(counts, cmap="Blues")
    threshold = counts.max() / 2
    for (true, predicted), count in np.ndenumerate(counts):
        axes.text(
            predicted,
            true,
            str(count),
            ha="center",
            va="center",
            fontsize=8,
            color="white" if count > threshold else "black",
        )
    axes.set(xticks=range(10), yticks=range(10), xlabel="predicted digit", ylabel="true digit")
    figure.colorbar(image, ax=axes, shrink=0.8)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_misclassified(misclassified: Mapping, path: Path, limit: int = MISCLASSIFIED_SHOWN) -> int:
    """A grid of up to ``limit`` misclassified digits titled "true→predicted"; returns how many it shows."""
    images = misclassified["images"][:limit]
    if len(images) == 0:
        return 0
    plt = _pyplot()
    columns = min(10, len(images))
    rows = -(-len(images) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(1.2 * columns, 1.35 * rows), squeeze=False)
    for index, ax in enumerate(axes.flat):
        ax.axis("off")
        if index < len(images):
            ax.imshow(images[index], cmap="gray_r")
            label, prediction = misclassified["labels"][index], misclassified["predictions"][index]
            ax.set_title(f"{label}→{prediction}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return len(images)
