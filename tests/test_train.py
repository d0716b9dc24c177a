"""The train and evaluate stages in-process: determinism and a diverging run."""

from __future__ import annotations

import keras
import mlflow
import pytest
from conftest import make_config

from pipeline import config, download, evaluate, preprocess, tracking, train
from pipeline.model import MODEL_FILE


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory):
    """Download and preprocess the slice once for every test here."""
    root = tmp_path_factory.mktemp("prepared")
    cfg = make_config(root)
    download.run(cfg)
    preprocess.run(cfg)
    return root


def test_same_config_and_data_give_identical_test_metrics(prepared):
    cfg = make_config(prepared)

    results = []
    for _ in range(2):
        val_accuracy = train.run(cfg)
        results.append((val_accuracy, evaluate.run(cfg)))

    assert results[0][0] == results[1][0]
    assert results[0][1] == results[1][1]
    assert 0.5 < results[0][1]["test"]["accuracy"] < 1.0


def test_diverging_run_fails_and_keeps_the_earlier_model(prepared):
    cfg = make_config(prepared, "optimizer.lr=1e12", "optimizer.schedule=constant")
    models_dir = cfg.path(cfg.paths.models_dir)
    train.run(make_config(prepared))  # an earlier, healthy model
    earlier_model = (models_dir / MODEL_FILE).read_bytes()
    earlier_run_id = tracking.load_run_id(models_dir)

    with pytest.raises(train.TrainingDiverged, match=r"NaN or infinite .* optimizer\.lr"):
        train.run(cfg)

    assert (models_dir / MODEL_FILE).read_bytes() == earlier_model
    assert tracking.load_run_id(models_dir) == earlier_run_id
    client = mlflow.MlflowClient(tracking.tracking_uri(cfg))
    latest = client.search_runs(
        [tracking.connect(cfg)], order_by=["attributes.start_time DESC"], max_results=1
    )[0]
    assert latest.info.status == "FAILED"
    assert latest.info.run_id != earlier_run_id


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ([], 10),  # 550 steps per epoch, logging every 50
        (["experiment=tutorial"], 1),  # stops 451 steps into its second epoch (1001)
        (["train.max_steps=1020"], 10),  # 470 steps into the second epoch
        (["train.log_every_n_steps=25"], 5),
        (["train.val_every_n_steps=4"], 2),
        (["train.batch_size=200"], 5),  # 275 steps per epoch
    ],
)
def test_steps_per_call_divide_every_count_that_callbacks_act_on(overrides, expected):
    cfg = config.validate(config.compose(overrides))
    steps_per_epoch, total_steps, _ = train.step_counts(cfg, 55_000)

    assert train.execution_steps(cfg, steps_per_epoch, total_steps) == expected


def test_training_stops_exactly_at_max_steps(prepared):
    # 12 steps per epoch on the slice: 18 steps end half-way through the second epoch,
    # in calls of 2 steps.
    cfg = make_config(prepared, "train.max_steps=18")
    assert train.execution_steps(cfg, 12, 18) == 2

    train.run(cfg)

    model = keras.saving.load_model(cfg.path(cfg.paths.models_dir) / MODEL_FILE)
    assert int(model.optimizer.iterations) == 18
    run = mlflow.get_run(tracking.load_run_id(cfg.path(cfg.paths.models_dir)))
    assert run.data.params["train.steps_per_execution"] == "10"
    assert run.data.tags["keras.steps_per_execution"] == "2"
