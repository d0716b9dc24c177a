"""Shared fixtures: the real MNIST slice in tests/data and configs that write to tmp_path."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import config
from pipeline.config import PROJECT_ROOT, PipelineConfig

SLICE_DIR = PROJECT_ROOT / "tests" / "data" / "mnist-slice"
# The slice holds 1,500 training images: 300 become the validation split.
SLICE_OVERRIDES = ["data=mnist_slice", "preprocess.val_size=300", "train.epochs=1"]


def tmp_overrides(tmp_path: Path) -> list[str]:
    """Overrides that send every output of the pipeline into tmp_path."""
    return [
        f"paths.raw_dir={tmp_path}/data/raw",
        f"paths.processed_dir={tmp_path}/data/processed",
        f"paths.models_dir={tmp_path}/models",
        f"paths.reports_dir={tmp_path}/reports",
        f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
        f"tracking.artifact_dir={tmp_path}/mlartifacts",
        f"tracking.tensorboard_dir={tmp_path}/logs",
    ]


def make_config(tmp_path: Path, *overrides: str) -> PipelineConfig:
    """The slice config, writing into tmp_path, with extra Hydra overrides."""
    composed = config.compose([*SLICE_OVERRIDES, *tmp_overrides(tmp_path), *overrides])
    return config.validate(composed)


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never use the developer's mirror or tracking server."""
    for name in ("MNIST_MIRROR", "MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "DVC_EXP_NAME"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def slice_cfg(tmp_path: Path) -> PipelineConfig:
    """The slice config with every output in tmp_path."""
    return make_config(tmp_path)
