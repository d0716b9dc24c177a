"""TensorBoard histograms: the buckets the dashboard reads, for any values a run can have."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow as tf
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from pipeline.summaries import HISTOGRAM_BINS, write_histogram


def written_buckets(folder: Path, values: object) -> np.ndarray:
    """Write one histogram of `values` and read its (left, right, count) rows back."""
    with tf.summary.create_file_writer(str(folder)).as_default() as writer:
        write_histogram("layer/activations", values, step=3)
        writer.flush()
    (path,) = folder.glob("events.out.tfevents.*")
    tensors = [
        tf.make_ndarray(value.tensor)
        for event in EventFileLoader(str(path)).Load()
        for value in event.summary.value
    ]
    assert len(tensors) == 1
    return tensors[0]


def test_buckets_match_numpy(tmp_path):
    values = np.random.default_rng(0).standard_normal((64, 28, 28, 32)).astype(np.float32)

    buckets = written_buckets(tmp_path, values)

    counts, edges = np.histogram(values.astype(np.float64), bins=HISTOGRAM_BINS)
    assert buckets.shape == (HISTOGRAM_BINS, 3)
    np.testing.assert_array_equal(buckets[:, 2], counts)
    np.testing.assert_allclose(buckets[:, 0], edges[:-1], rtol=1e-6)
    np.testing.assert_allclose(buckets[:, 1], edges[1:], rtol=1e-6)


def test_equal_values_fill_the_middle_bucket(tmp_path):
    buckets = written_buckets(tmp_path, np.zeros(1024, np.float32))

    assert buckets[0, 0] == -0.5 and buckets[-1, 1] == 0.5
    assert buckets[HISTOGRAM_BINS // 2, 2] == 1024 and buckets[:, 2].sum() == 1024


def test_nan_and_infinite_values_are_left_out(tmp_path):
    values = np.array([np.nan, -np.inf, 1.0, 2.0, 3.0, np.inf], np.float32)

    buckets = written_buckets(tmp_path, values)

    assert buckets[:, 2].sum() == 3
    assert (buckets[0, 0], buckets[-1, 1]) == (1.0, 3.0)
