"""Classify image files with a registered model: the champion unless told otherwise.

    python -m pipeline.predict digit.png more/*.png
    python -m pipeline.predict --version 3 digit.png
    python -m pipeline.predict --alias challenger digit.png

Each file is converted as new training digits are (greyscale, white digit on black,
28x28, centred) and printed with the predicted digit and its softmax probability.
Unreadable files are named; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import mlflow
import numpy as np

from pipeline import config, incoming, registry, tracking
from pipeline.errors import PipelineError

log = logging.getLogger("pipeline.predict")


def load(cfg: config.PipelineConfig, version: str | None, alias: str) -> object:
    """The Keras model of a registered version, or of the version with `alias`."""
    name = cfg.registry.model_name
    uri = f"models:/{name}/{version}" if version else registry.model_uri(cfg, alias)
    try:
        return mlflow.keras.load_model(uri)
    except Exception as error:  # MLflow, Keras and the file system each raise their own
        remedy = (
            f"check the version numbers of {name} in the MLflow UI"
            if version
            else f"make a {alias} with `python -m pipeline.retrain`, or pass --version"
        )
        raise PipelineError(
            f"cannot load {uri} ({str(error).splitlines()[0]}); {remedy}"
        ) from None


def probabilities(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, computed stably."""
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def main(argv: list[str] | None = None) -> int:
    """Print `file: digit (probability)` for each readable file."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(prog="python -m pipeline.predict", description=__doc__)
    parser.add_argument("images", nargs="+", type=Path)
    parser.add_argument("--version", help="a registered version number")
    parser.add_argument("--alias", default=registry.CHAMPION, help="default: champion")
    args = parser.parse_args(argv)

    try:
        cfg = config.load_params()
    except PipelineError as error:
        log.error("%s", error)
        return 1
    images, names, failed = [], [], False
    for path in args.images:
        try:
            images.append(incoming.read_image(path, cfg.data.image_size))
            names.append(path)
        except ValueError as error:
            log.error("%s: %s", path, error)
            failed = True
    if not images:
        return 1
    try:
        tracking.use_store(cfg)
        model = load(cfg, args.version, args.alias)
    except PipelineError as error:
        log.error("%s", error)
        return 1

    logits = model.predict(np.stack(images).astype(np.float32), verbose=0)
    for path, row in zip(names, probabilities(logits), strict=True):
        print(f"{path}: {int(row.argmax())} ({row.max():.3f})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
