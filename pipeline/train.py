"""train stage: fit the CNN on the training split and record the run in MLflow.

Reads `data/processed`, writes the model and the id of its MLflow run to
`paths.models_dir`, the per-epoch history to `reports/train`, and a TensorBoard folder
per run to `tracking.tensorboard_dir`. Returns the last validation accuracy, which is
what Hydra sweeps and the Optuna search maximise.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from unittest import mock

import keras
import mlflow
import numpy as np
import pandas as pd
import tensorflow as tf

from pipeline import cli, config, data, files, plots, summaries, sweep, tracking
from pipeline.config import PipelineConfig
from pipeline.errors import PipelineError
from pipeline.model import MODEL_FILE, build_model, compile_model, detach_schedule

log = logging.getLogger(__name__)

HISTOGRAM_PROBE_SIZE = 256  # validation images whose activations are histogrammed


class TrainingDiverged(PipelineError):
    """The loss became NaN or infinite."""


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and TensorFlow and make TensorFlow's kernels deterministic."""
    # The jobs of a sweep may share a process: each starts from a fresh Keras state.
    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    # Same seed, config and data, same weights: TensorFlow then picks deterministic
    # kernels (and raises for ops that have none) instead of the fastest ones.
    tf.config.experimental.enable_op_determinism()


def check_data(cfg: PipelineConfig, images: np.ndarray, labels: np.ndarray) -> None:
    """Fail clearly when the prepared data does not match `data.image_size`/`num_classes`."""
    size, classes = cfg.data.image_size, cfg.data.num_classes
    if images.shape[1:] != (size, size) or (len(labels) and labels.max() >= classes):
        raise PipelineError(
            f"{cfg.paths.processed_dir} holds {images.shape[1]}x{images.shape[2]} images "
            f"with labels up to {labels.max()}, but data.image_size is {size} and "
            f"data.num_classes {classes}; rerun the preprocess stage (dvc repro)"
        )


def step_counts(cfg: PipelineConfig, train_count: int) -> tuple[int, int, int]:
    """Steps per epoch, optimizer steps in all, and Keras epochs to run them in.

    `train.max_steps`, when set, replaces `train.epochs` and may end part-way through
    the last epoch.
    """
    steps_per_epoch = math.ceil(train_count / cfg.train.batch_size)
    total_steps = cfg.train.max_steps or steps_per_epoch * cfg.train.epochs
    return steps_per_epoch, total_steps, math.ceil(total_steps / steps_per_epoch)


def execution_steps(cfg: PipelineConfig, steps_per_epoch: int, total_steps: int) -> int:
    """`train.steps_per_execution`, lowered if need be to divide every step count that
    callbacks act on: the epoch, `train.max_steps` part-way through the last epoch,
    and the logging intervals.

    Keras runs an epoch in calls of that many steps (the last one shorter) and calls
    the batch callbacks between calls only, so a call that spanned one of these
    counts would log a step late or stop training a few steps past `train.max_steps`.
    """
    counts = (
        steps_per_epoch,
        total_steps % steps_per_epoch,
        cfg.train.log_every_n_steps,
        cfg.train.val_every_n_steps,
    )
    return math.gcd(cfg.train.steps_per_execution, *counts)


def callbacks(
    cfg: PipelineConfig,
    run_id: str,
    log_dir: Path,
    val_images: np.ndarray,
    val_labels: np.ndarray,
) -> list[keras.callbacks.Callback]:
    """The NaN guard, the step limit, TensorBoard summaries and MLflow metrics."""
    tensorboard = summaries.TensorBoardSummaries(
        log_dir,
        val_images[:HISTOGRAM_PROBE_SIZE],
        cfg.train.log_every_n_steps,
        cfg.train.histogram_every_n_epochs,
    )
    if cfg.train.val_every_n_steps:
        tensorboard.watch_validation(
            val_images, val_labels, cfg.train.batch_size, cfg.train.val_every_n_steps
        )
    limit = [summaries.StopAfterSteps(cfg.train.max_steps)] if cfg.train.max_steps else []
    return [
        summaries.StopOnNaN(),
        *limit,
        tensorboard,
        summaries.MlflowMetrics(run_id, cfg.train.log_every_n_steps),
    ]


def save_history(history: keras.callbacks.History, reports_dir: Path) -> dict:
    """Write the per-epoch curves as CSV (for `dvc plots`) and PNG (for people)."""
    curves = {
        "epoch": [epoch + 1 for epoch in history.epoch],
        "train_loss": history.history["loss"],
        "train_accuracy": history.history["accuracy"],
        "val_loss": history.history["val_loss"],
        "val_accuracy": history.history["val_accuracy"],
    }
    with files.staged_file(reports_dir / "history.csv") as temporary:
        pd.DataFrame(curves).to_csv(temporary, index=False, float_format="%.6f")
    plots.training_curves(curves, reports_dir / "curves.png")
    return curves


def log_model(model: keras.Model, example: np.ndarray) -> None:
    """Log the model in the native Keras format with its signature and an input example."""
    example = example.astype(np.float32)
    signature = mlflow.models.infer_signature(example, model.predict(example, verbose=0))
    # Explicit requirements: inferring them would import the model in a subprocess.
    requirements = [
        f"{package}=={version}"
        for package, version in (
            ("tensorflow-cpu", tf.__version__),
            ("keras", keras.__version__),
            ("mlflow", mlflow.__version__),
        )
    ]
    with _model_folder_created_first():
        mlflow.keras.log_model(
            model,
            name="model",
            signature=signature,
            input_example=example,
            pip_requirements=requirements,
        )


@contextlib.contextmanager
def _model_folder_created_first() -> Iterator[None]:
    """Work around the Keras flavour writing the input example before the model folder.

    Upstream issue: https://github.com/mlflow/mlflow/issues/16183 (MLflow 3.17 too).
    """
    from mlflow.keras import save

    original = save._save_example

    def save_example(mlflow_model: object, example: object, path: str, *args, **kwargs):
        os.makedirs(path, exist_ok=True)
        return original(mlflow_model, example, path, *args, **kwargs)

    with mock.patch.object(save, "_save_example", save_example):
        yield


def run(cfg: PipelineConfig) -> float:
    """Train, save and track the model; return the final validation accuracy."""
    seed_everything(cfg.seed)

    processed_dir = cfg.path(cfg.paths.processed_dir)
    train_images, train_labels = data.load_split(processed_dir, "train")
    val_images, val_labels = data.load_split(processed_dir, "val")
    train_set = data.dataset(
        train_images,
        train_labels,
        cfg.train.batch_size,
        shuffle_buffer=cfg.train.shuffle_buffer,
        seed=cfg.seed,
    )
    val_set = data.dataset(val_images, val_labels, cfg.train.batch_size)
    check_data(cfg, train_images, train_labels)
    steps_per_epoch, total_steps, epochs = step_counts(cfg, len(train_images))
    log.info(
        "data: %d train and %d validation images, %d steps per epoch, %d steps",
        len(train_images),
        len(val_images),
        steps_per_epoch,
        total_steps,
    )

    execution = execution_steps(cfg, steps_per_epoch, total_steps)
    if execution != cfg.train.steps_per_execution:
        log.info(
            "train.steps_per_execution: %d steps per call instead of %d, to divide the "
            "steps per epoch, train.max_steps, train.log_every_n_steps and "
            "train.val_every_n_steps",
            execution,
            cfg.train.steps_per_execution,
        )
    model = build_model(cfg.model, cfg.data.image_size, cfg.data.num_classes)
    compile_model(model, cfg.optimizer, total_steps, steps_per_epoch, execution)
    log.info("model: %s, %d parameters", cfg.model.name, model.count_params())

    experiment_id = tracking.connect(cfg)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    tags = {**tracking.run_tags(cfg), **sweep.job_tags()}
    # Named explicitly: MLflow's generated names come from `random`, which is seeded.
    run_name = tags.pop("mlflow.runName", f"{cfg.model.name}-{stamp}")
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags) as run:
        run_id = run.info.run_id
        mlflow.log_params(config.flatten(cfg))
        # What Keras ran, when train.steps_per_execution had to be lowered.
        mlflow.set_tag("keras.steps_per_execution", str(execution))
        mlflow.log_text(config.to_yaml(cfg), "config.yaml")
        log_dir = tracking.local_path(cfg.tracking.tensorboard_dir) / f"{stamp}-{run_id[:8]}"
        log.info("tracking: MLflow run %s, TensorBoard %s", run_id, log_dir)

        started = time.perf_counter()
        nan_guard, *others = callbacks(cfg, run_id, log_dir, val_images, val_labels)
        history = model.fit(
            train_set,
            validation_data=val_set,
            epochs=epochs,
            callbacks=[nan_guard, *others],
            shuffle=False,
            verbose=2,
        )
        seconds = time.perf_counter() - started
        if nan_guard.diverged_at is not None:
            raise TrainingDiverged(
                f"training loss became NaN or infinite by step {nan_guard.diverged_at + 1} "
                f"of epoch {len(history.epoch)}; lower optimizer.lr "
                f"(now {cfg.optimizer.lr}) or check the data"
            )
        images_seen = min(total_steps * cfg.train.batch_size, len(train_images) * epochs)
        mlflow.log_metrics(
            {"train/seconds": seconds, "train/images_per_second": images_seen / seconds}
        )
        log.info(
            "trained %d steps in %.0f s (%.0f images/s)",
            total_steps,
            seconds,
            images_seen / seconds,
        )

        models_dir = cfg.path(cfg.paths.models_dir)
        detach_schedule(model)
        with files.staged_file(models_dir / MODEL_FILE) as temporary:
            model.save(temporary)
        tracking.save_run_id(models_dir, run)
        reports_dir = cfg.path(cfg.paths.reports_dir) / "train"
        save_history(history, reports_dir)
        mlflow.log_artifacts(str(reports_dir), "train")
        mlflow.log_artifacts(str(log_dir), "tensorboard")
        log_model(model, val_images[:2])
        log.info("model saved to %s", models_dir / MODEL_FILE)
    return float(history.history["val_accuracy"][-1])


if __name__ == "__main__":
    cli.main(run, job_outputs=True)
