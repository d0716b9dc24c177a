"""The processed data format (one .npz of uint8 images and labels per split) and tf.data."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.errors import PipelineError

if TYPE_CHECKING:
    import tensorflow as tf

SPLITS = ("train", "val", "test")


def save_split(folder: Path, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    """Write one split uncompressed: loading it is then a plain read."""
    np.savez(folder / f"{split}.npz", images=images, labels=labels)


def load_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Read one split written by the preprocess stage."""
    path = folder / f"{split}.npz"
    if not path.is_file():
        raise PipelineError(f"{path}: not found; run the preprocess stage first (dvc repro)")
    try:
        with np.load(path) as archive:
            images, labels = archive["images"], archive["labels"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
        raise PipelineError(
            f"{path}: unreadable ({error}); run `dvc repro -f preprocess`"
        ) from None
    if images.dtype != np.uint8 or images.ndim != 3 or len(images) != len(labels):
        raise PipelineError(
            f"{path}: unexpected arrays {images.shape} {images.dtype} and "
            f"{labels.shape}; run `dvc repro -f preprocess`"
        )
    return images, labels


def dataset(
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    *,
    shuffle_buffer: int = 0,
    seed: int = 0,
) -> tf.data.Dataset:
    """Batches of float32 pixels in [0, 255] and int labels; the model rescales."""
    import tensorflow as tf

    images, labels = tf.constant(images), tf.constant(labels.astype(np.int32))
    # tf.data shuffles and batches indices, and each batch is gathered in one op: its
    # per-element work is then on integers, not on 784-byte images, and leaves more of
    # the CPU to training. The order depends only on the count, the buffer size and the
    # seed, so it is the order that shuffling the images themselves gives.
    order = tf.data.Dataset.range(len(images))
    if shuffle_buffer:
        # A fixed seed and reshuffling per epoch: the same order on every run.
        order = order.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    batches = order.batch(batch_size).map(
        lambda index: (tf.cast(tf.gather(images, index), tf.float32), tf.gather(labels, index))
    )
    # A fixed prefetch instead of tf.data's autotuning: a batch is one gather, and the
    # autotuning thread made discarding an iterator (at every epoch's end) wait for its
    # next wake-up, which stalled training for 5-8 seconds at the start of most epochs.
    options = tf.data.Options()
    options.autotune.enabled = False
    return batches.prefetch(2).with_options(options)
