"""MLflow: where runs are stored, how a run starts and resumes, and what it is tagged with.

The default store is the SQLite database `mlflow.db` at the project root, which is also
what `mlflow ui` opens when started there; MLFLOW_TRACKING_URI points elsewhere. The
train stage opens the run and the evaluate stage resumes it, so one pipeline run is one
MLflow run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import time
import urllib.error
import urllib.request
from importlib import metadata
from pathlib import Path

import mlflow
import yaml
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from sqlalchemy.exc import SQLAlchemyError

from pipeline.config import PROJECT_ROOT, PipelineConfig
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

RUN_FILE = "run.json"  # in paths.models_dir: which MLflow run made the model
CODE = ("--", ".", ":(exclude)dvc.lock", ":(exclude)reports")  # what git.dirty looks at
PACKAGES = ("tensorflow-cpu", "keras", "mlflow", "dvc", "hydra-core", "numpy", "pandas")


class TrackingError(PipelineError):
    """The MLflow store cannot be reached or used."""


def tracking_root() -> Path:
    """The project folder that holds the MLflow store and the TensorBoard logs.

    DVC runs a queued experiment in a temporary copy of the project and points DVC_ROOT
    at the original, so its run is recorded in the project's store, not in the copy.
    """
    return Path(os.environ.get("DVC_ROOT") or PROJECT_ROOT)


def local_path(relative: str) -> Path:
    """Resolve a `tracking.*` folder against the tracking root."""
    return tracking_root() / relative


def tracking_uri(cfg: PipelineConfig) -> str:
    """MLFLOW_TRACKING_URI, else `tracking.tracking_uri`, else the project's SQLite store."""
    configured = os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking.tracking_uri
    return configured or f"sqlite:///{tracking_root() / 'mlflow.db'}"


def _check_server(uri: str) -> None:
    """Fail in seconds, not after MLflow's minutes of retries, when a server is down."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5):
            pass
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise TrackingError(
            f"MLflow tracking server {uri} is unreachable ({reason}). Start it, or unset "
            "MLFLOW_TRACKING_URI to record into the project's mlflow.db."
        ) from None


def use_store(cfg: PipelineConfig) -> str:
    """Point MLflow at the store, failing at once when its server is down; return its URI."""
    uri = tracking_uri(cfg)
    _check_server(uri)
    mlflow.set_tracking_uri(uri)
    return uri


def check_run(run_id: str) -> None:
    """Fail with a clear message when the store does not hold `run_id`."""
    try:
        mlflow.get_run(run_id)
    except (MlflowException, SQLAlchemyError) as error:
        raise TrackingError(
            f"MLflow run {run_id} (from {RUN_FILE}) is not in the store "
            f"{mlflow.get_tracking_uri()}: {str(error).splitlines()[0]}; "
            "rerun the train stage (dvc repro -f train)"
        ) from None


def connect(cfg: PipelineConfig) -> str:
    """Point MLflow at the store and return the experiment id, creating it if needed."""
    uri = use_store(cfg)
    name = cfg.tracking.experiment_name
    try:
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is None:
            # An explicit artifact root: MLflow would otherwise resolve ./mlruns against
            # whatever the working directory happens to be.
            location = local_path(cfg.tracking.artifact_dir).resolve().as_uri()
            try:
                return mlflow.create_experiment(name, artifact_location=location)
            except MlflowException:  # created meanwhile by a parallel job
                experiment = mlflow.get_experiment_by_name(name)
        return experiment.experiment_id
    except MlflowException as error:
        raise TrackingError(f"MLflow store {uri}: {error.message}") from None
    except SQLAlchemyError as error:
        raise TrackingError(
            f"MLflow store {uri} cannot be used: {str(error).splitlines()[0]}"
        ) from None


def _git(*args: str) -> str:
    try:
        result = subprocess.run(
            ["git", *args],
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return result.stdout.strip()


def dvc_hashes() -> dict[str, str]:
    """The md5 that dvc.lock records for each stage output: the data's identity."""
    lock_file = PROJECT_ROOT / "dvc.lock"
    if not lock_file.is_file():
        return {}
    lock = yaml.safe_load(lock_file.read_text(encoding="utf-8")) or {}
    hashes = {}
    for stage in ("download", "preprocess"):
        for out in lock.get("stages", {}).get(stage, {}).get("outs", []):
            hashes[f"dvc.md5.{out['path']}"] = out.get("md5", "")
    return hashes


def run_tags(cfg: PipelineConfig) -> dict[str, str]:
    """Tags that say what made a run: code revision, data hashes, package versions."""
    tags = {
        "git.commit": _git("rev-parse", "HEAD") or "unknown",
        # Code and config only: `dvc repro` itself rewrites dvc.lock and the reports.
        "git.dirty": str(bool(_git("status", "--porcelain", "--untracked-files=no", *CODE))),
        **dvc_hashes(),
        **cfg.tracking.tags,
    }
    # Set by `dvc exp run`, in the workspace and in queued temporary copies alike.
    for variable, tag in (
        ("DVC_EXP_NAME", "dvc.experiment"),
        ("DVC_EXP_BASELINE_REV", "dvc.baseline"),
    ):
        if os.environ.get(variable):
            tags[tag] = os.environ[variable]
    for package in PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            tags[f"version.{package}"] = metadata.version(package)
    return tags


def save_run_id(models_dir: Path, run: mlflow.ActiveRun) -> None:
    """Record which run made the model, for the evaluate stage."""
    from pipeline.files import write_json

    write_json(
        models_dir / RUN_FILE, {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id}
    )


def load_run_id(models_dir: Path) -> str:
    """The id of the MLflow run that trained the model in `models_dir`."""
    path = models_dir / RUN_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))["run_id"]
    except (OSError, ValueError, KeyError) as error:
        raise TrackingError(f"{path}: no run id ({error}); run the train stage first") from None


def log_metric_points(run_id: str, points: list[tuple[str, float, int]]) -> None:
    """Log many (name, value, step) points in one request."""
    if not points:
        return
    now = int(time.time() * 1000)
    metrics = [Metric(name, float(value), now, step) for name, value, step in points]
    client = mlflow.MlflowClient()
    for start in range(0, len(metrics), 1000):  # MLflow accepts up to 1,000 per batch
        client.log_batch(run_id, metrics=metrics[start : start + 1000], synchronous=True)
