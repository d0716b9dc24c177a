"""The config schema: what it rejects, how the user hears of it, and params.yaml drift."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SLICE_OVERRIDES, tmp_overrides

from pipeline import config, params
from pipeline.config import PROJECT_ROOT

COMMITTED = config.PARAMS_FILE.read_text(encoding="utf-8")
UNKNOWN_KEY = "  dropout: 0.5\n  dropoutt: 0.1\n"  # a typo of model.dropout, added beside it

# DVC composes params.yaml in its own process; this is that call, with the project's
# plugins folder so that `pipeline_schema` resolves there too.
DVC_COMPOSE = """
import sys
from dvc.utils.hydra import compose_and_dump

out, root, *overrides = sys.argv[1:]
compose_and_dump(
    out,
    config_dir=f"{root}/conf",
    config_module=None,
    config_name="config",
    plugins_path=root,
    overrides=overrides,
)
"""


def edited(text: str, old: str, new: str) -> str:
    """`text` with `old` replaced once, failing loudly if `old` is not there."""
    assert text.count(old) == 1, f"{old!r} should occur once"
    return text.replace(old, new)


def write_params(folder: Path, text: str) -> Path:
    path = folder / "params.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def compose_and_validate(*overrides: str) -> config.PipelineConfig:
    return config.validate(config.compose(list(overrides)))


# --- what the schema rejects -----------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("+model.dropoutt=0.1", "model.dropoutt: Key 'dropoutt' not in 'ModelConfig'"),
        ("+seedd=1", "seedd: Key 'seedd' not in 'PipelineConfig'"),
    ],
    ids=["nested", "top-level"],
)
def test_an_unknown_override_key_is_named(override: str, message: str) -> None:
    with pytest.raises(config.ConfigError) as caught:
        compose_and_validate(override)

    assert str(caught.value) == message


def test_an_unknown_key_in_a_params_file_is_named(tmp_path: Path) -> None:
    text = edited(COMMITTED, "  dropout: 0.5\n", UNKNOWN_KEY)

    with pytest.raises(config.ConfigError) as caught:
        config.load_params(write_params(tmp_path, text))

    assert str(caught.value) == "params.yaml: model.dropoutt: Key 'dropoutt' not in 'ModelConfig'"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optimizer.lr=-0.001", "optimizer.lr: must be a positive learning rate, got -0.001"),
        ("model.dropout=1.5", "model.dropout: must be in [0, 1), got 1.5"),
        (
            "data.train_images.sha256=ba891046",
            "data.train_images.sha256: must be 64 lowercase hex digits, got 'ba891046'",
        ),
        (
            f"data.test_labels.sha256={'F' * 64}",
            f"data.test_labels.sha256: must be 64 lowercase hex digits, got '{'F' * 64}'",
        ),
        ("download.retries=0", "download.retries: must be at least 1, got 0"),
        (
            "model.kernel_initializer=zeros",
            "model.kernel_initializer: must be one of glorot_uniform, he_normal, "
            "truncated_normal, got 'zeros'",
        ),
        # A folder that a stage would replace must not be the project or hold others.
        (
            "paths.processed_dir=.",
            "paths.processed_dir: must name a folder below the project "
            "(no '.', '..' or empty), got '.'",
        ),
        (
            "paths.processed_dir=data",
            "paths.processed_dir: must not contain paths.raw_dir (data/raw), got 'data'",
        ),
        ("seed=-1", "seed: must be in [0, 2**32), got -1"),
        (
            "optimizer.restart_epochs=-1",
            "optimizer.restart_epochs: must be >= 0 (0: no restart), got -1.0",
        ),
        (
            "optimizer.restart_lr_fraction=0",
            "optimizer.restart_lr_fraction: must be in (0, 1], got 0.0",
        ),
    ],
    ids=[
        "negative-lr",
        "dropout-above-1",
        "short-sha256",
        "upper-case-sha256",
        "no-retries",
        "initializer",
        "project-as-output",
        "parent-as-output",
        "negative-seed",
        "negative-restart",
        "restart-at-zero",
    ],
)
def test_an_impossible_value_is_named(override: str, message: str) -> None:
    with pytest.raises(config.ConfigError) as caught:
        compose_and_validate(override)

    assert str(caught.value) == message


def test_a_wrong_type_in_an_override_names_the_key() -> None:
    with pytest.raises(config.ConfigError, match=r"\bmodel\.dense_units\b"):
        compose_and_validate("model.dense_units=abc")


def test_a_wrong_type_in_an_override_says_what_is_wrong() -> None:
    with pytest.raises(config.ConfigError, match="could not be converted to Integer"):
        compose_and_validate("model.dense_units=abc")


def test_a_wrong_type_in_a_params_file_is_named(tmp_path: Path) -> None:
    text = edited(COMMITTED, "dense_units: 1024", "dense_units: abc")

    with pytest.raises(config.ConfigError) as caught:
        config.load_params(write_params(tmp_path, text))

    assert str(caught.value) == (
        "params.yaml: model.dense_units: Value 'abc' of type 'str' could not be converted "
        "to Integer"
    )


def test_a_missing_params_file_says_how_to_make_it(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError) as caught:
        config.load_params(tmp_path / "params.yaml")

    assert str(caught.value) == (
        "params.yaml: not found; compose it with `python -m pipeline.params`"
    )


def test_the_committed_params_file_loads() -> None:
    cfg = config.load_params()

    assert cfg.optimizer.lr == 0.003
    assert cfg.model.conv_filters == [32, 64]
    assert cfg.data.mirrors[0] == "https://storage.googleapis.com/cvdf-datasets/mnist/"


def test_a_stage_reports_a_bad_params_file_in_one_line(tmp_path: Path) -> None:
    # Every path points into tmp_path, so a stage that wrongly ran would not touch the
    # project; it would also find no processed data there.
    composed = config.compose([*SLICE_OVERRIDES, *tmp_overrides(tmp_path)])
    text = edited(config.to_yaml(composed), "  dropout: 0.5\n", UNKNOWN_KEY)
    bad = write_params(tmp_path, text)

    result = subprocess.run(
        [sys.executable, "-m", "pipeline.train", "--params", str(bad)],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    mentions = [line for line in result.stderr.splitlines() if "dropoutt" in line]
    assert len(mentions) == 1
    assert "[ERROR]" in mentions[0]
    assert mentions[0].endswith("params.yaml: model.dropoutt: Key 'dropoutt' not in 'ModelConfig'")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["params.yaml"]


# --- params.yaml and conf/ -------------------------------------------------------------


def test_params_yaml_is_conf_composed() -> None:
    assert params.render() == COMMITTED


@pytest.fixture
def params_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of params.yaml that pipeline.params reads and writes instead of the real one."""
    copy = write_params(tmp_path, COMMITTED)
    monkeypatch.setattr(config, "PARAMS_FILE", copy)
    return copy


def test_check_accepts_an_up_to_date_params_file(
    params_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert params.main(["--check"]) == 0
    assert capsys.readouterr().out == "params.yaml matches conf/\n"


def test_check_detects_a_drifted_params_file(
    params_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    params_copy.write_text(edited(COMMITTED, "lr: 0.003", "lr: 0.002"), encoding="utf-8")

    assert params.main(["--check"]) == 1
    assert capsys.readouterr().err == (
        "params.yaml differs from conf/; run `python -m pipeline.params`\n"
    )


def test_rewriting_params_applies_overrides(params_copy: Path) -> None:
    assert params.main(["optimizer.lr=0.001"]) == 0

    assert params_copy.read_text(encoding="utf-8") == edited(COMMITTED, "lr: 0.003", "lr: 0.001")


def test_rewriting_params_refuses_a_bad_override(
    params_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert params.main(["optimizer.lr=-1"]) == 1

    assert capsys.readouterr().err == (
        "error: optimizer.lr: must be a positive learning rate, got -1.0\n"
    )
    assert params_copy.read_text(encoding="utf-8") == COMMITTED


@pytest.fixture(scope="module")
def dvc_composed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """params.yaml as DVC composes it, without and with an override, in a fresh process."""
    folder = tmp_path_factory.mktemp("dvc")
    texts = {}
    # A fresh interpreter per composition: Hydra keeps global state between calls.
    for label, overrides in (("plain", []), ("lr", ["optimizer.lr=0.001"])):
        out = folder / f"{label}.yaml"
        subprocess.run(
            [sys.executable, "-c", DVC_COMPOSE, str(out), str(PROJECT_ROOT), *overrides],
            cwd=PROJECT_ROOT,
            check=True,
            timeout=120,
        )
        texts[label] = out.read_text(encoding="utf-8")
    return texts


def test_dvc_composes_the_committed_params_yaml(dvc_composed: dict[str, str]) -> None:
    assert dvc_composed["plain"] == COMMITTED


def test_dvc_applies_an_override_and_nothing_else(dvc_composed: dict[str, str]) -> None:
    assert dvc_composed["lr"] == edited(COMMITTED, "lr: 0.003", "lr: 0.001")


# --- flattening for MLflow -------------------------------------------------------------


def test_flatten_gives_one_dotted_key_per_leaf() -> None:
    flat = config.flatten(config.load_params())

    assert flat["model.conv_filters.0"] == "32"
    assert flat["model.conv_filters.1"] == "64"
    assert flat["optimizer.lr"] == "0.003"
    assert flat["data.train_labels.sha256"] == (
        "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"
    )
    # One per leaf of params.yaml: 3 mirrors, 2 filter counts, 4 x 2 file fields, ...
    assert len(flat) == 59


def test_an_output_folder_holding_folders_is_never_replaced(tmp_path: Path) -> None:
    from pipeline import files
    from pipeline.errors import PipelineError

    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "keep.gz").write_bytes(b"earlier")

    with (
        pytest.raises(PipelineError, match="holds folders, so it is not an output folder"),
        files.staged_dir(tmp_path) as staging,
    ):
        (staging / "new.npz").write_bytes(b"new")

    assert (tmp_path / "raw" / "keep.gz").read_bytes() == b"earlier"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]
