"""preprocess stage: parse and validate the IDX files, split, and describe the data.

The split is the tutorial's: the first `preprocess.val_size` training images are the
validation set, the rest the training set, and the test file the test set. New labelled
digits in `paths.incoming_dir` join the training set only, never validation or test.
Arrays stay uint8 on disk; the model rescales the pixels.
"""

from __future__ import annotations

import logging

import numpy as np

from pipeline import cli, data, files, idx, incoming, plots
from pipeline.config import PipelineConfig
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)


class DataValidationError(PipelineError):
    """Parsed arrays that do not describe a usable image classification set."""


def load_raw(cfg: PipelineConfig, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Read and cross-check the images and labels of `train` or `test`."""
    raw_dir = cfg.path(cfg.paths.raw_dir)
    images_file = raw_dir / getattr(cfg.data, f"{kind}_images").name
    labels_file = raw_dir / getattr(cfg.data, f"{kind}_labels").name
    images = idx.read(images_file, idx.IMAGES_MAGIC)
    labels = idx.read(labels_file, idx.LABELS_MAGIC)

    size = cfg.data.image_size
    if images.shape[1:] != (size, size):
        raise DataValidationError(
            f"{images_file}: images are {images.shape[1:]}, data.image_size says {size}x{size}"
        )
    if len(images) != len(labels):
        raise DataValidationError(
            f"{images_file} has {len(images)} images but {labels_file} has {len(labels)} labels"
        )
    if len(labels) and labels.max() >= cfg.data.num_classes:
        raise DataValidationError(
            f"{labels_file}: label {labels.max()} is outside "
            f"0-{cfg.data.num_classes - 1} (data.num_classes)"
        )
    return images, labels


def split(cfg: PipelineConfig) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The train, validation and test splits; validation is the head of the train file.

    The incoming digits are not part of it: `run` appends them to the training split.
    """
    train_images, train_labels = load_raw(cfg, "train")
    test_images, test_labels = load_raw(cfg, "test")
    val_size = cfg.preprocess.val_size
    if val_size >= len(train_images):
        raise DataValidationError(
            f"preprocess.val_size is {val_size} but the training file "
            f"has only {len(train_images)} images"
        )
    return {
        "train": (train_images[val_size:], train_labels[val_size:]),
        "val": (train_images[:val_size], train_labels[:val_size]),
        "test": (test_images, test_labels),
    }


def statistics(splits: dict[str, tuple[np.ndarray, np.ndarray]], classes: int) -> dict:
    """Counts per class and pixel mean and std (on the [0, 1] scale) of each split."""
    stats = {}
    for name, (images, labels) in splits.items():
        pixels = images.astype(np.float64) / 255.0
        stats[name] = {
            "count": len(labels),
            "pixel_mean": round(float(pixels.mean()), 4),
            "pixel_std": round(float(pixels.std()), 4),
            "class_counts": {
                str(digit): int(n)
                for digit, n in enumerate(np.bincount(labels, minlength=classes))
            },
        }
    return stats


def add_incoming(
    cfg: PipelineConfig, splits: dict[str, tuple[np.ndarray, np.ndarray]]
) -> incoming.Incoming:
    """Append the valid incoming digits to the training split; return what was read."""
    new = incoming.read_folder(
        cfg.path(cfg.paths.incoming_dir), cfg.data.num_classes, cfg.data.image_size
    )
    images, labels = splits["train"]
    splits["train"] = (np.concatenate([images, new.images]), np.concatenate([labels, new.labels]))
    log.info(
        "incoming: %d new training digits from %s, %d files rejected",
        len(new.labels),
        cfg.paths.incoming_dir,
        len(new.rejected),
    )
    return new


def run(cfg: PipelineConfig) -> dict:
    """Parse, validate, split, add incoming digits, save and describe MNIST."""
    splits = split(cfg)
    new = add_incoming(cfg, splits)
    log.info("split: %s", ", ".join(f"{name} {len(y)}" for name, (_, y) in splits.items()))

    with files.staged_dir(cfg.path(cfg.paths.processed_dir)) as staging:
        for name, (images, labels) in splits.items():
            data.save_split(staging, name, images, labels)

    reports_dir = cfg.path(cfg.paths.reports_dir) / "data"
    stats = statistics(splits, cfg.data.num_classes)
    stats["incoming"] = {"accepted": len(new.labels), "rejected": len(new.rejected)}
    files.write_json(reports_dir / "stats.json", stats)
    files.write_json(reports_dir / "incoming_rejected.json", new.rejected)
    log.info(
        "train pixels: mean %.4f, std %.4f",
        stats["train"]["pixel_mean"],
        stats["train"]["pixel_std"],
    )

    # The tutorial's look at the data: a few random training digits with their labels.
    images, labels = splits["train"]
    grid = cfg.preprocess.sample_grid
    chosen = np.random.default_rng(cfg.seed).choice(len(images), grid * grid, replace=False)
    plots.digit_grid(
        images[chosen],
        [f"label {labels[i]}" for i in chosen],
        reports_dir / "samples.png",
        columns=grid,
    )
    return stats


if __name__ == "__main__":
    cli.main(run)
