"""evaluate stage: score the trained model on the test split and finish its MLflow run.

Writes `reports/metrics.json` (for `dvc metrics show`), per-class precision, recall
and F1 (a pandas table as CSV), the test predictions (the confusion matrix source for
`dvc plots`), a confusion matrix heat map and a grid of misclassified digits.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from pipeline import cli, data, files, plots, registry, tracking
from pipeline.config import PipelineConfig
from pipeline.model import load_model

log = logging.getLogger(__name__)


def softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean cross-entropy of integer labels under softmax(logits), computed stably."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(labels)), labels].mean())


def per_class_report(labels: np.ndarray, predicted: np.ndarray, classes: int) -> pd.DataFrame:
    """Precision, recall, F1 and support of each class, one row per digit."""
    matrix = confusion(labels, predicted, classes)
    hits = np.diag(matrix).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.nan_to_num(hits / matrix.sum(axis=0))
        recall = np.nan_to_num(hits / matrix.sum(axis=1))
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
    return pd.DataFrame(
        {
            "digit": range(classes),
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "support": matrix.sum(axis=1),
        }
    )


def confusion(labels: np.ndarray, predicted: np.ndarray, classes: int) -> np.ndarray:
    """Counts of (true, predicted) pairs: rows are true digits."""
    return np.bincount(labels * classes + predicted, minlength=classes * classes).reshape(
        classes, classes
    )


def write_reports(
    cfg: PipelineConfig,
    images: np.ndarray,
    labels: np.ndarray,
    predicted: np.ndarray,
    report: pd.DataFrame,
) -> Path:
    """Write the tables and figures of the evaluation; return their folder."""
    eval_dir = cfg.path(cfg.paths.reports_dir) / "eval"
    with files.staged_file(eval_dir / "classes.csv") as temporary:
        report.to_csv(temporary, index=False, float_format="%.4f")
    with files.staged_file(eval_dir / "predictions.csv") as temporary:
        pd.DataFrame({"actual": labels, "predicted": predicted}).to_csv(temporary, index=False)
    plots.confusion_matrix(
        confusion(labels, predicted, cfg.data.num_classes), eval_dir / "confusion_matrix.png"
    )
    wrong = np.flatnonzero(labels != predicted)[: cfg.evaluate.misclassified_grid**2]
    plots.digit_grid(
        images[wrong],
        [f"true {labels[i]}, pred {predicted[i]}" for i in wrong],
        eval_dir / "misclassified.png",
        columns=cfg.evaluate.misclassified_grid,
    )
    return eval_dir


def run(cfg: PipelineConfig, register: bool = True) -> dict:
    """Evaluate the model on the test split and log the results to its MLflow run.

    With `register`, the model also becomes the newest version of `registry.model_name`,
    with the alias `challenger`.
    """
    models_dir = cfg.path(cfg.paths.models_dir)
    model = load_model(models_dir)
    run_id = tracking.load_run_id(models_dir)
    # The store first: nothing is written when the results could not be recorded.
    tracking.connect(cfg)
    tracking.check_run(run_id)
    images, labels = data.load_split(cfg.path(cfg.paths.processed_dir), "test")

    logits = model.predict(data.dataset(images, labels, cfg.evaluate.batch_size), verbose=0)
    predicted = logits.argmax(axis=1)
    labels = labels.astype(np.int64)
    report = per_class_report(labels, predicted, cfg.data.num_classes)
    metrics = {
        "test": {
            "loss": round(softmax_cross_entropy(logits, labels), 6),
            "accuracy": round(float((predicted == labels).mean()), 6),
            "errors": int((predicted != labels).sum()),
            "macro_f1": round(float(report["f1"].mean()), 6),
        }
    }
    log.info(
        "test: accuracy %.4f, loss %.4f, %d of %d wrong",
        metrics["test"]["accuracy"],
        metrics["test"]["loss"],
        metrics["test"]["errors"],
        len(labels),
    )

    eval_dir = write_reports(cfg, images, labels, predicted, report)
    metrics_file = cfg.path(cfg.paths.reports_dir) / "metrics.json"
    files.write_json(metrics_file, metrics)

    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics({f"test/{name}": value for name, value in metrics["test"].items()})
        mlflow.log_metrics({f"test/f1_digit_{row.digit}": row.f1 for row in report.itertuples()})
        mlflow.log_artifacts(str(eval_dir), "eval")
        mlflow.log_artifact(str(metrics_file))
        run_tags = mlflow.get_run(run_id).data.tags
    log.info("results logged to MLflow run %s", run_id)

    if register and os.environ.get("DVC_EXP_NAME"):
        # An experiment is for comparing; only the workspace's pipeline feeds the registry.
        log.info("DVC experiment %s: the model is not registered", os.environ["DVC_EXP_NAME"])
    elif register:
        version_tags = {f"test/{name}": str(value) for name, value in metrics["test"].items()}
        version_tags |= {tag: value for tag, value in run_tags.items() if tag.startswith("dvc.")}
        registry.register(cfg, run_id, version_tags)
    return metrics


if __name__ == "__main__":
    cli.main(run)
