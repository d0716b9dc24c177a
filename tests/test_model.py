"""Model behaviour: the tutorial's architecture, initialisers and learning-rate schedule."""

from __future__ import annotations

import json
import warnings
import zipfile

import keras
import numpy as np
import pytest

from pipeline.config import ModelConfig, OptimizerConfig
from pipeline.model import build_model, compile_model, detach_schedule, learning_rate

# (name, output shape without the batch axis, parameter count) of the tutorial CNN
TUTORIAL_LAYERS = [
    ("conv1", (28, 28, 32), 5 * 5 * 1 * 32 + 32),
    ("pool1", (14, 14, 32), 0),
    ("conv2", (14, 14, 64), 5 * 5 * 32 * 64 + 64),
    ("pool2", (7, 7, 64), 0),
    ("flatten", (3136,), 0),
    ("dense", (1024,), 7 * 7 * 64 * 1024 + 1024),
    ("dropout", (1024,), 0),
    ("logits", (10,), 1024 * 10 + 10),
]


def test_tutorial_cnn_layer_shapes_and_parameter_count():
    model = build_model(ModelConfig())

    for name, shape, params in TUTORIAL_LAYERS:
        layer = model.get_layer(name)
        assert tuple(layer.output.shape[1:]) == shape, name
        assert layer.count_params() == params, name
    assert model.count_params() == 3_274_634
    assert model.get_layer("dropout").rate == 0.5


def test_conv1_and_dense_compute_what_conv2d_and_dense_compute():
    # conv1 is a depthwise conv and the dense kernel is stored (units, inputs), for
    # speed: the same layers as the tutorial's Conv2D and Dense with the same weights.
    model = build_model(ModelConfig())
    rng = np.random.default_rng(0)
    conv1, dense = model.get_layer("conv1"), model.get_layer("dense")
    images = rng.uniform(0, 1, (4, 28, 28, 1)).astype(np.float32)
    features = rng.uniform(0, 1, (4, 3136)).astype(np.float32)
    conv2d = keras.layers.Conv2D(32, 5, padding="same", activation="relu")
    conv2d.build(images.shape)
    conv2d.set_weights([np.asarray(conv1.kernel), rng.normal(0, 0.1, 32)])
    conv1.bias.assign(conv2d.bias)
    plain = keras.layers.Dense(1024, activation="relu")
    plain.build(features.shape)
    plain.set_weights([np.asarray(dense.kernel).T, rng.normal(0, 0.1, 1024)])
    dense.bias.assign(plain.bias)

    np.testing.assert_allclose(conv1(images), conv2d(images), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dense(features), plain(features), rtol=1e-5, atol=1e-5)
    assert np.asarray(dense(features)).std() > 0.1  # not all zeros after the ReLU


@pytest.mark.parametrize(
    ("initializer", "expected_std"),
    # The dense layer has 3136 inputs and 1024 units, whatever its kernel's layout.
    [("glorot_uniform", (2 / (3136 + 1024)) ** 0.5), ("he_normal", (2 / 3136) ** 0.5)],
)
def test_dense_initial_weights_scale_with_its_inputs(initializer, expected_std):
    kernel = build_model(ModelConfig(kernel_initializer=initializer)).get_layer("dense").kernel

    assert np.asarray(kernel).std() == pytest.approx(expected_std, rel=0.02)


def test_training_flops_counted_from_every_kernel_layout():
    from benchmarks.worker import training_flops

    rows = training_flops(build_model(ModelConfig()))

    assert [(row["layer"], row["macs"]) for row in rows] == [
        ("conv1", 28 * 28 * 32 * 5 * 5),
        ("conv2", 14 * 14 * 64 * 5 * 5 * 32),
        ("dense", 3136 * 1024),
        ("logits", 1024 * 10),
    ]
    assert rows[0]["shape"] == "28x28 outputs x 32 filters x 5x5x1 weights"
    assert rows[2]["shape"] == "3136 inputs x 1024 units"


def test_model_takes_raw_pixels_and_returns_one_logit_per_class():
    model = build_model(ModelConfig())
    images = np.random.default_rng(0).integers(0, 256, (4, 28, 28)).astype(np.float32)

    logits = model.predict(images, verbose=0)

    assert logits.shape == (4, 10)
    assert np.isfinite(logits).all()


def test_truncated_normal_initialiser_matches_the_tutorial():
    cfg = ModelConfig(kernel_initializer="truncated_normal", init_stddev=0.1, bias_init=0.1)

    kernel, bias = build_model(cfg).get_layer("dense").weights

    values = np.asarray(kernel).ravel()
    # Truncated at two standard deviations, as tf.truncated_normal was.
    assert np.abs(values).max() <= 0.2 + 1e-6
    assert 0.08 < values.std() < 0.1
    np.testing.assert_allclose(np.asarray(bias), 0.1)


@pytest.mark.parametrize(
    ("step", "expected"),
    [(0, 0.0), (50, 0.0015), (100, 0.003), (550, 0.0015), (1000, 0.0)],
)
def test_warmup_cosine_without_restart(step, expected):
    cfg = OptimizerConfig(lr=0.003, warmup_steps=100, restart_epochs=0)

    rate = learning_rate(cfg, total_steps=1000, steps_per_epoch=100)

    assert float(rate(step)) == pytest.approx(expected, abs=1e-8)


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (0, 0.0),
        (100, 0.003),
        (325, 0.0015),  # halfway down the first cosine
        (549, 0.003 * 0.5 * (1 + np.cos(np.pi * 449 / 450))),
        (550, 0.00099),  # the restart, at lr * 0.33, one epoch in
        (1100, 0.000495),
        (1649, 0.00099 * 0.5 * (1 + np.cos(np.pi * 1099 / 1100))),
    ],
)
def test_warmup_cosine_restarts_after_one_epoch(step, expected):
    cfg = OptimizerConfig(lr=0.003, warmup_steps=100, restart_epochs=1, restart_lr_fraction=0.33)

    rate = learning_rate(cfg, total_steps=1650, steps_per_epoch=550)

    assert float(rate(step)) == pytest.approx(expected, abs=1e-8)


@pytest.mark.parametrize("restart_epochs", [1, 2])
def test_a_run_that_ends_before_the_restart_has_one_cosine(restart_epochs):
    cfg = OptimizerConfig(lr=0.003, warmup_steps=100, restart_epochs=restart_epochs)
    single = OptimizerConfig(lr=0.003, warmup_steps=100, restart_epochs=0)

    rate = learning_rate(cfg, total_steps=550, steps_per_epoch=550)
    expected = learning_rate(single, total_steps=550, steps_per_epoch=550)

    steps = np.arange(552)
    np.testing.assert_array_equal(rate(steps), expected(steps))
    expected_549 = 0.003 * 0.5 * (1 + np.cos(np.pi * 449 / 450))
    assert float(rate(549)) == pytest.approx(expected_549, abs=1e-9)
    assert float(rate(550)) == pytest.approx(0.0, abs=1e-10)


def test_constant_schedule_is_the_configured_rate():
    assert learning_rate(OptimizerConfig(lr=1e-4, schedule="constant"), 1000, 100) == 1e-4


def test_adam_moves_by_the_scheduled_rate_at_every_step():
    # With zero inputs only the bias learns, and with a steady gradient Adam moves it by
    # the rate of the step: the schedule runs inside the graph, two steps per call.
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    cfg = OptimizerConfig(lr=0.003, warmup_steps=2, restart_epochs=1, restart_lr_fraction=0.5)
    compile_model(model, cfg, total_steps=8, steps_per_epoch=4, steps_per_execution=2)
    biases = [0.0]
    record = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: biases.append(float(model.layers[0].bias[0]))
    )

    images, labels = np.zeros((32, 3), "float32"), np.zeros(32, "int64")
    model.fit(images, labels, batch_size=4, epochs=1, callbacks=[record], verbose=0)

    rate = learning_rate(cfg, 8, 4)
    expected = [float(rate(step)) + float(rate(step + 1)) for step in range(0, 8, 2)]
    assert len(biases) == 5  # one callback per call of two steps
    assert np.diff(biases) == pytest.approx(expected, rel=0.01)
    assert int(model.optimizer.iterations) == 8


def test_steps_per_execution_does_not_change_the_trained_weights():
    weights = []
    for steps_per_execution in (1, 4):
        keras.utils.set_random_seed(7)
        layers = keras.layers
        model = keras.Sequential(
            [keras.Input((3,)), layers.Dense(8), layers.Dropout(0.5), layers.Dense(2)]
        )
        compile_model(model, OptimizerConfig(warmup_steps=3), 12, 6, steps_per_execution)
        images = np.random.default_rng(0).normal(size=(60, 3)).astype("float32")
        labels = np.arange(60) % 2
        model.fit(images, labels, batch_size=10, epochs=2, shuffle=False, verbose=0)
        weights.append(model.get_weights())

    for plain, batched in zip(*weights, strict=True):
        np.testing.assert_array_equal(plain, batched)


def test_a_saved_model_names_plain_adam_at_the_rate_its_schedule_reached(tmp_path):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    cfg = OptimizerConfig(lr=0.003, warmup_steps=2, restart_epochs=0)
    compile_model(model, cfg, total_steps=10, steps_per_epoch=10)
    model.fit(np.ones((40, 3), "float32"), np.zeros(40, "int64"), batch_size=8, verbose=0)

    detach_schedule(model)
    model.save(tmp_path / "model.keras")

    saved = json.loads(zipfile.ZipFile(tmp_path / "model.keras").read("config.json"))
    optimizer = saved["compile_config"]["optimizer"]
    # A plain number, not the schedule object: the file loads without this package.
    assert optimizer["class_name"] == "Adam"
    rate = float(learning_rate(cfg, 10, 10)(5))
    assert optimizer["config"]["learning_rate"] == pytest.approx(rate)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. optimizer variables that do not match
        loaded = keras.saving.load_model(tmp_path / "model.keras")
    np.testing.assert_array_equal(loaded.get_weights()[1], model.get_weights()[1])
    # The step count and Adam's moments were carried over.
    assert int(loaded.optimizer.iterations) == 5
    moments = [np.abs(np.asarray(v)).sum() for v in loaded.optimizer.variables[2:]]
    assert len(moments) == 4 and min(moments) > 0


def test_a_run_shorter_than_the_warmup_ends_at_the_floor():
    rate = learning_rate(OptimizerConfig(lr=0.003, warmup_steps=100), 50, 50)

    assert float(rate(49)) == pytest.approx(0.003 * 49 / 50)  # the warm-up is cut to the run
    assert float(rate(50)) == 0.0
