"""MLflow's model registry: every pipeline model is a version, two aliases say which one.

`challenger` is the newest model the DVC pipeline evaluated; `champion` is the model in
use, moved only by `python -m pipeline.retrain` when a challenger beats it. Serve or
load either as `models:/<registry.model_name>@champion`.
"""

from __future__ import annotations

import logging

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from pipeline.config import PipelineConfig
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

CHALLENGER = "challenger"
CHAMPION = "champion"


def model_uri(cfg: PipelineConfig, alias: str = CHAMPION) -> str:
    """The URI that loads or serves the registered model with this alias."""
    return f"models:/{cfg.registry.model_name}@{alias}"


def register(cfg: PipelineConfig, run_id: str, tags: dict[str, str]) -> ModelVersion:
    """Register the model that `run_id` logged as a new version, alias it `challenger`.

    A run is registered once: evaluating it again (new evaluate parameters, a forced
    `dvc repro`) updates the tags of its version instead of adding a version that a
    retrain would then judge against itself.
    """
    client = mlflow.MlflowClient()
    name = cfg.registry.model_name
    existing = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if existing:
        version = existing[0]
        for key, value in tags.items():
            client.set_model_version_tag(name, version.version, key, value)
        client.set_registered_model_alias(name, CHALLENGER, version.version)
        log.info(
            "%s version %s (run %s) is again the %s", name, version.version, run_id, CHALLENGER
        )
        return version
    run = client.get_run(run_id)
    models = client.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run_id}'",
    )
    if not models:
        raise PipelineError(f"MLflow run {run_id} logged no model; rerun the train stage")
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(
            name, description="The MNIST CNN of this project's DVC pipeline."
        )
    version = client.create_model_version(
        name, source=models[0].model_uri, run_id=run_id, tags=tags, await_creation_for=0
    )
    client.set_registered_model_alias(name, CHALLENGER, version.version)
    log.info("registered %s version %s as %s", name, version.version, CHALLENGER)
    return version


def version_with_alias(cfg: PipelineConfig, alias: str) -> ModelVersion | None:
    """The version that carries `alias`, or None when no version does."""
    try:
        return mlflow.MlflowClient().get_model_version_by_alias(cfg.registry.model_name, alias)
    except MlflowException:
        return None


def promote(cfg: PipelineConfig, version: str) -> None:
    """Make `version` the champion."""
    mlflow.MlflowClient().set_registered_model_alias(cfg.registry.model_name, CHAMPION, version)
    log.info("%s version %s is now the %s", cfg.registry.model_name, version, CHAMPION)
