"""The tutorial CNN, built from `model.*`, and its optimizer, built from `optimizer.*`."""

from __future__ import annotations

import math
import types
from collections.abc import Callable
from pathlib import Path

import keras
from keras import layers

from pipeline.config import ModelConfig, OptimizerConfig
from pipeline.errors import PipelineError

MODEL_FILE = "model.keras"  # in paths.models_dir


def _kernel_initializer(cfg: ModelConfig) -> keras.initializers.Initializer | str:
    if cfg.kernel_initializer == "truncated_normal":
        # As the tutorial's tf.truncated_normal: redrawn beyond two standard deviations.
        return keras.initializers.TruncatedNormal(stddev=cfg.init_stddev)
    return cfg.kernel_initializer


def _conv(cfg: ModelConfig, index: int, filters: int) -> layers.Layer:
    options = {
        "padding": "same",
        "activation": "relu",
        "name": f"conv{index}",
        "bias_initializer": keras.initializers.Constant(cfg.bias_init),
    }
    if index == 1:
        # The first conv sees one channel. A depthwise conv with one output per filter
        # computes the same sums from a kernel of the same shape (5, 5, 1, 32), drawn
        # alike, and oneDNN computes its kernel's gradient faster (about 2% of a step).
        return layers.DepthwiseConv2D(
            cfg.kernel_size,
            depth_multiplier=filters,
            depthwise_initializer=_kernel_initializer(cfg),
            **options,
        )
    return layers.Conv2D(
        filters, cfg.kernel_size, kernel_initializer=_kernel_initializer(cfg), **options
    )


def _hidden_dense(cfg: ModelConfig) -> layers.Layer:
    # The kernel is stored (units, inputs), as the rows of W in y = Wx. The backward
    # pass multiplies the output's gradient by this kernel as stored; oneDNN runs that
    # product at full speed, while Dense's (inputs, units) kernel must be read
    # transposed, which took twice as long as the forward product (about 6% of a step).
    # EinsumDense takes the fans of glorot_uniform and he_normal from the axes its
    # equation names, so the initial weights have the scale Dense would give them.
    return layers.EinsumDense(
        "bi,ui->bu",
        output_shape=cfg.dense_units,
        bias_axes="u",
        activation="relu",
        name="dense",
        kernel_initializer=_kernel_initializer(cfg),
        bias_initializer=keras.initializers.Constant(cfg.bias_init),
    )


def build_model(cfg: ModelConfig, image_size: int = 28, num_classes: int = 10) -> keras.Model:
    """Build the CNN: raw pixels in [0, 255] of shape (size, size) in, class logits out.

    Every layer is a standard Keras layer, so the saved model loads without this package.
    """
    inputs = keras.Input((image_size, image_size), name="image")
    # Scaling and the channel axis live in the model, so it serves raw 28x28 images.
    x = layers.Rescaling(1.0 / 255, name="rescale")(inputs)
    x = layers.Reshape((image_size, image_size, 1), name="add_channel")(x)
    for index, filters in enumerate(cfg.conv_filters, start=1):
        x = _conv(cfg, index, filters)(x)
        x = layers.MaxPooling2D(cfg.pool_size, padding="same", name=f"pool{index}")(x)
    x = layers.Flatten(name="flatten")(x)
    x = _hidden_dense(cfg)(x)
    x = layers.Dropout(cfg.dropout, name="dropout")(x)
    logits = layers.Dense(
        num_classes,
        name="logits",
        kernel_initializer=_kernel_initializer(cfg),
        bias_initializer=keras.initializers.Constant(cfg.bias_init),
    )(x)
    return keras.Model(inputs, logits, name=cfg.name)


def learning_rate(
    cfg: OptimizerConfig, total_steps: int, steps_per_epoch: int
) -> Callable[[int], float]:
    """The rate at each optimizer step: constant, or a warm-up then one or two cosines.

    warmup_cosine rises linearly from 0 to `lr` over `warmup_steps`, then follows a
    cosine down to `lr * final_lr_fraction` at the end of `restart_epochs` epochs. If
    steps remain, it restarts once at `lr * restart_lr_fraction` and follows a second
    cosine down to the same floor at the last step. The first cosine brings the model
    to its first good accuracy within one epoch; the second, lower one refines it.
    """
    if cfg.schedule == "constant":
        return lambda step: cfg.lr
    warmup = min(cfg.warmup_steps, total_steps)
    restart = round(cfg.restart_epochs * steps_per_epoch) or total_steps
    restart = min(max(restart, warmup), total_steps)
    floor = cfg.lr * cfg.final_lr_fraction

    def cosine(peak: float, done: int, length: int) -> float:
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * done / length))

    def rate(step: int) -> float:
        step = min(step, total_steps)  # past the end (train.max_steps stops mid-epoch)
        if step < warmup:
            return cfg.lr * step / warmup
        if step < restart or restart == total_steps:
            return cosine(cfg.lr, step - warmup, max(1, restart - warmup))
        return cosine(cfg.lr * cfg.restart_lr_fraction, step - restart, total_steps - restart)

    return rate


class ScheduledRate(keras.callbacks.Callback):
    """Set the optimizer's learning rate before every training step.

    A callback rather than a Keras LearningRateSchedule: a schedule object is saved
    with the model and a custom one would make the file unloadable without this
    package (by `mlflow models serve`, for one). The saved model keeps a plain rate.
    """

    def __init__(self, rate: Callable[[int], float]):
        super().__init__()
        self.rate = rate
        self.step = 0

    def on_train_begin(self, logs: dict | None = None) -> None:
        self.step = int(self.model.optimizer.iterations)

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        self.model.optimizer.learning_rate = self.rate(self.step)
        self.step += 1


def _fused_adam_step(
    optimizer: keras.optimizers.Adam,
    gradient: object,
    variable: keras.Variable,
    learning_rate: object,
) -> None:
    """Keras's Adam update of one variable, as TensorFlow's fused kernel computes it."""
    import tensorflow as tf

    index = optimizer._get_variable_index(variable)
    dtype = variable.dtype
    step = tf.cast(optimizer.iterations + 1, dtype)
    tf.raw_ops.ResourceApplyAdam(
        var=variable.handle,
        m=optimizer._momentums[index].handle,
        v=optimizer._velocities[index].handle,
        beta1_power=tf.pow(tf.cast(optimizer.beta_1, dtype), step),
        beta2_power=tf.pow(tf.cast(optimizer.beta_2, dtype), step),
        lr=tf.cast(learning_rate, dtype),
        beta1=tf.cast(optimizer.beta_1, dtype),
        beta2=tf.cast(optimizer.beta_2, dtype),
        epsilon=tf.cast(optimizer.epsilon, dtype),
        grad=tf.cast(gradient, dtype),
    )


def adam(rate: float) -> keras.optimizers.Adam:
    """Keras's Adam, its update run by TensorFlow's fused kernel."""
    optimizer = keras.optimizers.Adam(rate)
    # Keras updates a variable in six element-wise passes over memory; the fused kernel
    # computes the same formula, in the same order, in one. With the dense layer's 3.2M
    # weights that makes a training step about 9% faster on a 2-core CPU. It is set on
    # the instance, so a saved model names plain Adam and loads without this module.
    # This relies on Keras internals (_momentums, _velocities), pinned in pyproject.toml.
    optimizer.update_step = types.MethodType(_fused_adam_step, optimizer)
    return optimizer


def compile_model(
    model: keras.Model, cfg: OptimizerConfig, total_steps: int, steps_per_epoch: int
) -> ScheduledRate:
    """Attach Adam, the softmax cross-entropy on logits, and accuracy.

    Returns the callback that applies the learning-rate schedule: pass it to `fit`.
    """
    rate = learning_rate(cfg, total_steps, steps_per_epoch)
    model.compile(
        optimizer=adam(rate(0)),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )
    return ScheduledRate(rate)


def load_model(models_dir: Path) -> keras.Model:
    """Load the model that the train stage saved in `models_dir`."""
    path = models_dir / MODEL_FILE
    if not path.is_file():
        raise PipelineError(f"{path}: not found; run the train stage first (dvc repro)")
    try:
        return keras.saving.load_model(path)
    except (OSError, ValueError) as error:
        raise PipelineError(
            f"{path}: cannot load the model ({error}); rerun the train stage "
            "(dvc repro -f train) or restore it (dvc checkout)"
        ) from None
