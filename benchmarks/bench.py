"""Benchmark the train stage against the machine's limit and a plain-Keras baseline.

    python -m benchmarks.bench                      # the full run, 6 minutes on a quiet machine
    python -m benchmarks.bench --quick              # about 1 minute, for CI
    python -m benchmarks.bench --markdown results.md

Every figure comes from one run on one machine, so the ratios compare like with like.
TensorFlow reads its settings once per process, so each measured configuration runs in
a worker process of its own (`benchmarks.worker`): float32 matrix multiplication, the
plain-Keras baseline with TensorFlow's defaults, and the train stage's training with
and without tracking. The workers start together and then take turns, one window of
steps each, so that whatever else runs on the machine slows neighbouring windows
alike; each ratio is the median of the ratios between windows of the same round.

Afterwards, one at a time: the time to 99% test accuracy with the default
configuration (not in --quick), a no-op `dvc repro`, and the peak memory of the train
stage. Progress goes to stderr, the report (Markdown) to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from benchmarks.worker import load_config

# Captured before anything imports `pipeline`, whose import sets TF_ENABLE_ONEDNN_OPTS:
# the workers must get the environment as the user has it.
USER_ENV = dict(os.environ)
PROJECT_ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30

# A worker must not inherit a tracking server or an active run from the user's shell.
PRIVATE_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME")


@dataclass
class Mode:
    """How much to measure: the full run or --quick."""

    name: str
    rounds: int  # windows per configuration, taken in turns
    warmup_steps: int  # training steps before the first window
    window_steps: int
    matmul_repeats: int  # multiplications per window
    time_to_accuracy: bool
    stage_epochs: int  # 0: peak memory from the tracking worker, not from a stage run
    dvc_repeats: int


FULL = Mode("full", 20, 100, 50, 8, True, 1, 3)
QUICK = Mode("quick", 3, 20, 50, 4, False, 0, 1)


class BenchError(RuntimeError):
    """A worker or a command failed; the message says which."""


def log(message: str, *args: object) -> None:
    """One progress line on stderr."""
    print(f"[bench] {message % args}", file=sys.stderr, flush=True)


def worker_env(onednn: str | None = None) -> dict[str, str]:
    """The user's environment without MLflow's variables, oneDNN as asked."""
    env = {key: value for key, value in USER_ENV.items() if key not in PRIVATE_VARIABLES}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    if onednn is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = onednn
    return env


def median(values: list[float]) -> float:
    """The median, or NaN for no values."""
    return statistics.median(values) if values else float("nan")


@dataclass
class Worker:
    """A worker process that runs only during the turns it is granted."""

    name: str
    task: str
    spec: dict
    env: dict[str, str]
    out: Path
    process: subprocess.Popen | None = None
    grant: IO[bytes] | None = None
    done: IO[bytes] | None = None

    def start(self) -> None:
        """Start the process with one pipe for turns granted and one for turns ended."""
        grant_read, grant_write = os.pipe()
        done_read, done_write = os.pipe()
        spec = {**self.spec, "grant_fd": grant_read, "done_fd": done_write}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.worker", self.task, json.dumps(spec), self.out],
            cwd=PROJECT_ROOT,
            env=self.env,
            pass_fds=(grant_read, done_write),
            stdout=sys.stderr,  # Keras prints progress on stdout; the report owns it
        )
        os.close(grant_read)
        os.close(done_write)
        self.grant = os.fdopen(grant_write, "wb", buffering=0)
        self.done = os.fdopen(done_read, "rb", buffering=0)

    def wait_turn_end(self) -> None:
        """Block until the worker says its turn (or its set-up) is over."""
        if not self.done.read(1):
            raise BenchError(f"the {self.name} worker exited with {self.process.wait()}")

    def turn(self) -> None:
        """Let the worker run one turn and wait for it to end."""
        with contextlib.suppress(BrokenPipeError):  # it has exited: wait_turn_end says so
            self.grant.write(b"g")
        self.wait_turn_end()

    def finish(self) -> dict:
        """Grant the last turn, in which the worker wraps up; return its figures."""
        self.grant.write(b"g")
        self.grant.close()
        status = self.process.wait()
        self.done.close()
        if status:
            raise BenchError(f"the {self.name} worker exited with {status}")
        return json.loads(self.out.read_text(encoding="utf-8"))

    def kill(self) -> None:
        """Stop the process if it still runs (after another worker failed)."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def make_workers(mode: Mode, data_dir: Path, overrides: list[str], folder: Path) -> list[Worker]:
    """The four configurations measured side by side."""
    training = {
        "data_dir": str(data_dir),
        "warmup": mode.warmup_steps,
        "windows": mode.rounds,
        "window_steps": mode.window_steps,
    }
    pipeline = {**training, "overrides": overrides}
    matmul = {"size": 2048, "warmup": 3, "windows": mode.rounds, "repeats": mode.matmul_repeats}
    workers = [
        ("matmul", "matmul", {**matmul, "pipeline_settings": True}, worker_env()),
        ("baseline", "baseline", {**training, "seed": 42, "batch_size": 100}, worker_env("0")),
        ("pipeline", "pipeline", {**pipeline, "tracking": False}, worker_env()),
        ("tracking", "pipeline", {**pipeline, "tracking": True}, worker_env()),
    ]
    return [
        Worker(name, task, spec, env, folder / f"{name}.json") for name, task, spec, env in workers
    ]


def run_in_turns(workers: list[Worker], rounds: int) -> dict[str, dict]:
    """Start the workers together, then alternate their windows; return their figures."""
    try:
        for worker in workers:
            worker.start()
        log("starting %d workers (TensorFlow start-up, data, model)", len(workers))
        for worker in workers:
            worker.wait_turn_end()
        for worker in workers:
            log("warm-up: %s", worker.name)
            worker.turn()
        for round_index in range(rounds):
            # A different worker goes first in every round: none always follows the same one.
            shift = round_index % len(workers)
            for worker in workers[shift:] + workers[:shift]:
                worker.turn()
            log("round %d of %d done", round_index + 1, rounds)
        results = {}
        for worker in workers:
            log("finishing: %s", worker.name)
            results[worker.name] = worker.finish()
        return results
    finally:
        for worker in workers:
            worker.kill()


def run_alone(task: str, spec: dict, out: Path) -> dict:
    """Run one worker without turns: nothing else of the bench runs meanwhile."""
    command = [sys.executable, "-m", "benchmarks.worker", task, json.dumps(spec), str(out)]
    status = subprocess.run(
        command, cwd=PROJECT_ROOT, env=worker_env(), stdout=sys.stderr, check=False
    ).returncode
    if status:
        raise BenchError(f"the {task} worker exited with {status}")
    return json.loads(out.read_text(encoding="utf-8"))


def prepare_data(mnist_dir: str | None, folder: Path) -> tuple[Path, str]:
    """The processed splits: the preprocess stage's, else parsed from the IDX files."""
    from pipeline import data, preprocess
    from pipeline.errors import PipelineError

    cfg = load_config([])
    processed = cfg.path(cfg.paths.processed_dir)
    if not mnist_dir and all((processed / f"{split}.npz").is_file() for split in data.SPLITS):
        return processed, f"{processed.relative_to(PROJECT_ROOT)} (the preprocess stage's)"
    source = mnist_dir or USER_ENV.get("MNIST_MIRROR")
    if not source:
        raise BenchError(
            f"{processed} is missing: run `dvc repro`, or point --mnist (or MNIST_MIRROR) "
            "at a folder holding the four MNIST .gz files"
        )
    if not Path(source).is_dir():
        raise BenchError(f"{source}: not a folder (--mnist and MNIST_MIRROR name a folder)")
    cfg.paths.raw_dir = str(Path(source).resolve())  # preprocess reads the IDX files there
    try:
        splits = preprocess.split(cfg)
    except PipelineError as error:
        raise BenchError(str(error)) from None
    for split, (images, labels) in splits.items():
        data.save_split(folder, split, images, labels)
    return folder, f"parsed from the IDX files in {source}"


def time_to_accuracy(data_dir: Path, overrides: list[str], folder: Path) -> dict:
    """Train the default configuration until test accuracy reaches 99%, alone."""
    log("time to 99%% test accuracy: evaluating every 50 steps (up to the full schedule)")
    spec = {"data_dir": str(data_dir), "overrides": overrides, "every_n_steps": 50}
    return run_alone("time_to_accuracy", {**spec, "target": 0.99}, folder / "accuracy.json")


def stage_memory(data_dir: Path, overrides: list[str], epochs: int, folder: Path) -> dict:
    """Run the train stage itself, every output in `folder`; its peak resident set."""
    from pipeline import config

    cfg = load_config([*overrides, f"train.epochs={epochs}"])
    cfg.paths.processed_dir = str(data_dir)
    for key in ("models_dir", "reports_dir"):
        setattr(cfg.paths, key, str(folder / "stage" / key))
    cfg.tracking.tracking_uri = f"sqlite:///{folder / 'stage' / 'mlflow.db'}"
    cfg.tracking.artifact_dir = str(folder / "stage" / "mlartifacts")
    cfg.tracking.tensorboard_dir = str(folder / "stage" / "tensorboard")
    params = folder / "stage-params.yaml"
    params.write_text(config.to_yaml(cfg), encoding="utf-8")

    log("train stage, %d epoch(s), outputs in a temporary folder: peak memory", epochs)
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline.train", "--params", str(params)],
        cwd=PROJECT_ROOT,
        env=worker_env(),
        stdout=sys.stderr,
    )
    # wait4 reports this child's own peak, not the largest of every child so far.
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise BenchError(f"the train stage exited with {process.returncode}")
    return {
        "peak_rss_bytes": usage.ru_maxrss * 1024,
        "seconds": time.perf_counter() - started,
        "epochs": epochs,
    }


def dvc_noop(repeats: int) -> dict:
    """Seconds of `dvc repro` when `dvc status` says there is nothing to do."""
    dvc = Path(sys.executable).with_name("dvc")
    command = [str(dvc) if dvc.is_file() else "dvc"]

    def dvc_run(*args: str) -> tuple[float, subprocess.CompletedProcess]:
        started = time.perf_counter()
        done = subprocess.run(
            [*command, *args],
            cwd=PROJECT_ROOT,
            env=USER_ENV,
            capture_output=True,
            text=True,
            check=False,
        )
        return time.perf_counter() - started, done

    log("dvc status, then dvc repro if there is nothing to do")
    status_seconds, status = dvc_run("status")
    if status.returncode or "up to date" not in status.stdout:
        # Then `dvc repro` would run stages and rewrite the project's outputs.
        output = (status.stdout + status.stderr).strip().splitlines()
        stages = [line[:-1] for line in output if line.endswith(":") and line[:1].isalnum()]
        reason = f"stages with changes: {', '.join(stages)}" if stages else " ".join(output[:2])
        return {"seconds": None, "status_seconds": status_seconds, "note": reason}
    seconds = []
    for _ in range(repeats):
        elapsed, repro = dvc_run("repro")
        if repro.returncode or "Running stage" in repro.stdout:
            output = (repro.stdout + repro.stderr).strip().splitlines()
            note = output[0] if output else f"exit status {repro.returncode}"
            return {"seconds": None, "status_seconds": status_seconds, "note": note}
        seconds.append(elapsed)
    return {"seconds": median(seconds), "status_seconds": status_seconds, "note": ""}


@dataclass
class Row:
    """One line of the report: what, how much, the target and whether it is met."""

    measure: str
    value: str
    target: str = ""
    met: bool | None = None


@dataclass
class Report:
    """The figures of one run, turned into a table."""

    mode: Mode
    data_source: str
    overrides: list[str]
    results: dict[str, dict]
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def images_per_second(result: dict) -> list[float]:
    """Images per second of each window of a training worker."""
    pairs = zip(result["window_steps"], result["window_seconds"], strict=True)
    return [result["batch_size"] * steps / seconds for steps, seconds in pairs]


def paired(first: list[float], second: list[float]) -> list[float]:
    """Ratios first/second of the windows of the same round."""
    return [a / b for a, b in zip(first, second, strict=True)]


def flops_per_image(layers: list[dict]) -> float:
    """Training FLOPs per image: forward multiply-adds, 2 FLOPs each, times 3."""
    return 3 * 2 * sum(layer["macs"] for layer in layers)


def throughput_rows(report: Report) -> None:
    """Rows 1 to 5: matmul, baseline, pipeline, tracking overhead and efficiency."""
    results = report.results
    matmul = results["matmul"]["gflops"]
    baseline = images_per_second(results["baseline"])
    plain = images_per_second(results["pipeline"])
    tracked = images_per_second(results["tracking"])
    per_image = flops_per_image(results["pipeline"]["flops"])

    speedup = median(paired(plain, baseline))
    step_overhead = median(paired(plain, tracked)) - 1
    fixed_overhead = tracking_fixed_share(results["tracking"], median(plain))
    overhead = step_overhead + fixed_overhead
    efficiency = median(paired([v * per_image / 1e9 for v in plain], matmul))
    spread = "median of {n} windows, middle half {low:.0f}-{high:.0f}"
    report.rows += [
        Row(
            f"1. float32 matmul {results['matmul']['size']}x{results['matmul']['size']}, "
            "training's thread settings",
            f"{median(matmul):.0f} GFLOP/s ({spread_text(matmul, spread)})",
        ),
        Row(
            "2. plain Keras baseline, TF defaults (oneDNN off), batch 100",
            f"{median(baseline):.0f} images/s ({spread_text(baseline, spread)})",
        ),
        Row(
            "3. pipeline, no tracking",
            f"{median(plain):.0f} images/s ({spread_text(plain, spread)}); "
            f"{speedup:.2f}x the baseline",
            ">= 1.5x baseline",
            speedup >= 1.5,
        ),
        Row(
            "4. pipeline with tracking (MLflow + TensorBoard)",
            f"{median(tracked):.0f} images/s ({spread_text(tracked, spread)}); overhead "
            f"{100 * overhead:.1f}% = {100 * step_overhead:.1f}% per step "
            f"+ {100 * fixed_overhead:.1f}% per run",
            "<= 3%",
            overhead <= 0.03,
        ),
        Row(
            "5. efficiency: pipeline x training FLOPs / matmul",
            f"{100 * efficiency:.0f}% ({median(plain) * per_image / 1e9:.0f} GFLOP/s at "
            f"{per_image / 1e6:.1f} MFLOP per image)",
            ">= 70%",
            efficiency >= 0.70,
        ),
    ]


def spread_text(values: list[float], template: str) -> str:
    """How many windows and the range of their middle half."""
    if len(values) < 4:
        return f"median of {len(values)} windows"
    quartiles = statistics.quantiles(values, n=4)
    return template.format(n=len(values), low=quartiles[0], high=quartiles[2])


def tracking_fixed_share(result: dict, plain_images_per_second: float) -> float:
    """The tracking's once-per-run and once-per-epoch work, over a default training run.

    The windows see only the per-step part; the start-up (graph, first histograms) and
    each epoch's end (histograms, the MLflow batch) are timed in the worker and spread
    over the default run's epochs of `steps_per_epoch` steps.
    """
    hooks, steps = result["hook_seconds"], result["total_steps"]
    epochs = -(-steps // result["steps_per_epoch"])
    fixed = hooks.get("on_train_begin", 0) + hooks.get("on_train_end", 0)
    fixed += epochs * (hooks.get("on_epoch_begin", 0) + hooks.get("on_epoch_end", 0))
    return fixed / (steps * result["batch_size"] / plain_images_per_second)


def tracking_note(result: dict, plain_images_per_second: float) -> str:
    """The tracking overhead again, from the time spent inside its callbacks."""
    hooks, steps = result["hook_seconds"], result["steps_trained"]
    per_step = (hooks.get("on_train_batch_begin", 0) + hooks.get("on_train_batch_end", 0)) / steps
    plain_step = result["batch_size"] / plain_images_per_second
    fixed = tracking_fixed_share(result, plain_images_per_second)
    parts = ", ".join(f"{hook} {seconds:.2f} s" for hook, seconds in sorted(hooks.items()))
    return (
        f"Tracking overhead from the time spent inside the tracking callbacks ({parts}, "
        f"over {steps} steps and one epoch end): {1000 * per_step:.2f} ms per step, "
        f"{100 * per_step / plain_step:.2f}% of a step, plus {100 * fixed:.2f}% per run "
        f"for the start-up and {-(-result['total_steps'] // result['steps_per_epoch'])} "
        "epoch ends: "
        f"{100 * (per_step / plain_step + fixed):.1f}% in all. The side-by-side windows "
        "also catch costs outside the callbacks, and noise."
    )


def accuracy_rows(report: Report, result: dict) -> None:
    """Row 6: training images and seconds until test accuracy first reaches 99%."""
    target = f"{100 * result['target']:.0f}%"
    batch_size = result["batch_size"]
    epoch_images = result["steps_per_epoch"] * batch_size  # 55,000 for MNIST's 55,000
    if result["steps"] is None:
        best = max(point[1] for point in result["curve"])
        images = result["total_steps"] * batch_size
        value = f"not reached in {images:,} images (best {100 * best:.2f}%)"
        report.rows.append(Row(f"6. time to {target} test accuracy", value, "", False))
        return
    images = result["steps"] * batch_size
    value = (
        f"{images:,} images ({images / epoch_images:.2f} epochs), {result['seconds']:.0f} s "
        f"of training (evaluations excluded)"
    )
    report.rows.append(
        Row(
            f"6. time to {target} test accuracy, default config",
            value,
            f"<= {epoch_images:,} images; stretch <= {epoch_images // 2:,}",
            images <= epoch_images,
        )
    )
    curve = ", ".join(f"{step}: {100 * value:.2f}%" for step, value, _ in result["curve"])
    report.notes.append(
        f"Test accuracy by step (every {result['every_n_steps']} steps of {batch_size} "
        f"images): {curve}."
    )
    if images <= epoch_images // 2:
        report.notes.append("Row 6 also meets the stretch target of half an epoch.")


def dvc_row(report: Report, result: dict) -> None:
    """Row 7: `dvc repro` with nothing to do."""
    if result["seconds"] is None:
        report.rows.append(Row("7. `dvc repro`, nothing to do", "not measured", "<= 2 s", None))
        report.notes.append(
            f"Row 7 was skipped: `dvc status` ({result['status_seconds']:.1f} s) did not say "
            f"the pipeline is up to date, so `dvc repro` would have run stages: "
            f"{result['note']}"
        )
        return
    report.rows.append(
        Row(
            "7. `dvc repro`, nothing to do",
            f"{result['seconds']:.2f} s (`dvc status`: {result['status_seconds']:.2f} s)",
            "<= 2 s",
            result["seconds"] <= 2,
        )
    )


def memory_row(report: Report, result: dict, source: str) -> None:
    """Row 8: the peak resident set of the train stage."""
    peak = result["peak_rss_bytes"] / GIB
    report.rows.append(
        Row(f"8. peak memory (resident set), {source}", f"{peak:.2f} GiB", "<= 3 GiB", peak <= 3)
    )


def flops_table(layers: list[dict]) -> list[str]:
    """The derivation of the training FLOPs per image, as Markdown lines."""
    lines = [
        "| layer | forward multiply-adds per image | |",
        "| --- | --- | ---: |",
    ]
    lines += [f"| {row['layer']} | {row['shape']} | {row['macs']:,} |" for row in layers]
    macs = sum(row["macs"] for row in layers)
    lines += [
        f"| total | forward multiply-adds | {macs:,} |",
        f"| | forward FLOPs (2 per multiply-add) | {2 * macs:,} |",
        f"| | training FLOPs (forward + two backward products, 3x) | {6 * macs:,} |",
    ]
    return lines


def render(report: Report) -> str:
    """The report as Markdown: the machine, the table, the FLOP derivation, the notes."""
    met = {True: "yes", False: "**no**", None: "-"}
    lines = [
        f"# Benchmark, {report.mode.name} run",
        "",
        f"- date: {datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
        f"- processor: {cpu_model()}, {os.cpu_count()} cores, {platform.machine()}",
        f"- data: {report.data_source}",
        f"- software: {versions()}",
        f"- rounds of windows: {report.mode.rounds}, {report.mode.window_steps} steps each "
        f"after {report.mode.warmup_steps} warm-up steps",
    ]
    if report.overrides:
        lines.append(f"- config overrides: {' '.join(report.overrides)}")
    if report.mode.name == "quick":
        # Three windows on a shared machine say that the benchmark works, not much more.
        met = dict.fromkeys(met, "not judged (--quick)")
        lines.append("- quick run: too few windows to judge the targets; run without --quick")
    lines += ["", "| measure | value | target | met |", "| --- | --- | --- | --- |"]
    lines += [f"| {r.measure} | {r.value} | {r.target} | {met[r.met]} |" for r in report.rows]
    lines += ["", "Training FLOPs per image, from the layers of the built model:", ""]
    lines += flops_table(report.results["pipeline"]["flops"])
    if report.notes:
        lines += ["", "Notes:", ""]
        # Notes are prose: wrapped, as the rest of the project's Markdown is.
        lines += [
            textwrap.fill(note, 99, initial_indent="- ", subsequent_indent="  ")
            for note in report.notes
        ]
    return "\n".join(lines) + "\n"


def cpu_model() -> str:
    """The processor's name from /proc/cpuinfo, or what the platform module knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown processor"


def versions() -> str:
    """Python, TensorFlow and Keras versions, read without importing TensorFlow."""
    from importlib import metadata

    found = [f"Python {platform.python_version()}"]
    for package in ("tensorflow-cpu", "keras"):
        try:
            found.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            continue
    return ", ".join(found)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench",
        description="Benchmark the train stage against matmul and a plain-Keras baseline.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer windows, no time to 99%%; under 3 minutes"
    )
    parser.add_argument("--markdown", type=Path, help="also write the report to this file")
    parser.add_argument("--json", type=Path, help="write every raw figure to this file")
    parser.add_argument(
        "--mnist",
        help="read the four MNIST .gz files in this folder instead of data/processed "
        "(when data/processed is missing: MNIST_MIRROR)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override the default config for the pipeline's measurements "
        "(e.g. --set train.histogram_every_n_epochs=3); repeatable",
    )
    parser.add_argument("--rounds", type=int, help="windows per configuration")
    return parser.parse_args(argv)


def measure(mode: Mode, args: argparse.Namespace, folder: Path) -> Report:
    """Run every measurement of the mode; return the report."""
    data_dir, data_source = prepare_data(args.mnist, folder)
    log("data: %s", data_source)
    results = run_in_turns(make_workers(mode, data_dir, args.overrides, folder), mode.rounds)
    report = Report(mode, data_source, args.overrides, results)
    throughput_rows(report)
    report.notes.append(tracking_note(results["tracking"], median_plain(report)))

    # Each of these runs alone; one failing leaves the others' figures in the report.
    if mode.time_to_accuracy:
        attempt(
            report,
            "accuracy",
            "6. time to 99% test accuracy",
            accuracy_rows,
            time_to_accuracy,
            data_dir,
            args.overrides,
            folder,
        )
    attempt(report, "dvc", "7. `dvc repro`, nothing to do", dvc_row, dvc_noop, mode.dvc_repeats)
    if mode.stage_epochs:
        source = f"train stage run ({mode.stage_epochs} epoch, outputs to a temporary folder)"
        attempt(
            report,
            "stage",
            "8. peak memory of the train stage",
            lambda report, result: memory_row(report, result, source),
            stage_memory,
            data_dir,
            args.overrides,
            mode.stage_epochs,
            folder,
        )
    else:
        memory_row(report, results["tracking"], "the tracking worker (--quick: no stage run)")
    return report


def attempt(
    report: Report, key: str, measure: str, add_rows: Any, function: Any, *args: Any
) -> None:
    """Run one measurement; on failure, a row that says so instead of no report at all."""
    try:
        result = function(*args)
    except BenchError as error:
        log("%s failed: %s", measure, error)
        report.rows.append(Row(measure, f"failed: {error}", "", False))
        return
    report.results[key] = result
    add_rows(report, result)


def median_plain(report: Report) -> float:
    """The pipeline's median images per second without tracking."""
    return median(images_per_second(report.results["pipeline"]))


def main(argv: list[str] | None = None) -> int:
    """Measure, print the report, and write it where asked."""
    args = parse_args(argv)
    mode = QUICK if args.quick else FULL
    if args.rounds:
        mode = Mode(**{**mode.__dict__, "rounds": args.rounds})
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-") as folder:
        try:
            report = measure(mode, args, Path(folder))
        except BenchError as error:
            log("failed: %s", error)
            return 1
    text = render(report)
    sys.stdout.write(text)
    if args.markdown:
        args.markdown.write_text(text, encoding="utf-8")
    if args.json:
        args.json.write_text(json.dumps(report.results, indent=1), encoding="utf-8")
    log("done in %.0f s", time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
