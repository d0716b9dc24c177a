"""Hydra multirun sweeps as one MLflow parent run with one child run per job.

`MlflowSweep` is a Hydra callback (listed under `hydra.callbacks` in `conf/config.yaml`).
Before any job starts it creates the MLflow store, the experiment and the parent run,
so that parallel jobs neither race to create the SQLite schema nor open runs of their
own at the top level. Each job finds the parent's id in the sweep folder and tags its
run as a child. When the sweep ends, the parent records the best job and ends FINISHED;
when a failed job aborts the sweep, it still records what finished and ends FAILED.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
from datetime import datetime
from pathlib import Path
from typing import Any

import mlflow
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from pipeline import config, files, tracking

log = logging.getLogger(__name__)

PARENT_FILE = "mlflow_parent_run.json"  # in the sweep folder: the parent run's id
OBJECTIVE = "val/accuracy"  # what the train stage returns and the sweeps maximise


def _pipeline_config(hydra_config: DictConfig) -> config.PipelineConfig:
    """The sweep's base config (no sweep overrides applied), validated."""
    container = OmegaConf.to_container(hydra_config, resolve=False)
    container.pop("hydra", None)
    return config.validate(container)


class MlflowSweep(Callback):
    """Open a parent run before the jobs of a multirun and summarise them at the end."""

    def __init__(self) -> None:
        self.parent_id: str | None = None
        self.experiment_id: str | None = None
        self.sweep_dir: Path | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        cfg = _pipeline_config(config)
        self.experiment_id = tracking.connect(cfg)
        self.sweep_dir = Path(config.hydra.sweep.dir)
        overrides = list(config.hydra.overrides.task)
        tags = {
            **tracking.run_tags(cfg),
            "sweep.overrides": " ".join(overrides),
            "sweep.sweeper": str(config.hydra.sweeper._target_).rsplit(".", 1)[-1],
            "sweep.launcher": str(config.hydra.launcher._target_).rsplit(".", 1)[-1],
            "sweep.dir": str(self.sweep_dir),
        }
        run_name = f"sweep-{datetime.now():%Y%m%d-%H%M%S}"
        parent = mlflow.MlflowClient().create_run(self.experiment_id, run_name=run_name, tags=tags)
        self.parent_id = parent.info.run_id
        files.write_json(
            self.sweep_dir / PARENT_FILE, {"run_id": self.parent_id, "run_name": run_name}
        )
        # A failed job makes Hydra's basic sweeper raise once the batch is done, and then
        # on_multirun_end never comes: the parent must still end, and not as RUNNING.
        atexit.register(self.finish, "FAILED")
        log.info("sweep: MLflow parent run %s (%s)", self.parent_id, " ".join(overrides))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self.finish("FINISHED")

    def finish(self, status: str) -> None:
        """Record the jobs' outcome and the best job on the parent, then end it."""
        if self.parent_id is None:
            return
        parent_id, self.parent_id = self.parent_id, None
        client = mlflow.MlflowClient()
        children = client.search_runs(
            [self.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'"
        )
        finished = [run for run in children if run.info.status == "FINISHED"]
        # Every job has a folder; a job whose config was invalid never opened a run.
        jobs = max(len(children), _job_folders(self.sweep_dir))
        failed = jobs - len(finished)
        client.log_metric(parent_id, "sweep/jobs", jobs)
        client.log_metric(parent_id, "sweep/failed_jobs", failed)
        scored = [run for run in finished if math.isfinite(_objective(run))]
        if scored:
            best = max(scored, key=_objective)
            client.set_tag(parent_id, "sweep.best_run_id", best.info.run_id)
            client.set_tag(
                parent_id, "sweep.best_overrides", best.data.tags.get("sweep.overrides", "")
            )
            client.log_metric(parent_id, f"best/{OBJECTIVE.replace('/', '_')}", _objective(best))
            log.info(
                "sweep: best job %s with %s %.4f (%s)",
                best.info.run_id,
                OBJECTIVE,
                _objective(best),
                best.data.tags.get("sweep.overrides", ""),
            )
        results = self.sweep_dir / "optimization_results.yaml" if self.sweep_dir else None
        if results is not None and results.is_file():  # written by the Optuna sweeper
            client.log_artifact(parent_id, str(results))
        client.set_terminated(parent_id, status)
        log.info(
            "sweep: %d jobs, %d finished, %d failed; parent run %s %s",
            jobs,
            len(finished),
            failed,
            parent_id,
            status,
        )


def _job_folders(sweep_dir: Path | None) -> int:
    if sweep_dir is None or not sweep_dir.is_dir():
        return 0
    return sum(1 for child in sweep_dir.iterdir() if child.is_dir() and child.name.isdigit())


def _objective(run: mlflow.entities.Run) -> float:
    return run.data.metrics.get(OBJECTIVE, -math.inf)


def job_tags() -> dict[str, str]:
    """Tags that make a multirun job's MLflow run a child of the sweep's parent run.

    `mlflow.runName` names the child after the parent and the job number.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return {}
    hydra_config = HydraConfig.get()
    tags = {
        "sweep.job": str(hydra_config.job.num),
        "sweep.overrides": " ".join(hydra_config.overrides.task),
    }
    parent_file = Path(hydra_config.sweep.dir) / PARENT_FILE
    if parent_file.is_file():  # absent when the MlflowSweep callback is not configured
        parent = json.loads(parent_file.read_text(encoding="utf-8"))
        tags["mlflow.parentRunId"] = parent["run_id"]
        tags["mlflow.runName"] = f"{parent['run_name']}-{hydra_config.job.num}"
    return tags
