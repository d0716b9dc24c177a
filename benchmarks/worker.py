"""One measurement in a process of its own, started by `benchmarks.bench`.

TensorFlow reads its settings (oneDNN, threads) once per process, so the plain-Keras
baseline and the pipeline cannot share one: each task here runs alone and writes its
figures as JSON to the file named on the command line. Nothing at module level imports
TensorFlow or `pipeline`, whose import sets TF_ENABLE_ONEDNN_OPTS.

    python -m benchmarks.worker TASK SPEC_JSON OUT_JSON
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

TASKS = ("matmul", "baseline", "pipeline", "time_to_accuracy")


def log(message: str, *args: object) -> None:
    """One progress line on stderr, prefixed so it stands out from TensorFlow's notices."""
    print(f"[bench worker] {message % args}", file=sys.stderr, flush=True)


def peak_rss_bytes() -> int:
    """The peak resident set of this process so far (Linux reports kibibytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Turns:
    """Run only while the bench grants a turn, so that workers alternate instead of sharing.

    The bench starts every worker at once and then grants turns one at a time: figures
    from neighbouring turns saw the same machine, whatever else runs on it meanwhile.
    Without the two pipes in the spec (a worker run by hand) every turn is granted.
    """

    def __init__(self, spec: dict):
        self.grant = self.done = None
        if "grant_fd" in spec:
            self.grant = os.fdopen(spec["grant_fd"], "rb", buffering=0)
            self.done = os.fdopen(spec["done_fd"], "wb", buffering=0)

    def end(self) -> None:
        """Tell the bench that this turn (or the set-up) is over."""
        if self.done:
            self.done.write(b"d")

    def wait(self) -> None:
        """Block until the bench grants the next turn."""
        if self.grant and not self.grant.read(1):
            sys.exit("the bench closed its pipe; stopping")


def turn_timer(turns: Turns, spec: dict) -> Any:
    """A Keras callback that trains one warm-up turn, then one timed window per turn.

    A window is at least `window_steps` steps after one untimed call into TensorFlow
    (one step, or `steps_per_execution`): the first call after a pause runs on cold
    caches and sleeping threads. Steps are read off the optimizer, so a window ends at
    the end of a call, and its length in steps is recorded with its seconds.
    """
    import keras

    warmup, size, count = spec["warmup"], spec["window_steps"], spec["windows"]

    class TurnTimer(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.window_seconds: list[float] = []
            self.window_steps: list[int] = []
            self.warmed_up = False
            self.started: tuple[float, int] | None = None  # time and step of the start

        def on_train_begin(self, logs: dict | None = None) -> None:
            turns.end()  # set-up done
            turns.wait()

        def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
            now, step = time.perf_counter(), int(self.model.optimizer.iterations)
            if not self.warmed_up:
                if step >= warmup:
                    self.warmed_up = True
                    self._next_turn()
            elif self.started is None:
                self.started = now, step
            elif step - self.started[1] >= size:
                self.window_seconds.append(now - self.started[0])
                self.window_steps.append(step - self.started[1])
                self._next_turn()

        def _next_turn(self) -> None:
            turns.end()
            if len(self.window_seconds) == count:
                self.model.stop_training = True
            turns.wait()  # after the last window: the turn that finishes the run
            self.started = None

    return TurnTimer()


def steps_to_time(spec: dict, steps_per_call: int) -> int:
    """Training steps that the warm-up and every window with its untimed call take."""
    windows = spec["windows"] * (-(-spec["window_steps"] // steps_per_call) + 1)
    return -(-spec["warmup"] // steps_per_call) * steps_per_call + windows * steps_per_call


def timed(callback: Any) -> Any:
    """Wrap a Keras callback so that the seconds spent in each of its hooks add up."""
    import keras

    hooks = (
        "on_train_begin",
        "on_train_end",
        "on_epoch_begin",
        "on_epoch_end",
        "on_train_batch_begin",
        "on_train_batch_end",
    )

    class Timed(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.seconds: dict[str, float] = defaultdict(float)

        def set_model(self, model: keras.Model) -> None:
            super().set_model(model)
            callback.set_model(model)

        def set_params(self, params: dict) -> None:
            super().set_params(params)
            callback.set_params(params)

    def forward(hook: str) -> Any:
        def call(self: Any, *args: Any, **kwargs: Any) -> None:
            started = time.perf_counter()
            getattr(callback, hook)(*args, **kwargs)
            self.seconds[hook] += time.perf_counter() - started

        return call

    for hook in hooks:
        setattr(Timed, hook, forward(hook))
    return Timed()


def matmul(spec: dict) -> dict:
    """Float32 matrix-multiply throughput in GFLOP/s, one figure per turn."""
    if spec["pipeline_settings"]:
        import pipeline  # noqa: F401  (importing it applies the training's settings)
    import tensorflow as tf

    turns = Turns(spec)
    size = spec["size"]
    generator = tf.random.Generator.from_seed(0)
    left = generator.normal((size, size), dtype=tf.float32)
    right = generator.normal((size, size), dtype=tf.float32)

    def multiply(times: int) -> float:
        started = time.perf_counter()
        for _ in range(times):
            # Eager CPU ops are synchronous; reading one value makes sure of it.
            float(tf.linalg.matmul(left, right)[0, 0])
        return time.perf_counter() - started

    turns.end()
    turns.wait()
    multiply(spec["warmup"])
    gflops = []
    for _ in range(spec["windows"]):
        turns.end()
        turns.wait()
        multiply(1)  # untimed, as in the training windows
        gflops.append(2 * size**3 * spec["repeats"] / multiply(spec["repeats"]) / 1e9)
    turns.end()
    turns.wait()
    return {"gflops": gflops, "size": size}


def _baseline_model() -> Any:
    """The tutorial CNN as a plain Keras user writes it, on (28, 28, 1) inputs in [0, 1]."""
    import keras
    from keras import layers

    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            layers.Conv2D(32, 5, padding="same", activation="relu"),
            layers.MaxPooling2D(2),
            layers.Conv2D(64, 5, padding="same", activation="relu"),
            layers.MaxPooling2D(2),
            layers.Flatten(),
            layers.Dense(1024, activation="relu"),
            layers.Dropout(0.5),
            layers.Dense(10),
        ]
    )


def baseline(spec: dict) -> dict:
    """Plain Keras: `model.fit` on in-memory float32 arrays with TensorFlow's defaults."""
    import keras
    import numpy as np

    with np.load(Path(spec["data_dir"]) / "train.npz") as archive:
        images = archive["images"][..., None].astype(np.float32) / 255.0
        labels = archive["labels"].astype(np.int32)
    keras.utils.set_random_seed(spec["seed"])
    model = _baseline_model()
    model.compile(
        optimizer=keras.optimizers.Adam(),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    timer = turn_timer(Turns(spec), spec)
    epochs = -(-steps_to_time(spec, 1) * spec["batch_size"] // len(images))
    model.fit(
        images,
        labels,
        batch_size=spec["batch_size"],
        epochs=epochs,
        callbacks=[timer],
        verbose=0,
    )
    return {
        "window_seconds": timer.window_seconds,
        "window_steps": timer.window_steps,
        "batch_size": spec["batch_size"],
    }


def load_config(overrides: list[str]) -> Any:
    """The default configuration from params.yaml, with `key=value` overrides on top."""
    from omegaconf import OmegaConf

    from pipeline import config

    cfg = config.load_params()
    if not overrides:
        return cfg
    merged = OmegaConf.merge(OmegaConf.structured(cfg), OmegaConf.from_dotlist(overrides))
    return config.validate(merged)


def training_flops(model: Any) -> list[dict]:
    """Multiply-adds per image of every layer with a kernel, read off the built model.

    Each output value of a conv or dense layer takes one multiply-add per weight it
    sees, so a layer costs its output positions times its kernel's size, whatever the
    kernel's layout (conv1 is a depthwise conv, the dense kernel is stored units
    first). Pooling, biases and activations are left out: together they are well under
    1% of the work. A training step costs about three forward passes: the forward pass,
    the gradient with respect to the inputs and the gradient with respect to the weights.
    """
    import math

    rows = []
    for layer in model.layers:
        kernel = getattr(layer, "kernel", None)
        if kernel is None:
            continue
        *positions, outputs = layer.output.shape[1:]
        per_output = math.prod(kernel.shape) // outputs
        if positions:
            height, width = positions
            kernel_h, kernel_w = kernel.shape[:2]
            shape = f"{height}x{width} outputs x {outputs} filters x {kernel_h}x{kernel_w}x"
            shape += f"{per_output // (kernel_h * kernel_w)} weights"
        else:
            shape = f"{per_output} inputs x {outputs} units"
        macs = math.prod(positions) * math.prod(kernel.shape)
        rows.append({"layer": layer.name, "shape": shape, "macs": int(macs)})
    return rows


class PipelineRun:
    """The train stage's data, model and callbacks, built as `pipeline.train.run` does."""

    def __init__(self, spec: dict):
        from pipeline import data, train
        from pipeline.model import build_model, compile_model

        self.cfg = cfg = load_config(spec["overrides"])
        train.seed_everything(cfg.seed)
        data_dir = Path(spec["data_dir"])
        self.train_images, train_labels = data.load_split(data_dir, "train")
        self.val_images, self.val_labels = data.load_split(data_dir, "val")
        self.train_set = data.dataset(
            self.train_images,
            train_labels,
            cfg.train.batch_size,
            shuffle_buffer=cfg.train.shuffle_buffer,
            seed=cfg.seed,
        )
        train.check_data(cfg, self.train_images, train_labels)
        self.steps_per_epoch, self.total_steps, self.epochs = train.step_counts(
            cfg, len(self.train_images)
        )
        self.execution_steps = train.execution_steps(cfg, self.steps_per_epoch, self.total_steps)
        self.model = build_model(cfg.model, cfg.data.image_size, cfg.data.num_classes)
        compile_model(
            self.model,
            cfg.optimizer,
            self.total_steps,
            self.steps_per_epoch,
            self.execution_steps,
        )

    def callbacks(self, folder: Path, tracking: bool) -> tuple[list[Any], list[Any]]:
        """The train stage's callbacks, split into (others, tracking).

        With tracking, MLflow records into a throwaway store in `folder`; without, the
        TensorBoard and MLflow callbacks are built as the stage builds them, then dropped.
        """
        import mlflow

        from pipeline import summaries, train

        run_id = "untracked"
        if tracking:
            mlflow.set_tracking_uri(f"sqlite:///{folder / 'mlflow.db'}")
            location = (folder / "mlartifacts").as_uri()
            experiment_id = mlflow.create_experiment("bench", artifact_location=location)
            run_id = mlflow.start_run(experiment_id=experiment_id).info.run_id
        stage_callbacks = train.callbacks(
            self.cfg, run_id, folder / "tensorboard", self.val_images, self.val_labels
        )
        kinds = (summaries.TensorBoardSummaries, summaries.MlflowMetrics)
        others = [callback for callback in stage_callbacks if not isinstance(callback, kinds)]
        tracked = [callback for callback in stage_callbacks if isinstance(callback, kinds)]
        return others, tracked if tracking else []


def pipeline_throughput(spec: dict) -> dict:
    """The train stage's training, with or without its tracking callbacks, timed per step."""
    run = PipelineRun(spec)
    steps = steps_to_time(spec, run.execution_steps)
    timer = turn_timer(Turns(spec), spec)
    with tempfile.TemporaryDirectory(prefix="bench-tracking-") as folder:
        others, tracked = run.callbacks(Path(folder), spec["tracking"])
        tracked = [timed(callback) for callback in tracked]
        # One Keras epoch exactly as long as the measurement, so that the end-of-epoch work
        # of the tracking callbacks (histograms, MLflow) happens, timed, in every run. The
        # timer comes first: it holds the tracking's start-up work back until the first turn.
        run.model.fit(
            run.train_set.repeat().take(steps),
            epochs=1,
            callbacks=[timer, *others, *tracked],
            shuffle=False,
            verbose=2,
        )
        hook_seconds: dict[str, float] = defaultdict(float)
        for callback in tracked:
            for hook, seconds in callback.seconds.items():
                hook_seconds[hook] += seconds
        if tracked:
            import mlflow

            mlflow.end_run()  # while its store still exists
    return {
        "window_seconds": timer.window_seconds,
        "window_steps": timer.window_steps,
        "batch_size": run.cfg.train.batch_size,
        "steps_per_execution": run.execution_steps,
        "steps_trained": steps,
        "steps_per_epoch": run.steps_per_epoch,
        "total_steps": run.total_steps,
        "hook_seconds": dict(hook_seconds),
        "flops": training_flops(run.model),
    }


def test_accuracy_probe(model: Any, images: Any, labels: Any, batch_size: int) -> Any:
    """A function that returns the model's accuracy on the test images, without dropout."""
    import numpy as np
    import tensorflow as tf

    forward = tf.function(lambda batch: tf.argmax(model(batch, training=False), axis=1))
    batches = [
        tf.constant(images[start : start + batch_size], dtype=tf.float32)
        for start in range(0, len(images), batch_size)
    ]

    def accuracy() -> float:
        predicted = np.concatenate([forward(batch).numpy() for batch in batches])
        return float((predicted == labels).mean())

    return accuracy


def time_to_accuracy(spec: dict) -> dict:
    """Training images and seconds until test accuracy first reaches the target."""
    import keras

    from pipeline import data
    from pipeline.summaries import passed_multiple

    run = PipelineRun(spec)
    test_images, test_labels = data.load_split(Path(spec["data_dir"]), "test")
    accuracy = test_accuracy_probe(run.model, test_images, test_labels, 1000)
    every, target = spec["every_n_steps"], spec["target"]

    class Probe(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.curve: list[tuple[int, float, float]] = []  # step, accuracy, seconds
            self.evaluating = 0.0
            self.step = 0

        def on_train_begin(self, logs: dict | None = None) -> None:
            self.started = time.perf_counter()

        def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
            before, self.step = self.step, int(self.model.optimizer.iterations)
            if not passed_multiple(before, self.step, every):
                return
            paused = time.perf_counter()
            value = accuracy()
            self.curve.append((self.step, value, paused - self.started - self.evaluating))
            self.evaluating += time.perf_counter() - paused
            log("step %d: test accuracy %.4f", self.step, value)
            if value >= target:
                self.model.stop_training = True

    probe = Probe()
    with tempfile.TemporaryDirectory(prefix="bench-accuracy-") as folder:
        others, _ = run.callbacks(Path(folder), tracking=False)
        run.model.fit(
            run.train_set,
            epochs=run.epochs,
            callbacks=[*others, probe],
            shuffle=False,
            verbose=2,
        )
    reached = [point for point in probe.curve if point[1] >= target]
    return {
        "curve": probe.curve,
        "target": target,
        "batch_size": run.cfg.train.batch_size,
        "steps": reached[0][0] if reached else None,
        "seconds": reached[0][2] if reached else None,
        "total_steps": run.total_steps,
        "steps_per_epoch": run.steps_per_epoch,
        "every_n_steps": every,
        "eval_seconds": probe.evaluating,
    }


def main(argv: list[str]) -> None:
    """Run one task and write its figures as JSON."""
    if len(argv) != 3 or argv[0] not in TASKS:
        sys.exit(f"usage: python -m benchmarks.worker {{{','.join(TASKS)}}} SPEC_JSON OUT_JSON")
    task, spec, out = argv[0], json.loads(argv[1]), Path(argv[2])
    functions = {
        "matmul": matmul,
        "baseline": baseline,
        "pipeline": pipeline_throughput,
        "time_to_accuracy": time_to_accuracy,
    }
    result = functions[task](spec)
    result.setdefault("peak_rss_bytes", peak_rss_bytes())
    out.write_text(json.dumps(result), encoding="utf-8")


if __name__ == "__main__":
    main(sys.argv[1:])
