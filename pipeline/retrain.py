"""Scheduled retraining: rerun the pipeline if anything changed, promote only a better model.

    python -m pipeline.retrain

1. Takes a lock, so that two retrains (a slow one and the next scheduled one) never run
   at once.
2. Runs `dvc repro`: only what changed reruns (new digits in `data/incoming`, code,
   parameters); the evaluate stage registers a new model as the `challenger`.
3. Compares the challenger with the `champion` on the same test split and moves the
   champion alias to it only when its test accuracy is at least `registry.floor` and
   higher than the champion's by more than `registry.margin`. The first model becomes
   champion when it passes the floor. A failed run never registers a challenger.
4. Writes the decision with both models' metrics to `reports/retrain/` as JSON and
   records it as a run of the MLflow experiment `<tracking.experiment_name>-retrain`.

Exit status, for schedulers: 0 promoted, 1 failed, 2 rejected (the champion stays),
3 skipped (nothing new to decide), 4 another retrain holds the lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import mlflow
import numpy as np

from pipeline import cli, config, data, files, registry, tracking
from pipeline.config import PROJECT_ROOT, PipelineConfig
from pipeline.errors import PipelineError

log = logging.getLogger("pipeline.retrain")

LOCK_FILE = PROJECT_ROOT / ".retrain.lock"
EXIT_CODES = {"promoted": 0, "failed": 1, "rejected": 2, "skipped": 3, "locked": 4}
DECISION_TAG = "retrain.decision"  # on a model version once a retrain has judged it


class RetrainLocked(PipelineError):
    """Another retrain holds the lock."""


@contextlib.contextmanager
def exclusive_lock(path: Path = LOCK_FILE) -> Iterator[None]:
    """Hold an exclusive lock on `path` for the block, or raise RetrainLocked at once."""
    with open(path, "a+", encoding="utf-8") as handle:
        try:
            # flock is released by the kernel when the process ends, even on a crash.
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise RetrainLocked(
                f"another retrain is running ({holder}); this one exits without changes"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} since {datetime.now(UTC):%Y-%m-%d %H:%M:%SZ}")
        handle.flush()
        try:
            yield
        finally:
            handle.truncate(0)
            fcntl.flock(handle, fcntl.LOCK_UN)


def repro() -> tuple[bool, list[str], str]:
    """Run `dvc repro`, echoing its output; return success, the stages run, the tail."""
    log.info("step 1: dvc repro (reruns only what changed)")
    process = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro"],
        cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    try:
        for line in process.stdout:
            sys.stdout.write(line)
            lines.append(line.rstrip())
        process.wait()
    finally:
        if process.poll() is None:  # interrupted: take the pipeline down too
            process.terminate()
            process.wait(timeout=120)
    stages = [line.split("'")[1] for line in lines if line.startswith("Running stage '")]
    return process.returncode == 0, stages, "\n".join(lines[-15:])


def test_metrics(cfg: PipelineConfig, alias: str) -> dict | None:
    """Test accuracy and loss of the registered model with `alias`, on today's test split."""
    from pipeline.evaluate import softmax_cross_entropy

    version = registry.version_with_alias(cfg, alias)
    if version is None:
        return None
    uri = registry.model_uri(cfg, alias)
    try:
        model = mlflow.keras.load_model(uri)
    except Exception as error:  # MLflow, Keras and the file system each raise their own
        raise PipelineError(
            f"cannot load the {alias}, {uri} (version {version.version}): "
            f"{str(error).splitlines()[0]}; restore its artifacts or move the alias"
        ) from None
    images, labels = data.load_split(cfg.path(cfg.paths.processed_dir), "test")
    logits = model.predict(images.astype(np.float32), batch_size=1000, verbose=0)
    labels = labels.astype(np.int64)
    return {
        "version": str(version.version),
        "run_id": version.run_id,
        "run_status": mlflow.get_run(version.run_id).info.status,
        "test_accuracy": float((logits.argmax(axis=1) == labels).mean()),
        "test_loss": softmax_cross_entropy(logits, labels),
    }


def incoming_rejected(cfg: PipelineConfig) -> dict[str, str]:
    """The files in `paths.incoming_dir` that the preprocess stage skipped, and why."""
    path = cfg.path(cfg.paths.reports_dir) / "data" / "incoming_rejected.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def recorded_metrics(version: object) -> dict | None:
    """What the evaluate stage recorded for a model version (no re-evaluation)."""
    if version is None:
        return None
    return {
        "version": str(version.version),
        "run_id": version.run_id,
        "test_accuracy": float(version.tags.get("test/accuracy", "nan")),
        "test_loss": float(version.tags.get("test/loss", "nan")),
    }


def decide(cfg: PipelineConfig, challenger: dict, champion: dict | None) -> tuple[str, str]:
    """Promote or reject the challenger, and say why."""
    accuracy = challenger["test_accuracy"]
    floor, margin = cfg.registry.floor, cfg.registry.margin
    if challenger["run_status"] != "FINISHED" or not math.isfinite(challenger["test_loss"]):
        return "rejected", f"its run is {challenger['run_status']} or its test loss is not finite"
    if accuracy < floor:
        return "rejected", f"test accuracy {accuracy:.4f} is below registry.floor {floor}"
    if champion is None:
        return "promoted", f"first model; test accuracy {accuracy:.4f} >= floor {floor}"
    gain = accuracy - champion["test_accuracy"]
    if gain > margin:
        return "promoted", f"test accuracy {accuracy:.4f} beats the champion by {gain:+.4f}"
    return (
        "rejected",
        f"test accuracy {accuracy:.4f} is {gain:+.4f} against the champion's "
        f"{champion['test_accuracy']:.4f}; registry.margin asks for more than {margin}",
    )


def record(cfg: PipelineConfig, report: dict) -> Path:
    """Write the decision as JSON and log it as a run of the retrain experiment."""
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    path = cfg.path(cfg.paths.reports_dir) / "retrain" / f"{stamp}-{report['decision']}.json"
    files.write_json(path, report)
    try:
        _log_decision(cfg, report, stamp)
    except Exception as error:  # the JSON report stands even when MLflow is down
        log.warning("decision not recorded in MLflow (%s); the report is %s", error, path)
    return path


def _log_decision(cfg: PipelineConfig, report: dict, stamp: str) -> None:
    experiment = f"{cfg.tracking.experiment_name}-retrain"
    if mlflow.get_experiment_by_name(experiment) is None:
        location = tracking.local_path(cfg.tracking.artifact_dir).resolve().as_uri()
        mlflow.create_experiment(experiment, artifact_location=location)
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=f"retrain-{stamp}", tags={"decision": report["decision"]}):
        mlflow.log_params({"margin": cfg.registry.margin, "floor": cfg.registry.floor})
        for role in ("challenger", "champion"):
            if report.get(role):
                if math.isfinite(report[role]["test_accuracy"]):
                    mlflow.log_metric(f"{role}/test_accuracy", report[role]["test_accuracy"])
                mlflow.set_tag(f"{role}.version", report[role]["version"])
        mlflow.log_dict(report, "decision.json")


def judge(cfg: PipelineConfig, report: dict, repro_failure: str | None) -> None:
    """Fill in the decision, moving the champion alias when the challenger wins."""
    log.info("step 2: challenger against champion (%s)", cfg.registry.model_name)
    challenger_version = registry.version_with_alias(cfg, registry.CHALLENGER)
    champion_version = registry.version_with_alias(cfg, registry.CHAMPION)
    report["challenger"] = recorded_metrics(challenger_version)
    report["champion"] = recorded_metrics(champion_version)
    if repro_failure is not None:
        report |= {"decision": "failed", "reason": f"dvc repro failed:\n{repro_failure}"}
    elif challenger_version is None:
        report |= {"decision": "failed", "reason": "the pipeline registered no model"}
    elif DECISION_TAG in challenger_version.tags or (
        champion_version is not None and champion_version.version == challenger_version.version
    ):
        report |= {
            "decision": "skipped",
            "reason": f"nothing new: version {challenger_version.version} was already judged",
        }
    else:
        report["challenger"] = test_metrics(cfg, registry.CHALLENGER)
        report["champion"] = test_metrics(cfg, registry.CHAMPION)
        report["decision"], report["reason"] = decide(
            cfg, report["challenger"], report["champion"]
        )
        if report["decision"] == "promoted":
            registry.promote(cfg, challenger_version.version)
        mlflow.MlflowClient().set_model_version_tag(
            cfg.registry.model_name, challenger_version.version, DECISION_TAG, report["decision"]
        )


def retrain() -> str:
    """Run the pipeline and decide about its model; return the decision."""
    report: dict = {"started": datetime.now(UTC).isoformat(timespec="seconds")}
    succeeded, stages, tail = repro()
    report["stages_run"] = stages
    cfg = PipelineConfig()  # where to report if params.yaml itself is the problem
    try:
        cfg = config.load_params()
        report |= {"margin": cfg.registry.margin, "floor": cfg.registry.floor}
        report["incoming_rejected"] = incoming_rejected(cfg)
        tracking.connect(cfg)
        judge(cfg, report, None if succeeded else tail)
    except PipelineError as error:
        report |= {"decision": "failed", "reason": str(error)}

    path = record(cfg, report)
    log.info("step 3: %s: %s (report %s)", report["decision"], report["reason"], path)
    return report["decision"]


def main() -> int:
    """Command line: retrain under the lock; the exit status says what happened."""
    logging.basicConfig(level=logging.INFO, format=cli.LOG_FORMAT)
    cli.exit_on_sigterm()
    try:
        with exclusive_lock():
            decision = retrain()
    except RetrainLocked as error:
        log.error("%s", error)
        return EXIT_CODES["locked"]
    except PipelineError as error:
        log.error("%s", error)
        return EXIT_CODES["failed"]
    return EXIT_CODES[decision]


if __name__ == "__main__":
    sys.exit(main())
