"""Shared fixtures: the real MNIST slice in tests/data and configs that write to tmp_path."""

from __future__ import annotations

import os
import shutil
import subprocess
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


def run_in(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run a command in `cwd` without the developer's MLflow and mirror settings; must pass."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "MNIST_"))}
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def copy_project(destination: Path) -> Path:
    """Copy the files git tracks into a fresh git repository, as a clone would have them."""
    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=PROJECT_ROOT, check=True, capture_output=True, text=True
    ).stdout.split("\0")
    for name in filter(None, tracked):
        source = PROJECT_ROOT / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    for args in (
        ["git", "init", "-q"],
        ["git", "add", "-A"],
        [
            "git",
            "-c",
            "user.name=test",
            "-c",
            "user.email=test@example.com",
            "commit",
            "-qm",
            "copy",
        ],
    ):
        run_in(args, destination)
    return destination
