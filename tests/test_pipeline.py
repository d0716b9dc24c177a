"""The whole DVC pipeline on the MNIST slice, in a temporary copy of the project."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import mlflow
import pytest
from conftest import copy_project, run_in
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.util import tensor_util

from pipeline import config
from pipeline.model import learning_rate

EPOCHS = 2
STEPS_PER_EPOCH = 12  # 1,200 training images in batches of 100
LOG_EVERY = 4  # train.log_every_n_steps: Keras then runs 2 steps per call
HISTOGRAM_LAYERS = ("conv1", "conv2", "dense", "logits")


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Run `dvc repro` on the slice twice in a copy of the project."""
    project = copy_project(tmp_path_factory.mktemp("project"))
    python = sys.executable
    run_in(
        [
            python,
            "-m",
            "pipeline.params",
            "data=mnist_slice",
            "preprocess.val_size=300",
            f"train.epochs={EPOCHS}",
            f"train.log_every_n_steps={LOG_EVERY}",
        ],
        project,
    )
    dvc = [python, "-m", "dvc"]
    first = run_in([*dvc, "repro"], project)
    second = run_in([*dvc, "repro"], project)
    return {"project": project, "first": first.stdout, "second": second.stdout}


@pytest.fixture(scope="module")
def finished_run(reproduced: dict) -> mlflow.entities.Run:
    client = mlflow.MlflowClient(f"sqlite:///{reproduced['project'] / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mnist-cnn")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    return runs[0]


def test_every_stage_runs_once_and_a_second_repro_changes_nothing(reproduced):
    for stage in ("download", "preprocess", "train", "evaluate"):
        assert f"Running stage '{stage}'" in reproduced["first"]
    assert "Running stage" not in reproduced["second"]
    status = run_in([sys.executable, "-m", "dvc", "status"], reproduced["project"])
    assert "Data and pipelines are up to date." in status.stdout


def test_reports_hold_metrics_statistics_and_plots(reproduced):
    reports = reproduced["project"] / "reports"
    metrics = json.loads((reports / "metrics.json").read_text())
    # 2 epochs on 1,200 images: far from MNIST's 99%, far above chance.
    assert 0.75 <= metrics["test"]["accuracy"] <= 1.0
    assert metrics["test"]["errors"] == round(500 * (1 - metrics["test"]["accuracy"]))
    stats = json.loads((reports / "data" / "stats.json").read_text())
    assert [stats[split]["count"] for split in ("train", "val", "test")] == [1200, 300, 500]
    assert sum(stats["test"]["class_counts"].values()) == 500
    history = (reports / "train" / "history.csv").read_text().splitlines()
    assert history[0] == "epoch,train_loss,train_accuracy,val_loss,val_accuracy"
    assert len(history) == 1 + EPOCHS
    assert len((reports / "eval" / "predictions.csv").read_text().splitlines()) == 501
    for figure in (
        "data/samples.png",
        "train/curves.png",
        "eval/confusion_matrix.png",
        "eval/misclassified.png",
    ):
        assert (reports / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", figure


def test_mlflow_run_is_finished_with_params_metrics_and_artifacts(reproduced, finished_run):
    run = finished_run
    assert run.info.status == "FINISHED"
    assert run.data.params["data.name"] == "mnist_slice"
    assert run.data.params["optimizer.lr"] == "0.003"
    assert run.data.params["model.conv_filters.1"] == "64"
    assert run.data.params["train.epochs"] == str(EPOCHS)
    assert len(run.data.tags["git.commit"]) == 40
    assert run.data.tags["dvc.md5.data/processed"].endswith(".dir")

    client = mlflow.MlflowClient(f"sqlite:///{reproduced['project'] / 'mlflow.db'}")
    history = client.get_metric_history(run.info.run_id, "val/accuracy")
    assert [point.step for point in history] == list(range(1, EPOCHS + 1))
    metrics = json.loads((reproduced["project"] / "reports" / "metrics.json").read_text())
    assert run.data.metrics["test/accuracy"] == pytest.approx(metrics["test"]["accuracy"])
    batch_points = client.get_metric_history(run.info.run_id, "train/batch_loss")
    expected_steps = list(range(LOG_EVERY, STEPS_PER_EPOCH * EPOCHS + 1, LOG_EVERY))
    assert sorted(point.step for point in batch_points) == expected_steps
    # The rate of the step after each logged one, as Keras reports it at that point and
    # the schedule gives it (all warm-up on the slice).
    optimizer = config.load_params(reproduced["project"] / "params.yaml").optimizer
    rate = learning_rate(optimizer, STEPS_PER_EPOCH * EPOCHS, STEPS_PER_EPOCH)
    rates = client.get_metric_history(run.info.run_id, "train/batch_learning_rate")
    assert sorted((point.step, point.value) for point in rates) == [
        (step, pytest.approx(float(rate(step)))) for step in expected_steps
    ]

    artifacts = {item.path for item in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "tensorboard", "train", "eval", "metrics.json"} <= artifacts
    models = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert [model.source_run_id for model in models] == [run.info.run_id]


def summary_steps(folder: Path) -> tuple[dict[str, list[int]], set[str]]:
    """The steps of each summary tag in a TensorBoard run folder, and the plugins that
    show them, read from every event file as TensorBoard's data server reads them."""
    steps: dict[str, list[int]] = {}
    plugins: set[str] = set()
    for path in sorted(folder.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                steps.setdefault(value.tag, []).append(event.step)
                plugins.add(value.metadata.plugin_data.plugin_name)
    return steps, plugins


def test_tensorboard_has_histograms_of_every_layer(reproduced):
    runs = list((reproduced["project"] / "logs" / "tensorboard").iterdir())
    assert len(runs) == 1
    train_steps, plugins = summary_steps(runs[0] / "train")
    for layer in HISTOGRAM_LAYERS:
        for kind in ("weights", "biases", "activations"):
            # One histogram before training and one after each epoch.
            assert train_steps[f"{layer}/{kind}"] == list(range(EPOCHS + 1)), (layer, kind)
    assert train_steps["input/samples"] == [0]
    assert {"histograms", "images", "scalars", "graph_run_metadata_graph"} <= plugins
    for tag in ("batch_loss", "batch_learning_rate"):
        assert train_steps[tag] == list(range(LOG_EVERY, STEPS_PER_EPOCH * EPOCHS + 1, LOG_EVERY))
    # Each histogram holds every value once: conv1 has 5 x 5 x 1 x 32 weights.
    for path in (runs[0] / "train").glob("events.out.tfevents.*"):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.tag == "conv1/weights":
                    buckets = tensor_util.make_ndarray(value.tensor)
                    assert buckets.shape == (30, 3)
                    assert buckets[:, 2].sum() == 800
    validation_steps, _ = summary_steps(runs[0] / "validation")
    for run_steps in (train_steps, validation_steps):
        assert run_steps["epoch_accuracy"] == list(range(EPOCHS))
        assert run_steps["epoch_loss"] == list(range(EPOCHS))


SLICE_CONFIG = """\
# The slice pipeline of this test, as a primary config for DVC's Hydra integration.
defaults:
  - config
  - override data: mnist_slice
  - _self_
preprocess:
  val_size: 300
train:
  epochs: 1
  log_every_n_steps: 5
"""


def test_queued_dvc_experiment_records_into_the_project_store(reproduced):
    project = reproduced["project"]
    dvc = [sys.executable, "-m", "dvc"]
    # `dvc exp run -S` composes conf/ afresh: make the slice the composed config.
    (project / "conf" / "slice.yaml").write_text(SLICE_CONFIG)
    run_in([*dvc, "config", "hydra.config_name", "slice"], project)
    run_in(["git", "add", "-A"], project)
    run_in(["git", "-c", "user.name=t", "-c", "user.email=t@e", "commit", "-qm", "slice"], project)
    baseline = run_in(["git", "rev-parse", "HEAD"], project).stdout.strip()

    run_in([*dvc, "exp", "run", "--queue", "-n", "lr-1e-3", "-S", "optimizer.lr=0.001"], project)
    run_in([*dvc, "queue", "start", "-j", "1"], project)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        status = run_in([*dvc, "queue", "status"], project).stdout
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(5)
    assert "Success" in status, status

    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mnist-cnn")
    runs = client.search_runs(
        [experiment.experiment_id], filter_string="tags.`dvc.experiment` = 'lr-1e-3'"
    )
    assert len(runs) == 1
    assert runs[0].info.status == "FINISHED"
    assert runs[0].data.params["optimizer.lr"] == "0.001"
    assert runs[0].data.tags["dvc.baseline"] == baseline
    assert "test/accuracy" in runs[0].data.metrics
    shown = run_in([*dvc, "exp", "show", "--json"], project).stdout
    # `dvc exp show` lists the experiment with its parameters and test metrics.
    assert '"lr-1e-3"' in shown
    assert '"reports/metrics.json"' in shown and '"params.yaml"' in shown
