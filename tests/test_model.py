"""Model behaviour: the tutorial's architecture, initialisers and learning-rate schedule."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import ModelConfig, OptimizerConfig
from pipeline.model import build_model, learning_rate

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
def test_warmup_cosine_schedule(step, expected):
    cfg = OptimizerConfig(lr=0.003, schedule="warmup_cosine", warmup_steps=100)

    schedule = learning_rate(cfg, total_steps=1000)

    assert float(schedule(step)) == pytest.approx(expected, abs=1e-6)


def test_constant_schedule_is_the_configured_rate():
    assert learning_rate(OptimizerConfig(lr=1e-4, schedule="constant"), 1000) == 1e-4
