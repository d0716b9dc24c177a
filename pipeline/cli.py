"""Command-line entry points shared by the stages.

Each stage module ends in `cli.main(run)`. DVC calls a stage with `--params params.yaml`
(the file it tracks); without that flag the stage takes Hydra's command line over
`conf/`, for direct runs, overrides and sweeps. Both validate with the same schema.
"""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from pipeline import config
from pipeline.errors import PipelineError

log = logging.getLogger("pipeline")

Stage = Callable[[config.PipelineConfig], Any]
LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"


def exit_on_sigterm() -> None:
    """Turn SIGTERM (kill, systemd, a scheduler's timeout) into a normal exit.

    Python's default is to die at once: MLflow runs would stay RUNNING and child
    processes would be orphaned. As SystemExit, `with` blocks and exit hooks run: the
    run ends FAILED, a sweep's parent is closed.
    """

    def terminate(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)


def _fail(error: PipelineError) -> None:
    log.error("%s", error)
    sys.exit(1)


def run_from_params(stage: Stage, params_file: Path) -> Any:
    """Run a stage with the config in a params file, as DVC does."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    try:
        return stage(config.load_params(params_file))
    except PipelineError as error:
        _fail(error)


def _into_job_folder(cfg: config.PipelineConfig, hydra_config: Any) -> config.PipelineConfig:
    """Send the model and reports of a Hydra run to its own folder, not DVC's outputs.

    A single run keeps a folder given on the command line (`paths.models_dir=...`); the
    jobs of a sweep always get their own, or parallel jobs would share one model file.
    """
    from hydra.types import RunMode

    overrides = list(hydra_config.overrides.task)
    for key in ("models_dir", "reports_dir"):
        given = any(o.lstrip("+~").startswith(f"paths.{key}=") for o in overrides)
        if hydra_config.mode == RunMode.MULTIRUN or not given:
            folder = Path(hydra_config.runtime.output_dir) / key.removesuffix("_dir")
            setattr(cfg.paths, key, str(folder))
    return cfg


def run_with_hydra(stage: Stage, job_outputs: bool = False) -> None:
    """Run a stage under Hydra's command line (overrides, -m sweeps) over `conf/`."""
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    @hydra.main(config_path=str(config.CONF_DIR), config_name="config", version_base=None)
    def task(cfg: DictConfig) -> Any:
        try:
            pipeline_cfg = config.validate(cfg)
            if job_outputs:
                pipeline_cfg = _into_job_folder(pipeline_cfg, HydraConfig.get())
            return stage(pipeline_cfg)
        except PipelineError as error:
            if HydraConfig.get().mode != RunMode.MULTIRUN:
                _fail(error)
            # In a sweep, Hydra marks the job failed and goes on with the next one; the
            # basic sweeper then exits non-zero, the Optuna sweeper counts a failed trial.
            log.error("job %d failed: %s", HydraConfig.get().job.num, error)
            raise

    task()


def main(stage: Stage, argv: list[str] | None = None, job_outputs: bool = False) -> None:
    """Dispatch to `--params FILE` (DVC) or to Hydra's command line.

    With `job_outputs`, a Hydra run writes `paths.models_dir` and `paths.reports_dir` in
    its own output folder (`outputs/...`, `multirun/.../<job>`), so that direct runs and
    sweeps never overwrite what DVC tracks.
    """
    args = sys.argv[1:] if argv is None else argv
    exit_on_sigterm()
    if args[:1] == ["--params"]:
        if len(args) != 2:
            sys.exit("usage: python -m pipeline.<stage> --params params.yaml")
        run_from_params(stage, Path(args[1]))
    else:
        run_with_hydra(stage, job_outputs)
