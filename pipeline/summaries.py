"""Keras callbacks that record training: TensorBoard summaries and MLflow metrics.

TensorBoard gets what the tutorial logged: train and validation accuracy, a histogram
of every layer's weights, biases and activations, and sample input images. MLflow gets
the per-epoch train and validation metrics and, every `train.log_every_n_steps`, the
running train metrics, buffered and written once per epoch so that tracking costs
almost nothing.
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from tensorboard.plugins.histogram import metadata as histogram_metadata

from pipeline import tracking

HISTOGRAM_BINS = 30  # TensorBoard's own default


def passed_multiple(before: int, now: int, n: int) -> bool:
    """Whether the steps from `before` to `now` reached a multiple of n.

    Keras calls the batch callbacks once per `steps_per_execution` steps. The train
    stage picks a number of steps per call that divides n (train.execution_steps), so
    each multiple of n ends a call; in general the record is written at the end of the
    call that reached it.
    """
    return now // n > before // n


class TensorBoardSummaries(keras.callbacks.Callback):
    """Everything the tutorial sent to TensorBoard, in one `train` and one `validation` run.

    Scalars: `epoch_loss` and `epoch_accuracy` of both runs (so TensorBoard overlays
    them), the learning rate, and the running `batch_loss` and `batch_accuracy` every
    n steps. Histograms of each layer's weights, biases and activations on a fixed batch
    of validation images, sample inputs, and the op graph of the forward pass.

    Keras's own TensorBoard callback is not used: with `update_freq=n` it leaves a
    record-if-step-divides-n condition in force at the end of an epoch, which silently
    drops the epoch summaries whenever n does not divide the steps per epoch.
    """

    def __init__(
        self,
        log_dir: Path,
        probe_images: np.ndarray,
        every_n_steps: int,
        histogram_every_n_epochs: int = 1,
    ):
        super().__init__()
        self.train_writer = tf.summary.create_file_writer(str(log_dir / "train"))
        self.val_writer = tf.summary.create_file_writer(str(log_dir / "validation"))
        self.probe_images = probe_images.astype(np.float32)
        self.every_n_steps = every_n_steps
        self.histogram_every_n_epochs = histogram_every_n_epochs
        self.step = 0
        self.val_images = self.val_labels = None
        self.val_batch_size = self.val_every_n_steps = 0

    def watch_validation(
        self, images: np.ndarray, labels: np.ndarray, batch_size: int, every_n_steps: int
    ) -> None:
        """Also write the loss and accuracy of one validation batch every n steps.

        As the tutorial did: its validation curve came from a batch, not the whole split.
        The batches are taken in turn, so the curve covers the whole split over time.
        """
        self.val_images, self.val_labels = images, labels
        self.val_batch_size, self.val_every_n_steps = batch_size, every_n_steps

    def on_train_begin(self, logs: dict | None = None) -> None:
        self.step = int(self.model.optimizer.iterations)
        self.layers = [layer for layer in self.model.layers if layer.weights]
        self.probe = keras.Model(self.model.input, [layer.output for layer in self.layers])
        with self.train_writer.as_default():
            samples = self.probe_images[:9, :, :, None].astype(np.uint8)
            tf.summary.image("input/samples", samples, step=0, max_outputs=9)
        self._write_graph()
        self._write_histograms(step=0)

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        before, self.step = self.step, int(self.model.optimizer.iterations)
        if logs and passed_multiple(before, self.step, self.every_n_steps):
            with self.train_writer.as_default():
                tf.summary.scalar("batch_loss", float(logs["loss"]), step=self.step)
                tf.summary.scalar("batch_accuracy", float(logs["accuracy"]), step=self.step)
                rate = float(self.model.optimizer.learning_rate)  # of the next step
                tf.summary.scalar("batch_learning_rate", rate, step=self.step)
        if self.val_every_n_steps and passed_multiple(before, self.step, self.val_every_n_steps):
            self._write_validation_batch()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = logs or {}
        for writer, prefix in ((self.train_writer, ""), (self.val_writer, "val_")):
            with writer.as_default():
                for name in ("loss", "accuracy"):
                    if prefix + name in logs:
                        tf.summary.scalar(f"epoch_{name}", logs[prefix + name], step=epoch)
        with self.train_writer.as_default():
            rate = self.model.optimizer.learning_rate  # of the next step, as Keras logs it
            tf.summary.scalar("epoch_learning_rate", float(rate), step=epoch)
        if (epoch + 1) % self.histogram_every_n_epochs == 0:
            self._write_histograms(step=epoch + 1)
        self.train_writer.flush()
        self.val_writer.flush()

    def on_train_end(self, logs: dict | None = None) -> None:
        self.train_writer.close()
        self.val_writer.close()

    def _write_validation_batch(self) -> None:
        batches = -(-len(self.val_images) // self.val_batch_size)
        start = (self.step // self.val_every_n_steps - 1) % batches * self.val_batch_size
        images = self.val_images[start : start + self.val_batch_size].astype(np.float32)
        labels = self.val_labels[start : start + self.val_batch_size]
        logits = self.model(images, training=False)
        loss = keras.ops.mean(
            keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
        )
        accuracy = np.mean(np.argmax(logits, axis=1) == labels)
        with self.val_writer.as_default():
            tf.summary.scalar("batch_loss", float(loss), step=self.step)
            tf.summary.scalar("batch_accuracy", float(accuracy), step=self.step)

    def _write_graph(self) -> None:
        forward = tf.function(lambda images: self.model(images, training=False))
        tf.summary.trace_on(graph=True)
        forward(self.probe_images[:1])
        with self.train_writer.as_default():
            tf.summary.trace_export("model", step=0)

    def _write_histograms(self, step: int) -> None:
        # training=False: activations as the model predicts, without dropout's noise.
        activations = self.probe(self.probe_images, training=False)
        with self.train_writer.as_default():
            for layer, activation in zip(self.layers, activations, strict=True):
                kernel, bias = layer.weights[0], layer.weights[1]
                write_histogram(f"{layer.name}/weights", kernel, step)
                write_histogram(f"{layer.name}/biases", bias, step)
                write_histogram(f"{layer.name}/activations", activation, step)


def write_histogram(name: str, values: object, step: int) -> None:
    """Write a histogram summary in the form TensorBoard's histogram dashboard reads.

    tf.summary.histogram (TensorBoard 2.21) compares every value with every bucket in a
    float64 matrix: 1.5 GB and a second of CPU for conv1's activations on the probe
    batch. tf.histogram_fixed_width counts the same equal-width buckets in one pass
    over the float32 values, about 4x faster than np.histogram on a float64 copy.
    """
    flat = tf.reshape(tf.convert_to_tensor(values), [-1])
    finite = tf.math.is_finite(flat)
    if not bool(tf.reduce_all(finite)):
        flat = tf.boolean_mask(flat, finite)  # a diverging run still gets its other summaries
    if flat.shape[0] == 0:
        return
    low, high = float(tf.reduce_min(flat)), float(tf.reduce_max(flat))
    if low == high:  # one value (biases at the start): one bucket of width 1, as NumPy's
        low, high = low - 0.5, high + 0.5
    counts = tf.histogram_fixed_width(flat, tf.constant([low, high], flat.dtype), HISTOGRAM_BINS)
    edges = np.linspace(low, high, HISTOGRAM_BINS + 1)
    buckets = np.stack([edges[:-1], edges[1:], counts.numpy().astype(np.float64)], axis=1)
    metadata = histogram_metadata.create_summary_metadata(display_name=name, description="")
    tf.summary.write(name, tf.constant(buckets), step=step, metadata=metadata)


class MlflowMetrics(keras.callbacks.Callback):
    """Train and validation metrics per epoch, and running train metrics every n steps."""

    def __init__(self, run_id: str, every_n_steps: int):
        super().__init__()
        self.run_id = run_id
        self.every_n_steps = every_n_steps
        self.step = 0
        self.pending: list[tuple[str, float, int]] = []

    def on_train_begin(self, logs: dict | None = None) -> None:
        self.step = int(self.model.optimizer.iterations)

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        before, self.step = self.step, int(self.model.optimizer.iterations)
        if logs and passed_multiple(before, self.step, self.every_n_steps):
            self.pending.append(("train/batch_loss", float(logs["loss"]), self.step))
            self.pending.append(("train/batch_accuracy", float(logs["accuracy"]), self.step))
            rate = float(self.model.optimizer.learning_rate)  # of the next step
            self.pending.append(("train/batch_learning_rate", rate, self.step))

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = logs or {}
        for key, name in (
            ("loss", "train/loss"),
            ("accuracy", "train/accuracy"),
            ("val_loss", "val/loss"),
            ("val_accuracy", "val/accuracy"),
        ):
            if key in logs:
                self.pending.append((name, float(logs[key]), epoch + 1))
        rate = float(self.model.optimizer.learning_rate)  # of the next step
        self.pending.append(("train/learning_rate", rate, epoch + 1))
        tracking.log_metric_points(self.run_id, self.pending)
        self.pending = []


class StopAfterSteps(keras.callbacks.Callback):
    """End training after a number of optimizer steps, part-way through an epoch if need be."""

    def __init__(self, max_steps: int):
        super().__init__()
        self.max_steps = max_steps

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if int(self.model.optimizer.iterations) >= self.max_steps:
            # Keras finishes the epoch's bookkeeping (validation, callbacks), then stops.
            self.model.stop_training = True


class StopOnNaN(keras.callbacks.TerminateOnNaN):
    """Stop at the first non-finite loss and remember it, so the run can be failed."""

    diverged_at: int | None = None

    def on_batch_end(self, batch: int, logs: dict | None = None) -> None:
        loss = (logs or {}).get("loss")
        if loss is not None and not np.isfinite(loss):
            self.diverged_at = batch
        super().on_batch_end(batch, logs)
