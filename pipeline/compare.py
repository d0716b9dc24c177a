"""Compare MLflow runs: a pandas table of what differed between them and how they scored.

    python -m pipeline.compare                          # every run of the experiment
    python -m pipeline.compare --sweep <parent run id>  # the jobs of one sweep
    python -m pipeline.compare --tag experiment=tutorial --sort test/accuracy
    python -m pipeline.compare --sweep <id> --markdown runs.md --csv runs.csv --plot val.png

The table has one row per run: its id and name, its status, the parameters whose
values differ between the selected runs (output folders, `paths.*`, aside) and the key
metrics, best first. `--plot` draws the validation accuracy of every run per epoch.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException

from pipeline import config, plots, tracking
from pipeline.errors import PipelineError

log = logging.getLogger("pipeline.compare")

KEY_METRICS = ("val/accuracy", "test/accuracy", "test/loss", "train/seconds")
IGNORED_PARAMS = ("paths.",)  # where a run wrote its outputs, not what it trained


def select_runs(
    experiment_name: str, sweep: str | None = None, tags: dict[str, str] | None = None
) -> pd.DataFrame:
    """The runs of an experiment, optionally of one sweep and with given tags."""
    filters = []
    if sweep:
        filters.append(f"tags.mlflow.parentRunId = '{sweep}'")
    for key, value in (tags or {}).items():
        filters.append(f"tags.`{key}` = '{value}'")
    try:
        experiment = mlflow.get_experiment_by_name(experiment_name)
        if experiment is None:
            raise PipelineError(f"MLflow has no experiment named {experiment_name!r}")
        runs = mlflow.search_runs(
            [experiment.experiment_id], filter_string=" and ".join(filters), max_results=10000
        )
    except MlflowException as error:
        raise PipelineError(f"cannot search MLflow runs: {error.message}") from None
    # Sweep parents hold no parameters of their own: they are summaries, not runs.
    param_columns = [column for column in runs.columns if column.startswith("params.")]
    if param_columns:
        runs = runs[runs[param_columns].notna().any(axis=1)]
    return runs.reset_index(drop=True)


def differing_params(runs: pd.DataFrame) -> list[str]:
    """The parameters that do not have one and the same value in every run."""
    names = []
    for column in sorted(c for c in runs.columns if c.startswith("params.")):
        name = column.removeprefix("params.")
        if name.startswith(IGNORED_PARAMS):
            continue
        if runs[column].fillna("<unset>").nunique() > 1:
            names.append(name)
    return names


def comparison_table(runs: pd.DataFrame, sort_by: str, ascending: bool = False) -> pd.DataFrame:
    """One row per run: id, name, status, the differing parameters and the key metrics."""
    metrics = list(dict.fromkeys([sort_by, *KEY_METRICS]))
    table = pd.DataFrame(
        {
            "run_id": runs["run_id"],
            "run_name": runs.get("tags.mlflow.runName"),
            "status": runs["status"],
        }
    )
    for name in differing_params(runs):
        table[name] = runs[f"params.{name}"]
    for name in metrics:
        column = runs.get(f"metrics.{name}")
        table[name] = column if column is not None else float("nan")
    return table.sort_values(sort_by, ascending=ascending, na_position="last").reset_index(
        drop=True
    )


def plot_val_accuracy(table: pd.DataFrame, path: Path) -> None:
    """Save the validation accuracy per epoch of every run as one PNG."""
    client = mlflow.MlflowClient()
    params = [c for c in table.columns if c not in ("run_id", "run_name", "status", *KEY_METRICS)]
    curves = {}
    for row in table.to_dict("records"):
        history = client.get_metric_history(row["run_id"], "val/accuracy")
        label = ", ".join(f"{name}={row[name]}" for name in params[:3])
        curves[f"{row['run_name']} {label}".strip()] = (
            [point.step for point in history],
            [point.value for point in history],
        )
    plots.compared_curves(curves, "val/accuracy", path)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipeline.compare", description=__doc__)
    parser.add_argument("--experiment", help="MLflow experiment (default: tracking.*)")
    parser.add_argument("--sweep", help="only the jobs of this sweep's parent run id")
    parser.add_argument(
        "--tag", action="append", default=[], metavar="KEY=VALUE", help="only runs with it"
    )
    parser.add_argument("--sort", default="val/accuracy", help="metric to sort by, best first")
    parser.add_argument("--ascending", action="store_true", help="lowest first (losses)")
    parser.add_argument("--csv", type=Path, help="also write the table as CSV")
    parser.add_argument("--markdown", type=Path, help="also write the table as Markdown")
    parser.add_argument("--plot", type=Path, help="write validation accuracy curves (PNG)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Print the comparison table and write the requested files; 1 on an error."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = _parse_args(argv)
    try:
        if args.sweep is not None and not args.sweep.strip():
            raise PipelineError("--sweep: empty; give the sweep's parent run id")
        tags = dict(_split_tag(tag) for tag in args.tag)
        cfg = config.load_params()
        tracking.use_store(cfg)
        runs = select_runs(args.experiment or cfg.tracking.experiment_name, args.sweep, tags)
        if runs.empty:
            raise PipelineError("no MLflow runs match; check --experiment, --sweep and --tag")
        known = sorted(
            c.removeprefix("metrics.") for c in runs.columns if c.startswith("metrics.")
        )
        if args.sort not in known:
            raise PipelineError(f"--sort {args.sort!r}: no such metric; one of {', '.join(known)}")
        for output in (args.csv, args.markdown, args.plot):
            if output is not None and not output.parent.is_dir():
                raise PipelineError(f"{output}: its folder does not exist")
        table = comparison_table(runs, args.sort, args.ascending)
    except PipelineError as error:
        log.error("%s", error)
        return 1

    with pd.option_context("display.width", 200, "display.max_columns", 50):
        print(table.to_string(index=False, float_format=lambda value: f"{value:.4f}"))
    try:
        if args.csv:
            table.to_csv(args.csv, index=False)
        if args.markdown:
            args.markdown.write_text(table.to_markdown(index=False, floatfmt=".4f") + "\n")
        if args.plot:
            plot_val_accuracy(table, args.plot)
    except OSError as error:
        log.error("cannot write %s: %s", error.filename, error.strerror)
        return 1
    return 0


def _split_tag(text: str) -> tuple[str, str]:
    key, separator, value = text.partition("=")
    if not separator or not key:
        raise PipelineError(f"--tag {text!r}: expected KEY=VALUE")
    return key, value


if __name__ == "__main__":
    sys.exit(main())
