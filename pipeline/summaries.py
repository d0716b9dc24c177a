"""Keras callbacks that record training: TensorBoard histograms and MLflow metrics.

TensorBoard gets what the tutorial logged: a histogram of every layer's weights,
biases and activations, and sample input images. MLflow gets the per-epoch train and
validation metrics and, every `train.log_every_n_steps`, the running train metrics,
buffered and written once per epoch so that tracking costs almost nothing.
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from pipeline import tracking


class LayerHistograms(keras.callbacks.Callback):
    """Histograms of each layer's weights, biases and activations on a fixed batch."""

    def __init__(self, log_dir: Path, probe_images: np.ndarray, every_n_epochs: int = 1):
        super().__init__()
        self.writer = tf.summary.create_file_writer(str(log_dir / "train"))
        self.probe_images = probe_images.astype(np.float32)
        self.every_n_epochs = every_n_epochs

    def on_train_begin(self, logs: dict | None = None) -> None:
        layers = [layer for layer in self.model.layers if layer.weights]
        self.layers = layers
        self.probe = keras.Model(self.model.input, [layer.output for layer in layers])
        with self.writer.as_default():
            samples = self.probe_images[:9, :, :, None].astype(np.uint8)
            tf.summary.image("input/samples", samples, step=0, max_outputs=9)
        self._write(step=0)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if (epoch + 1) % self.every_n_epochs == 0:
            self._write(step=epoch + 1)

    def on_train_end(self, logs: dict | None = None) -> None:
        self.writer.close()

    def _write(self, step: int) -> None:
        # training=False: activations as the model predicts, without dropout's noise.
        activations = self.probe(self.probe_images, training=False)
        with self.writer.as_default():
            for layer, activation in zip(self.layers, activations, strict=True):
                kernel, bias = layer.weights[0], layer.weights[1]
                tf.summary.histogram(f"{layer.name}/weights", kernel, step=step)
                tf.summary.histogram(f"{layer.name}/biases", bias, step=step)
                tf.summary.histogram(f"{layer.name}/activations", activation, step=step)
        self.writer.flush()


class MlflowMetrics(keras.callbacks.Callback):
    """Train and validation metrics per epoch, and running train metrics every n steps."""

    def __init__(self, run_id: str, every_n_steps: int):
        super().__init__()
        self.run_id = run_id
        self.every_n_steps = every_n_steps
        self.step = 0
        self.pending: list[tuple[str, float, int]] = []

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.step += 1
        if logs and self.step % self.every_n_steps == 0:
            self.pending.append(("train/batch_loss", float(logs["loss"]), self.step))
            self.pending.append(("train/batch_accuracy", float(logs["accuracy"]), self.step))

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = logs or {}
        for key, name in (
            ("loss", "train/loss"),
            ("accuracy", "train/accuracy"),
            ("val_loss", "val/loss"),
            ("val_accuracy", "val/accuracy"),
            ("learning_rate", "train/learning_rate"),
        ):
            if key in logs:
                self.pending.append((name, float(logs[key]), epoch + 1))
        tracking.log_metric_points(self.run_id, self.pending)
        self.pending = []


class StopOnNaN(keras.callbacks.TerminateOnNaN):
    """Stop at the first non-finite loss and remember it, so the run can be failed."""

    diverged_at: int | None = None

    def on_batch_end(self, batch: int, logs: dict | None = None) -> None:
        loss = (logs or {}).get("loss")
        if loss is not None and not np.isfinite(loss):
            self.diverged_at = batch
        super().on_batch_end(batch, logs)
