"""Command-line entry points shared by the stages.

Each stage module ends in `cli.main(run)`. DVC calls a stage with `--params params.yaml`
(the file it tracks); without that flag the stage takes Hydra's command line over
`conf/`, for direct runs, overrides and sweeps. Both validate with the same schema.
"""

from __future__ import annotations

import logging
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


def run_with_hydra(stage: Stage) -> None:
    """Run a stage under Hydra's command line (overrides, -m sweeps) over `conf/`."""
    import hydra

    @hydra.main(config_path=str(config.CONF_DIR), config_name="config", version_base=None)
    def task(cfg: DictConfig) -> Any:
        try:
            return stage(config.validate(cfg))
        except PipelineError as error:
            _fail(error)

    task()


def main(stage: Stage, argv: list[str] | None = None) -> None:
    """Dispatch to `--params FILE` (DVC) or to Hydra's command line."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--params"]:
        if len(args) != 2:
            sys.exit("usage: python -m pipeline.<stage> --params params.yaml")
        run_from_params(stage, Path(args[1]))
    else:
        run_with_hydra(stage)
