"""The typed configuration schema, and loading it from `params.yaml` or from `conf/`.

`conf/` is the single source of truth; `params.yaml` is `conf/` composed and resolved
(what DVC tracks). Both go through the same schema, so an unknown key, a wrong type or
an impossible value stops a stage before it does any work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.errors import PipelineError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = PROJECT_ROOT / "conf"
PARAMS_FILE = PROJECT_ROOT / "params.yaml"

INITIALIZERS = ("glorot_uniform", "he_normal", "truncated_normal")
SCHEDULES = ("constant", "warmup_cosine")


class ConfigError(PipelineError):
    """A configuration value that the pipeline cannot run with."""


def _require(condition: bool, key: str, message: str, value: Any) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}, got {value!r}")


@dataclass
class MnistFile:
    name: str = "???"
    sha256: str = "???"  # of the decompressed IDX bytes, so any faithful mirror passes


@dataclass
class DataConfig:
    name: str = "mnist"
    # Tried in order after the MNIST_MIRROR environment variable (a URL or a folder).
    mirrors: list[str] = field(default_factory=list)
    train_images: MnistFile = field(default_factory=MnistFile)
    train_labels: MnistFile = field(default_factory=MnistFile)
    test_images: MnistFile = field(default_factory=MnistFile)
    test_labels: MnistFile = field(default_factory=MnistFile)
    image_size: int = 28
    num_classes: int = 10

    def __post_init__(self) -> None:
        for key in ("train_images", "train_labels", "test_images", "test_labels"):
            digest = getattr(self, key).sha256
            if digest == "???":  # the schema's placeholder before a config fills it in
                continue
            _require(
                len(digest) == 64 and all(c in "0123456789abcdef" for c in digest),
                f"data.{key}.sha256",
                "must be 64 lowercase hex digits",
                digest,
            )


@dataclass
class DownloadConfig:
    timeout_s: float = 30.0  # per connection attempt and per read
    retries: int = 3  # attempts per mirror and file for transient failures
    backoff_s: float = 1.0  # wait before the second attempt; doubles after each

    def __post_init__(self) -> None:
        _require(self.timeout_s > 0, "download.timeout_s", "must be positive", self.timeout_s)
        _require(self.retries >= 1, "download.retries", "must be at least 1", self.retries)
        _require(self.backoff_s >= 0, "download.backoff_s", "must be >= 0", self.backoff_s)


@dataclass
class PreprocessConfig:
    val_size: int = 5000  # the first images of the training file, as in the tutorial
    sample_grid: int = 3  # the sample figure shows sample_grid x sample_grid digits

    def __post_init__(self) -> None:
        _require(self.val_size >= 1, "preprocess.val_size", "must be at least 1", self.val_size)
        _require(self.sample_grid >= 1, "preprocess.sample_grid", "must be >= 1", self.sample_grid)


@dataclass
class ModelConfig:
    name: str = "tutorial_cnn"
    conv_filters: list[int] = field(default_factory=lambda: [32, 64])
    kernel_size: int = 5
    pool_size: int = 2
    dense_units: int = 1024
    dropout: float = 0.5  # fraction of dense units dropped while training
    kernel_initializer: str = "glorot_uniform"  # one of INITIALIZERS
    init_stddev: float = 0.1  # stddev of truncated_normal (the tutorial's 0.1)
    bias_init: float = 0.0  # constant bias (the tutorial used 0.1)

    def __post_init__(self) -> None:
        _require(
            len(self.conv_filters) >= 1 and min(self.conv_filters) >= 1,
            "model.conv_filters",
            "must be a non-empty list of positive counts",
            self.conv_filters,
        )
        _require(self.kernel_size >= 1, "model.kernel_size", "must be >= 1", self.kernel_size)
        _require(self.pool_size >= 1, "model.pool_size", "must be >= 1", self.pool_size)
        _require(self.dense_units >= 1, "model.dense_units", "must be >= 1", self.dense_units)
        _require(0.0 <= self.dropout < 1.0, "model.dropout", "must be in [0, 1)", self.dropout)
        _require(
            self.kernel_initializer in INITIALIZERS,
            "model.kernel_initializer",
            f"must be one of {', '.join(INITIALIZERS)}",
            self.kernel_initializer,
        )
        _require(self.init_stddev > 0, "model.init_stddev", "must be positive", self.init_stddev)
        _require(
            math.isfinite(self.bias_init), "model.bias_init", "must be finite", self.bias_init
        )


@dataclass
class OptimizerConfig:
    name: str = "adam"
    lr: float = 3e-3  # peak learning rate
    schedule: str = "warmup_cosine"  # one of SCHEDULES
    warmup_steps: int = 100  # linear warm-up from 0 to lr (warmup_cosine only)
    restart_epochs: float = 1.0  # the first cosine ends here; 0: one cosine to the end
    restart_lr_fraction: float = 0.33  # the second cosine starts at lr * this
    final_lr_fraction: float = 0.0  # each cosine decays to lr * this

    def __post_init__(self) -> None:
        _require(self.name == "adam", "optimizer.name", "must be adam", self.name)
        _require(
            math.isfinite(self.lr) and self.lr > 0,
            "optimizer.lr",
            "must be a positive learning rate",
            self.lr,
        )
        _require(
            self.schedule in SCHEDULES,
            "optimizer.schedule",
            f"must be one of {', '.join(SCHEDULES)}",
            self.schedule,
        )
        _require(
            self.warmup_steps >= 0, "optimizer.warmup_steps", "must be >= 0", self.warmup_steps
        )
        _require(
            math.isfinite(self.restart_epochs) and self.restart_epochs >= 0,
            "optimizer.restart_epochs",
            "must be >= 0 (0: no restart)",
            self.restart_epochs,
        )
        _require(
            0.0 < self.restart_lr_fraction <= 1.0,
            "optimizer.restart_lr_fraction",
            "must be in (0, 1]",
            self.restart_lr_fraction,
        )
        _require(
            0.0 <= self.final_lr_fraction <= 1.0,
            "optimizer.final_lr_fraction",
            "must be in [0, 1]",
            self.final_lr_fraction,
        )


@dataclass
class TrainConfig:
    epochs: int = 3
    batch_size: int = 100
    shuffle_buffer: int = 10000  # images; 0 disables shuffling
    max_steps: int = 0  # stop after this many optimizer steps; 0: train.epochs full passes
    steps_per_execution: int = 10  # optimizer steps per call into TensorFlow
    log_every_n_steps: int = 50  # finer-grained train metrics to MLflow and TensorBoard
    val_every_n_steps: int = 0  # validation-batch summaries to TensorBoard; 0: per epoch
    histogram_every_n_epochs: int = 1  # weight, bias and activation histograms

    def __post_init__(self) -> None:
        _require(self.epochs >= 1, "train.epochs", "must be >= 1", self.epochs)
        _require(self.max_steps >= 0, "train.max_steps", "must be >= 0", self.max_steps)
        _require(
            self.steps_per_execution >= 1,
            "train.steps_per_execution",
            "must be >= 1",
            self.steps_per_execution,
        )
        _require(
            self.val_every_n_steps >= 0,
            "train.val_every_n_steps",
            "must be >= 0",
            self.val_every_n_steps,
        )
        _require(self.batch_size >= 1, "train.batch_size", "must be >= 1", self.batch_size)
        _require(
            self.shuffle_buffer >= 0, "train.shuffle_buffer", "must be >= 0", self.shuffle_buffer
        )
        _require(
            self.log_every_n_steps >= 1,
            "train.log_every_n_steps",
            "must be >= 1",
            self.log_every_n_steps,
        )
        _require(
            self.histogram_every_n_epochs >= 1,
            "train.histogram_every_n_epochs",
            "must be >= 1",
            self.histogram_every_n_epochs,
        )


@dataclass
class EvaluateConfig:
    batch_size: int = 1000
    misclassified_grid: int = 5  # the figure shows up to grid x grid wrong digits

    def __post_init__(self) -> None:
        _require(self.batch_size >= 1, "evaluate.batch_size", "must be >= 1", self.batch_size)
        _require(
            self.misclassified_grid >= 1,
            "evaluate.misclassified_grid",
            "must be >= 1",
            self.misclassified_grid,
        )


@dataclass
class TrackingConfig:
    # null: the SQLite store mlflow.db at the project root; MLFLOW_TRACKING_URI wins.
    tracking_uri: str | None = None
    experiment_name: str = "mnist-cnn"
    artifact_dir: str = "mlartifacts"  # for experiments this project creates
    tensorboard_dir: str = "logs/tensorboard"  # one timestamped folder per run
    tags: dict[str, str] = field(default_factory=dict)  # added to every run's MLflow tags

    def __post_init__(self) -> None:
        _require(bool(self.experiment_name), "tracking.experiment_name", "must not be empty", "")


@dataclass
class RegistryConfig:
    model_name: str = "mnist-cnn"  # the registered model in MLflow's model registry
    # A challenger replaces the champion only when its test accuracy is higher by more
    # than `margin` and at least `floor`.
    margin: float = 0.001
    floor: float = 0.99

    def __post_init__(self) -> None:
        _require(bool(self.model_name), "registry.model_name", "must not be empty", "")
        _require(-1.0 <= self.margin <= 1.0, "registry.margin", "must be in [-1, 1]", self.margin)
        _require(0.0 <= self.floor <= 1.0, "registry.floor", "must be in [0, 1]", self.floor)


@dataclass
class PathsConfig:
    # Relative to the project root, never to the working directory.
    raw_dir: str = "data/raw"
    incoming_dir: str = "data/incoming"  # new labelled digits: <digit>/<image file>
    processed_dir: str = "data/processed"
    models_dir: str = "models"
    reports_dir: str = "reports"

    def __post_init__(self) -> None:
        folders = {key: Path(value) for key, value in vars(self).items()}
        for key, folder in folders.items():
            _require(
                folder.parts and folder.parts != (".",) and ".." not in folder.parts,
                f"paths.{key}",
                "must name a folder below the project (no '.', '..' or empty)",
                str(folder),
            )
        for key, folder in folders.items():
            for other, inner in folders.items():
                _require(
                    key == other or folder not in inner.parents,
                    f"paths.{key}",
                    f"must not contain paths.{other} ({inner})",
                    str(folder),
                )


@dataclass
class PipelineConfig:
    seed: int = 42
    data: DataConfig = field(default_factory=DataConfig)
    download: DownloadConfig = field(default_factory=DownloadConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)

    def __post_init__(self) -> None:
        _require(0 <= self.seed < 2**32, "seed", "must be in [0, 2**32)", self.seed)

    def path(self, relative: str) -> Path:
        """Resolve a configured path against the project root."""
        return PROJECT_ROOT / relative


def register_schema() -> None:
    """Register the schema so that `conf/config.yaml` can list it in its defaults."""
    ConfigStore.instance().store(name="pipeline_schema", node=PipelineConfig)


register_schema()


def validate(cfg: DictConfig | dict) -> PipelineConfig:
    """Check a composed config against the schema and return it as typed objects."""
    try:
        # A plain container first: a composed DictConfig carries flags of its own that
        # would let unknown keys through the merge.
        if isinstance(cfg, DictConfig):
            cfg = OmegaConf.to_container(cfg, resolve=True)
        merged = OmegaConf.merge(OmegaConf.structured(PipelineConfig), cfg)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        key = error.full_key or "(top level)"
        message = str(error.msg).splitlines()[0]
        raise ConfigError(f"{key}: {message}") from None


def load_params(path: Path = PARAMS_FILE) -> PipelineConfig:
    """Read and validate `params.yaml`, the file DVC tracks."""
    if not path.is_file():
        raise ConfigError(f"{path.name}: not found; compose it with `python -m pipeline.params`")
    try:
        raw = OmegaConf.load(path)
    except Exception as error:  # YAML syntax errors come in several types
        raise ConfigError(f"{path.name}: not valid YAML ({error})") from None
    try:
        return validate(raw)
    except ConfigError as error:
        raise ConfigError(f"{path.name}: {error}") from None


def compose(overrides: list[str] | None = None) -> DictConfig:
    """Compose `conf/` with Hydra overrides, as DVC does for `params.yaml`."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    try:
        with initialize_config_dir(str(CONF_DIR), version_base=None):
            cfg = hydra_compose(config_name="config", overrides=overrides or [])
    except (HydraException, OmegaConfBaseException) as error:
        # Hydra's message says which override failed, its cause says why.
        reasons = [str(error).splitlines()[0]]
        if error.__cause__ is not None:
            reasons.append(str(error.__cause__).splitlines()[0])
        raise ConfigError(": ".join(reasons)) from None
    OmegaConf.resolve(cfg)
    return cfg


def to_yaml(cfg: DictConfig | PipelineConfig) -> str:
    """Serialise a config the way DVC's Hydra integration writes `params.yaml`."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg) if not isinstance(cfg, DictConfig) else cfg)


def flatten(cfg: PipelineConfig) -> dict[str, str]:
    """Flatten a config to dotted keys (`model.conv_filters.0`) for MLflow params."""
    flat: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        elif isinstance(node, list):
            for index, value in enumerate(node):
                walk(value, f"{prefix}{index}.")
        else:
            flat[prefix[:-1]] = str(node)

    walk(OmegaConf.to_container(OmegaConf.structured(cfg)), "")
    return flat
