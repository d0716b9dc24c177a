"""Hydra multirun sweeps, Optuna, experiment configs, comparison and reproduction.

Every job trains for real on the MNIST slice, in a subprocess as users run it, with a
fresh SQLite store in tmp_path.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from conftest import SLICE_OVERRIDES, make_config, tmp_overrides
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from pipeline import compare, download, experiment, preprocess, reproduce
from pipeline.config import CONF_DIR, PROJECT_ROOT

TEST_CONF = Path(__file__).parent / "conf"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The slice downloaded and preprocessed once, for every sweep here."""
    root = tmp_path_factory.mktemp("prepared")
    cfg = make_config(root)
    # Module fixtures are set up before the autouse cleaner: clean here too.
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MNIST_MIRROR", raising=False)
        download.run(cfg)
    preprocess.run(cfg)
    return root


def sweep(root: Path, store: Path, *overrides: str, check: bool = True) -> str:
    """Run `python -m pipeline.experiment -m` on the slice; return its output."""
    outputs = [o for o in tmp_overrides(root) if not o.startswith("tracking.")]
    args = [
        sys.executable,
        "-m",
        "pipeline.experiment",
        "-m",
        "--config-dir",
        str(TEST_CONF),
        *SLICE_OVERRIDES,
        *outputs,
        f"tracking.tracking_uri=sqlite:///{store}/mlflow.db",
        f"tracking.artifact_dir={store}/mlartifacts",
        f"tracking.tensorboard_dir={store}/logs",
        f"hydra.sweep.dir={store}/multirun",
        *overrides,
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    result = subprocess.run(
        args, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def runs_of(store: Path) -> tuple[mlflow.MlflowClient, list, list]:
    """The client, the parent runs and the child runs of the store's experiment."""
    client = mlflow.MlflowClient(f"sqlite:///{store}/mlflow.db")
    experiment = client.get_experiment_by_name("mnist-cnn")
    runs = client.search_runs([experiment.experiment_id])
    parents = [run for run in runs if "sweep.sweeper" in run.data.tags]
    children = [run for run in runs if "mlflow.parentRunId" in run.data.tags]
    return client, parents, children


def test_basic_sweep_is_one_parent_with_a_finished_child_per_job(prepared, tmp_path):
    sweep(prepared, tmp_path, "train.max_steps=4", "optimizer.lr=1e-2,1e-3,1e-4")

    client, parents, children = runs_of(tmp_path)
    assert len(parents) == 1
    assert parents[0].info.status == "FINISHED"
    assert len(children) == 3
    assert {run.info.status for run in children} == {"FINISHED"}
    assert sorted(run.data.params["optimizer.lr"] for run in children) == [
        "0.0001",
        "0.001",
        "0.01",
    ]
    assert {run.data.tags["mlflow.parentRunId"] for run in children} == {parents[0].info.run_id}
    assert parents[0].data.tags["sweep.overrides"].endswith("optimizer.lr=1e-2,1e-3,1e-4")
    best = max(children, key=lambda run: run.data.metrics["val/accuracy"])
    assert parents[0].data.tags["sweep.best_run_id"] == best.info.run_id
    assert parents[0].data.metrics["best/val_accuracy"] == best.data.metrics["val/accuracy"]
    # Every job evaluated on the test split, into its own folder, not DVC's models/.
    assert all("test/accuracy" in run.data.metrics for run in children)
    assert (
        sorted(p.name for p in (tmp_path / "multirun").glob("*/models/model.keras"))
        == ["model.keras"] * 3
    )

    # The comparison lists exactly the parameter that differs, best first.
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    table = compare.comparison_table(
        compare.select_runs("mnist-cnn", sweep=parents[0].info.run_id), "val/accuracy"
    )
    assert list(table.columns) == [
        "run_id",
        "run_name",
        "status",
        "optimizer.lr",
        *compare.KEY_METRICS,
    ]
    assert table["run_id"].iloc[0] == best.info.run_id
    assert table["val/accuracy"].is_monotonic_decreasing

    # A job reruns from what MLflow recorded, in a new process, to identical metrics.
    assert reproduce.main([best.info.run_id]) == 0
    rerun = client.search_runs(
        [best.info.experiment_id], filter_string=f"tags.reproduces = '{best.info.run_id}'"
    )
    assert len(rerun) == 1
    assert rerun[0].data.metrics["test/accuracy"] == best.data.metrics["test/accuracy"]
    assert rerun[0].data.metrics["test/loss"] == best.data.metrics["test/loss"]


def test_failing_job_ends_failed_and_the_others_finish(prepared, tmp_path):
    result = sweep(
        prepared,
        tmp_path,
        "train.max_steps=4",
        "optimizer.schedule=constant",
        "optimizer.lr=1e-3,1e12,3e-3",
        check=False,
    )

    # Hydra's basic sweeper runs every job, then exits non-zero for the failed one.
    assert result.returncode == 1
    assert "job 1 failed: training loss became NaN" in result.stderr + result.stdout
    _, parents, children = runs_of(tmp_path)
    by_lr = {run.data.params["optimizer.lr"]: run.info.status for run in children}
    assert by_lr == {"0.001": "FINISHED", "1000000000000.0": "FAILED", "0.003": "FINISHED"}
    # The parent still ends, with the outcome recorded, and no run is left active.
    assert parents[0].info.status == "FAILED"
    assert parents[0].data.metrics["sweep/failed_jobs"] == 1
    assert "RUNNING" not in {run.info.status for run in [*parents, *children]}


def test_parallel_joblib_sweep_on_a_fresh_store_loses_nothing(prepared, tmp_path):
    sweep(
        prepared,
        tmp_path,
        "train.epochs=2",
        "train.log_every_n_steps=4",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "optimizer.lr=1e-3,3e-3",
    )

    client, parents, children = runs_of(tmp_path)
    assert len(parents) == 1 and len(children) == 2
    for run in children:
        assert run.info.status == "FINISHED"
        history = client.get_metric_history(run.info.run_id, "val/accuracy")
        assert [point.step for point in history] == [1, 2]
        batches = client.get_metric_history(run.info.run_id, "train/batch_loss")
        assert sorted(point.step for point in batches) == [4, 8, 12, 16, 20, 24]
        assert "test/accuracy" in run.data.metrics
    assert len({run.info.run_name for run in children}) == 2


def test_optuna_search_counts_a_nan_trial_as_failed_and_goes_on(prepared, tmp_path):
    # tests/conf/hparams_search/nan_trial.yaml: a grid of 3 learning rates, one of 1e12.
    sweep(prepared, tmp_path, "hparams_search=nan_trial", "train.max_steps=4")

    _, parents, children = runs_of(tmp_path)
    by_lr = {run.data.params["optimizer.lr"]: run.info.status for run in children}
    assert by_lr == {"0.001": "FINISHED", "1000000000000.0": "FAILED", "0.003": "FINISHED"}
    assert parents[0].info.status == "FINISHED"
    assert parents[0].data.tags["sweep.sweeper"] == "OptunaSweeper"
    results = (tmp_path / "multirun" / "optimization_results.yaml").read_text()
    assert "best_params" in results


def test_the_optuna_search_config_searches_the_four_hyperparameters():
    from pipeline.config import compose

    # Hydra only composes the sweeper's part for a multirun: read the file as written.
    text = (CONF_DIR / "hparams_search" / "mnist_optuna.yaml").read_text()
    for key in ("optimizer.lr", "train.batch_size", "model.dropout", "model.dense_units"):
        assert f"      {key}: " in text
    assert "direction: maximize" in text
    assert compose(["hparams_search=mnist_optuna"]).tracking.tags.experiment == "mnist_optuna"


EXPERIMENTS = sorted(path.stem for path in (CONF_DIR / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_config_composes_and_runs(prepared, name):
    cfg = make_config(prepared, f"experiment={name}", "train.max_steps=10", "train.epochs=1")

    val_accuracy = experiment.run(cfg)

    assert 0.0 < val_accuracy <= 1.0
    client = mlflow.MlflowClient(cfg.tracking.tracking_uri)
    run_id = pd.read_json(Path(cfg.paths.models_dir) / "run.json", typ="series")["run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["experiment"] == name
    assert "test/accuracy" in run.data.metrics


def test_tutorial_experiment_is_the_tutorial():
    from pipeline.config import compose, validate

    cfg = validate(compose(["experiment=tutorial"]))

    assert (cfg.optimizer.name, cfg.optimizer.lr, cfg.optimizer.schedule) == (
        "adam",
        0.01,
        "constant",
    )
    assert (cfg.train.batch_size, cfg.train.max_steps) == (100, 1001)
    assert (cfg.train.log_every_n_steps, cfg.train.val_every_n_steps) == (5, 5)
    assert (cfg.model.kernel_initializer, cfg.model.init_stddev, cfg.model.bias_init) == (
        "truncated_normal",
        0.1,
        0.1,
    )
    assert (cfg.model.conv_filters, cfg.model.dense_units, cfg.model.dropout) == (
        [32, 64],
        1024,
        0.5,
    )


def test_validation_batch_summaries_every_n_steps(prepared):
    cfg = make_config(prepared, "train.max_steps=10", "train.val_every_n_steps=5")

    experiment.run(cfg)

    logs = sorted(Path(cfg.tracking.tensorboard_dir).iterdir())[-1]
    steps: dict[str, list[int]] = {}
    for path in (logs / "validation").glob("events.out.tfevents.*"):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                steps.setdefault(value.tag, []).append(event.step)
    assert steps["batch_accuracy"] == [5, 10]
    assert steps["batch_loss"] == [5, 10]
