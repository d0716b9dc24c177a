"""The tutorial CNN, built from `model.*`, and its optimizer, built from `optimizer.*`."""

from __future__ import annotations

import math
import types
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


class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    """A linear warm-up, then one or two cosines, computed in the training graph.

    Rises linearly from 0 to `peak` over `warmup_steps`, then follows a cosine down to
    `floor` at `restart_step`. If steps remain, it restarts at `restart_peak` and
    follows a second cosine down to `floor` at `total_steps`. Called with a step
    number, it returns that step's rate as a tensor: `float(schedule(step))`.
    """

    def __init__(
        self,
        peak: float,
        floor: float,
        warmup_steps: int,
        restart_step: int,
        restart_peak: float,
        total_steps: int,
    ):
        self.peak, self.floor, self.restart_peak = peak, floor, restart_peak
        self.warmup_steps = warmup_steps
        self.restart_step = restart_step
        self.total_steps = total_steps

    def __call__(self, step: object) -> object:
        ops = keras.ops
        step = ops.cast(step, "float32")

        def cosine(peak: float, start: int, end: int) -> object:
            done = (step - start) / max(1, end - start)
            return self.floor + (peak - self.floor) * 0.5 * (1 + ops.cos(math.pi * done))

        warmup = self.peak * step / max(1, self.warmup_steps)
        first = cosine(self.peak, self.warmup_steps, self.restart_step)
        second = cosine(self.restart_peak, self.restart_step, self.total_steps)
        rate = ops.where(step < self.restart_step, first, second)
        rate = ops.where(step < self.warmup_steps, warmup, rate)
        # From the last step on (the rate Keras reports once training ends): the floor.
        return ops.where(step >= self.total_steps, self.floor, rate)

    def get_config(self) -> dict:
        return {
            "peak": self.peak,
            "floor": self.floor,
            "warmup_steps": self.warmup_steps,
            "restart_step": self.restart_step,
            "restart_peak": self.restart_peak,
            "total_steps": self.total_steps,
        }


def learning_rate(
    cfg: OptimizerConfig, total_steps: int, steps_per_epoch: int
) -> float | WarmupCosine:
    """The optimizer's rate: `lr` itself, or a warm-up then one or two cosines.

    warmup_cosine rises linearly from 0 to `lr` over `warmup_steps`, then follows a
    cosine down to `lr * final_lr_fraction` at the end of `restart_epochs` epochs. If
    steps remain, it restarts once at `lr * restart_lr_fraction` and follows a second
    cosine down to the same floor at the last step. The first cosine brings the model
    to its first good accuracy within one epoch; the second, lower one refines it.
    """
    if cfg.schedule == "constant":
        return cfg.lr
    warmup = min(cfg.warmup_steps, total_steps)
    restart = round(cfg.restart_epochs * steps_per_epoch) or total_steps
    return WarmupCosine(
        peak=cfg.lr,
        floor=cfg.lr * cfg.final_lr_fraction,
        warmup_steps=warmup,
        restart_step=min(max(restart, warmup), total_steps),
        restart_peak=cfg.lr * cfg.restart_lr_fraction,
        total_steps=total_steps,
    )


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


def adam(rate: float | WarmupCosine) -> keras.optimizers.Adam:
    """Keras's Adam, its update run by TensorFlow's fused kernel."""
    optimizer = keras.optimizers.Adam(rate)
    # Keras updates a variable in six element-wise passes over memory; the fused kernel
    # computes the same formula, in the same order, in one. With the dense layer's 3.2M
    # weights that makes a training step about 9% faster on a 2-core CPU. It is set on
    # the instance, so a saved model names plain Adam and loads without this module.
    # This relies on Keras internals (_momentums, _velocities), pinned in pyproject.toml.
    optimizer.update_step = types.MethodType(_fused_adam_step, optimizer)
    return optimizer


def _compile(model: keras.Model, optimizer: keras.optimizers.Optimizer, **options) -> None:
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        **options,
    )


def compile_model(
    model: keras.Model,
    cfg: OptimizerConfig,
    total_steps: int,
    steps_per_epoch: int,
    steps_per_execution: int = 1,
) -> None:
    """Attach Adam with its learning-rate schedule, the softmax cross-entropy on logits,
    and accuracy. `steps_per_execution` optimizer steps run per call into TensorFlow."""
    rate = learning_rate(cfg, total_steps, steps_per_epoch)
    _compile(model, adam(rate), steps_per_execution=steps_per_execution)


def detach_schedule(model: keras.Model) -> None:
    """Recompile a trained model with plain Adam at the rate its schedule ended on.

    The schedule object would be saved with the optimizer, and a file that names a
    class of this package does not load without it (`mlflow models serve`, for one).
    The new optimizer takes over the step count and Adam's moments.
    """
    trained = model.optimizer
    plain = keras.optimizers.Adam(float(trained.learning_rate), name=trained.name)
    plain.build(model.trainable_variables)
    state = {variable.name: variable for variable in trained.variables}
    for variable in plain.variables:
        if variable.name in state:
            variable.assign(state[variable.name])
    _compile(model, plain)


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
