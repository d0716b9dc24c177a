"""Rerun an MLflow run from what it recorded and check that its test metrics come back.

    python -m pipeline.reproduce <run id>

Takes the run's composed config (`config.yaml`, with its seed), checks that the code
revision and the DVC data hashes it was tagged with match this checkout (a mismatch is
reported, since results can then differ), trains and evaluates again into
`outputs/reproduce/<run id>/` as a new run tagged `reproduces`, and compares the test
metrics. Exit status 0: identical; 1: different, or the run cannot be reproduced.
"""

from __future__ import annotations

import logging
import sys
import tempfile
from pathlib import Path

import mlflow
import yaml
from mlflow.exceptions import MlflowException

from pipeline import cli, config, evaluate, tracking, train
from pipeline.config import PipelineConfig
from pipeline.errors import PipelineError

log = logging.getLogger("pipeline.reproduce")

COMPARED = ("test/accuracy", "test/loss", "test/errors")


def recorded_config(run: mlflow.entities.Run) -> PipelineConfig:
    """The config a run recorded as its `config.yaml` artifact, validated."""
    with tempfile.TemporaryDirectory() as folder:
        try:
            path = mlflow.artifacts.download_artifacts(
                run_id=run.info.run_id, artifact_path="config.yaml", dst_path=folder
            )
        except (MlflowException, OSError) as error:
            raise PipelineError(f"run {run.info.run_id} has no config.yaml ({error})") from None
        return config.validate(yaml.safe_load(Path(path).read_text(encoding="utf-8")))


def provenance_warnings(run: mlflow.entities.Run, cfg: PipelineConfig) -> list[str]:
    """What differs between the run's recorded code and data and this checkout."""
    recorded, current = run.data.tags, tracking.run_tags(cfg)
    warnings = []
    if recorded.get("git.commit") != current["git.commit"]:
        warnings.append(
            f"code: the run used commit {recorded.get('git.commit')}, this checkout is at "
            f"{current['git.commit']}; `git checkout` that commit for an exact rerun"
        )
    if recorded.get("git.dirty") == "True":
        warnings.append("code: the run was made from a tree with uncommitted changes")
    for tag, value in recorded.items():
        if tag.startswith("dvc.md5.") and current.get(tag) != value:
            warnings.append(
                f"data: {tag.removeprefix('dvc.md5.')} was {value}, is now "
                f"{current.get(tag, 'absent')}; `dvc checkout` the run's dvc.lock"
            )
    return warnings


def run(run_id: str) -> bool:
    """Rerun `run_id` and report whether its test metrics are identical."""
    cfg = config.load_params()
    tracking.connect(cfg)
    try:
        original = mlflow.get_run(run_id)
    except MlflowException as error:
        raise PipelineError(f"run {run_id}: {error.message}") from None
    missing = [name for name in COMPARED if name not in original.data.metrics]
    if original.info.status != "FINISHED" or missing:
        raise PipelineError(
            f"run {run_id} ended {original.info.status} without {', '.join(missing) or 'all'} "
            "of its test metrics: there is nothing to compare a rerun with"
        )
    rerun_cfg = recorded_config(original)
    for warning in provenance_warnings(original, rerun_cfg):
        log.warning("%s", warning)

    folder = Path("outputs") / "reproduce" / run_id
    rerun_cfg.paths.models_dir = str(config.PROJECT_ROOT / folder / "models")
    rerun_cfg.paths.reports_dir = str(config.PROJECT_ROOT / folder / "reports")
    rerun_cfg.tracking.tags = {**rerun_cfg.tracking.tags, "reproduces": run_id}
    rerun_cfg.tracking.tracking_uri = mlflow.get_tracking_uri()  # next to the original
    log.info("rerunning %s (seed %d) into %s", run_id, rerun_cfg.seed, folder)
    train.run(rerun_cfg)
    metrics = evaluate.run(rerun_cfg, register=False)["test"]

    same = True
    for name in COMPARED:
        before = original.data.metrics.get(name)
        after = float(metrics[name.removeprefix("test/")])
        if before is None:
            log.warning("%s: not recorded by the original run", name)
            continue
        same &= before == after
        log.info(
            "%s: original %s, rerun %s%s",
            name,
            before,
            after,
            "" if before == after else " (differs)",
        )
    return same


def main(argv: list[str] | None = None) -> int:
    """Command line: one run id; exit 0 when the rerun matches."""
    logging.basicConfig(level=logging.INFO, format=cli.LOG_FORMAT)
    cli.exit_on_sigterm()  # a killed rerun ends its MLflow run FAILED, not RUNNING
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.exit("usage: python -m pipeline.reproduce <MLflow run id>")
    try:
        same = run(args[0])
    except PipelineError as error:
        log.error("%s", error)
        return 1
    log.info("reproduced: identical test metrics" if same else "not reproduced: metrics differ")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
