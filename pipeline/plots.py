"""Figures for people: digit grids, the confusion matrix and training curves."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and in CI

import matplotlib.pyplot as plt
import numpy as np

from pipeline.files import staged_file


def _save(figure: plt.Figure, path: Path) -> None:
    with staged_file(path) as temporary:
        figure.savefig(temporary, dpi=100, bbox_inches="tight", format="png")
    plt.close(figure)


def digit_grid(images: np.ndarray, titles: list[str], path: Path, columns: int) -> None:
    """Save images (N, 28, 28) as a grid with a title over each digit."""
    rows = max(1, -(-len(images) // columns))
    figure, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 1.8 * rows), squeeze=False)
    for index, axis in enumerate(axes.flat):
        axis.axis("off")
        if index < len(images):
            axis.imshow(images[index], cmap="gray", vmin=0, vmax=255)
            axis.set_title(titles[index], fontsize=9)
    _save(figure, path)


def confusion_matrix(matrix: np.ndarray, path: Path) -> None:
    """Save a confusion matrix (rows: true digit, columns: predicted) as a heat map."""
    classes = len(matrix)
    figure, axis = plt.subplots(figsize=(7, 6))
    # A log scale keeps the few errors visible next to the ~1,000 hits on the diagonal.
    shown = axis.imshow(np.log1p(matrix), cmap="Blues")
    for true in range(classes):
        for predicted in range(classes):
            count = matrix[true, predicted]
            if count:
                axis.text(
                    predicted,
                    true,
                    str(count),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if true == predicted else "black",
                )
    axis.set(
        xticks=range(classes),
        yticks=range(classes),
        xlabel="predicted digit",
        ylabel="true digit",
        title="Confusion matrix (test set)",
    )
    figure.colorbar(shown, ax=axis, label="log(1 + count)")
    _save(figure, path)


def training_curves(history: dict[str, list[float]], path: Path) -> None:
    """Save loss and accuracy per epoch, train against validation."""
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = history["epoch"]
    for split in ("train", "val"):
        loss_axis.plot(epochs, history[f"{split}_loss"], marker="o", label=split)
        accuracy_axis.plot(epochs, history[f"{split}_accuracy"], marker="o", label=split)
    loss_axis.set(xlabel="epoch", ylabel="loss", title="Loss")
    accuracy_axis.set(xlabel="epoch", ylabel="accuracy", title="Accuracy")
    for axis in (loss_axis, accuracy_axis):
        axis.grid(alpha=0.3)
        axis.legend()
    _save(figure, path)


def compared_curves(
    curves: dict[str, tuple[list[int], list[float]]], metric: str, path: Path
) -> None:
    """Save one line per run (label: (epochs, values)) of a metric, for comparing runs."""
    figure, axis = plt.subplots(figsize=(8, 5))
    for label, (epochs, values) in curves.items():
        axis.plot(epochs, values, marker="o", label=label)
    axis.set_xlabel("epoch")
    axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    axis.set_ylabel(metric)
    axis.grid(alpha=0.3)
    if curves:
        axis.legend(fontsize=8)
    _save(figure, path)
