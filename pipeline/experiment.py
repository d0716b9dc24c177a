"""A direct run or a sweep job: train, then evaluate on the test split, in one MLflow run.

`python -m pipeline.experiment` composes `conf/` with Hydra overrides and runs the train
and evaluate stages on the data that `dvc repro` prepared. The model and the reports go
into the Hydra job's folder, so sweeps never touch what DVC tracks, and every job's
MLflow run holds test metrics to compare. Returns the validation accuracy, which is
what sweeps and the Optuna search maximise.

    python -m pipeline.experiment optimizer.lr=1e-3
    python -m pipeline.experiment -m optimizer.lr=1e-2,1e-3,1e-4
"""

from __future__ import annotations

from pipeline import cli, evaluate, train
from pipeline.config import PipelineConfig


def run(cfg: PipelineConfig) -> float:
    """Train and evaluate; return the final validation accuracy."""
    val_accuracy = train.run(cfg)
    # Sweep jobs are compared in MLflow, not entered into the model registry.
    evaluate.run(cfg, register=False)
    return val_accuracy


if __name__ == "__main__":
    cli.main(run, job_outputs=True)
