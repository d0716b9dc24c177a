"""Incoming digits, the promotion rule, retraining, serving and prediction.

The unit tests are fast. The retraining story runs the real `python -m pipeline.retrain`
in a copy of the project on the MNIST slice, step after step (its tests depend on
their order), and serves the champion with `mlflow models serve` on 127.0.0.1: those
are marked slow (`pytest -m slow`).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
from conftest import SLICE_DIR, copy_project, make_config, run_in
from PIL import Image

from pipeline import idx, incoming, registry, retrain

SLICE_PARAMS = [
    "data=mnist_slice",
    "preprocess.val_size=300",
    "train.epochs=1",
    "registry.floor=0.5",
]


def slice_digits(kind: str, count: int, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Real MNIST digits and labels from the slice in tests/data."""
    images = idx.read(SLICE_DIR / f"{kind}-images-idx3-ubyte.gz", idx.IMAGES_MAGIC)
    labels = idx.read(SLICE_DIR / f"{kind}-labels-idx1-ubyte.gz", idx.LABELS_MAGIC)
    return images[start : start + count], labels[start : start + count]


def as_photo(image: np.ndarray, path: Path) -> None:
    """Save a digit as people photograph it: dark ink on white, RGB, larger than 28x28."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(255 - image).convert("RGB").resize((84, 84), Image.BILINEAR).save(path)


# Fast: the conversion, the folder reader, the rule, the lock.


def test_a_photographed_digit_converts_back_to_its_mnist_image(tmp_path):
    images, _ = slice_digits("t10k", 20)
    for number, image in enumerate(images):
        as_photo(image, tmp_path / f"{number}.png")
        converted = incoming.read_image(tmp_path / f"{number}.png")
        assert converted.shape == (28, 28) and converted.dtype == np.uint8
        assert converted[0].max() == 0  # black background, as MNIST
        # Rescaling and recentring blur a little; a wrong inversion would differ by ~100.
        assert np.abs(converted.astype(int) - image.astype(int)).mean() < 20, number


def test_incoming_folder_keeps_digits_and_names_every_rejected_file(tmp_path):
    images, labels = slice_digits("train", 3)
    for number, (image, label) in enumerate(zip(images, labels, strict=True)):
        as_photo(image, tmp_path / str(label) / f"{number}.png")
    (tmp_path / "3").mkdir(exist_ok=True)
    (tmp_path / "3" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (tmp_path / "x").mkdir()
    as_photo(images[0], tmp_path / "x" / "unlabelled.png")
    (tmp_path / "notes.txt").write_text("not a digit")
    (tmp_path / ".gitkeep").write_text("")

    new = incoming.read_folder(tmp_path)

    assert new.images.shape == (3, 28, 28)
    assert sorted(new.labels.tolist()) == sorted(labels.tolist())
    assert set(new.rejected) == {"3/broken.png", "x/unlabelled.png", "notes.txt"}
    assert new.rejected["x/unlabelled.png"] == "not in a digit folder 0-9"
    assert new.rejected["3/broken.png"].startswith("not a readable image")


def test_blank_and_oversized_images_are_rejected_by_name(tmp_path):
    Image.new("L", (60, 60), color=255).save(tmp_path / "blank.png")
    Image.new("L", (8000, 8000)).save(tmp_path / "huge.png")  # 64 million pixels

    with pytest.raises(ValueError, match="blank: no digit found"):
        incoming.read_image(tmp_path / "blank.png")
    with pytest.raises(ValueError, match=r"too large \(8000x8000\)"):
        incoming.read_image(tmp_path / "huge.png")


def test_a_16_bit_scan_is_scaled_not_clipped(tmp_path):
    images, _ = slice_digits("t10k", 1)
    Image.fromarray(images[0].astype(np.uint16) * 257).save(tmp_path / "deep.png")

    converted = incoming.read_image(tmp_path / "deep.png")

    assert np.abs(converted.astype(int) - images[0].astype(int)).mean() < 20


def _decision(
    accuracy: float, champion: float | None, margin: float = 0.001, status: str = "FINISHED"
) -> str:
    cfg = make_config(Path("/nonexistent"), f"registry.margin={margin}", "registry.floor=0.99")
    challenger = {"test_accuracy": accuracy, "test_loss": 0.1, "run_status": status}
    holder = None if champion is None else {"test_accuracy": champion}
    return retrain.decide(cfg, challenger, holder)[0]


def test_promotion_rule_needs_the_floor_and_more_than_the_margin():
    assert _decision(0.995, None) == "promoted"
    assert _decision(0.985, None) == "rejected"  # below the floor
    assert _decision(0.9935, 0.9920) == "promoted"  # +0.0015 > 0.001
    assert _decision(0.9925, 0.9920) == "rejected"  # +0.0005 is not enough
    assert _decision(0.9920, 0.9920, margin=0.0) == "rejected"  # equal is not better
    assert _decision(0.9990, 0.9920, status="FAILED") == "rejected"


class _Echo(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input: list[float]) -> list[float]:
        return model_input


def test_evaluating_a_run_again_reuses_its_model_version(tmp_path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    location = (tmp_path / "mlartifacts").as_uri()
    experiment_id = mlflow.create_experiment("registry", artifact_location=location)
    with mlflow.start_run(experiment_id=experiment_id) as run:
        mlflow.pyfunc.log_model(name="model", python_model=_Echo())
    cfg = make_config(tmp_path)
    client = mlflow.MlflowClient()

    first = registry.register(cfg, run.info.run_id, {"test_accuracy": "0.9901"})
    registry.promote(cfg, first.version)
    again = registry.register(cfg, run.info.run_id, {"test_accuracy": "0.9902"})

    versions = client.search_model_versions(f"name = '{cfg.registry.model_name}'")
    assert [version.version for version in versions] == [first.version] == [again.version]
    assert versions[0].tags["test_accuracy"] == "0.9902"
    # Challenger and champion are then the same version: a retrain skips it.
    for alias in (registry.CHALLENGER, registry.CHAMPION):
        assert registry.version_with_alias(cfg, alias).version == first.version


def test_a_held_lock_refuses_a_second_retrain(tmp_path):
    lock = tmp_path / "retrain.lock"
    with (
        retrain.exclusive_lock(lock),
        pytest.raises(retrain.RetrainLocked, match="another retrain is running \\(pid"),
        retrain.exclusive_lock(lock),
    ):
        pass
    with retrain.exclusive_lock(lock):  # released: the next one may run
        pass


# Slow: the real retraining, in a copy of the project.


def _retrain(project: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "MNIST_", "DVC_"))}
    return subprocess.run(
        [sys.executable, "-m", "pipeline.retrain"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def _set_params(project: Path, *extra: str) -> None:
    run_in([sys.executable, "-m", "pipeline.params", *SLICE_PARAMS, *extra], project)


def _aliases(project: Path) -> dict[str, str]:
    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    return {
        alias: str(version)
        for alias, version in client.get_registered_model("mnist-cnn").aliases.items()
    }


def _last_report(project: Path) -> dict:
    path = sorted((project / "reports" / "retrain").glob("*.json"))[-1]
    return json.loads(path.read_text())


def _add_incoming(project: Path, start: int, count: int) -> None:
    images, labels = slice_digits("train", count, start=start)
    for number, (image, label) in enumerate(zip(images, labels, strict=True)):
        as_photo(image, project / "data" / "incoming" / str(label) / f"{start + number}.png")


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    project = copy_project(tmp_path_factory.mktemp("retrain"))
    _set_params(project)
    return project


@pytest.mark.slow
def test_first_retrain_makes_a_champion(project):
    result = _retrain(project)

    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert _aliases(project) == {"challenger": "1", "champion": "1"}
    report = _last_report(project)
    assert report["decision"] == "promoted"
    assert report["stages_run"] == ["download", "preprocess", "train", "evaluate"]
    assert report["champion"] is None and report["challenger"]["version"] == "1"


@pytest.mark.slow
def test_retrain_with_nothing_changed_is_skipped(project):
    result = _retrain(project)

    assert result.returncode == 3, result.stderr[-3000:]
    assert "Running stage" not in result.stdout
    assert _aliases(project) == {"challenger": "1", "champion": "1"}
    assert _last_report(project)["decision"] == "skipped"


@pytest.mark.slow
def test_new_data_retrains_and_a_high_margin_rejects(project):
    _add_incoming(project, start=0, count=30)
    (project / "data" / "incoming" / "7" / "corrupt.png").write_bytes(b"not an image")
    (project / "data" / "incoming" / "readme.txt").write_text("digits go in folders")
    _set_params(project, "registry.margin=1.0")

    result = _retrain(project)

    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    report = _last_report(project)
    assert report["decision"] == "rejected"
    assert report["stages_run"] == ["preprocess", "train", "evaluate"]
    assert set(report["incoming_rejected"]) == {"7/corrupt.png", "readme.txt"}
    assert report["champion"]["version"] == "1" and report["challenger"]["version"] == "2"
    assert _aliases(project) == {"challenger": "2", "champion": "1"}
    stats = json.loads((project / "reports" / "data" / "stats.json").read_text())
    assert stats["incoming"] == {"accepted": 30, "rejected": 2}
    assert stats["train"]["count"] == 1200 + 30 and stats["test"]["count"] == 500


@pytest.mark.slow
def test_new_data_with_a_negative_margin_promotes(project):
    _add_incoming(project, start=30, count=10)
    _set_params(project, "registry.margin=-1.0")

    result = _retrain(project)

    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert _aliases(project) == {"challenger": "3", "champion": "3"}
    report = _last_report(project)
    assert report["decision"] == "promoted"
    assert report["champion"]["version"] == "1"  # the champion it replaced


@pytest.mark.slow
def test_a_nan_run_is_never_promoted(project):
    _set_params(project, "optimizer.lr=1e12", "optimizer.schedule=constant")

    result = _retrain(project)

    assert result.returncode == 1
    report = _last_report(project)
    assert report["decision"] == "failed"
    assert "NaN or infinite" in report["reason"]
    assert _aliases(project) == {"challenger": "3", "champion": "3"}
    _set_params(project)  # back to a healthy configuration for the next tests


@pytest.mark.slow
def test_a_second_concurrent_retrain_is_refused(project):
    with retrain.exclusive_lock(project / ".retrain.lock"):
        result = _retrain(project)

    assert result.returncode == 4
    assert "another retrain is running" in result.stderr
    assert _aliases(project) == {"challenger": "3", "champion": "3"}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_served_champion_answers_like_the_model_in_process(project):
    uri = f"sqlite:///{project / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    model = mlflow.keras.load_model("models:/mnist-cnn@champion")
    images, _ = slice_digits("t10k", 10)
    expected = model.predict(images.astype(np.float32), verbose=0).argmax(axis=1)

    port = _free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "models",
            "serve",
            "-m",
            "models:/mnist-cnn@champion",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--env-manager",
            "local",
        ],
        cwd=project,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                    break
            except OSError:
                assert server.poll() is None, "mlflow models serve exited"
                assert time.monotonic() < deadline, "the server did not answer /ping"
                time.sleep(1)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps({"inputs": images.astype(float).tolist()}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            predictions = np.array(json.loads(response.read())["predictions"])
    finally:
        server.terminate()
        server.wait(timeout=30)

    assert predictions.shape == (10, 10)
    assert predictions.argmax(axis=1).tolist() == expected.tolist()


@pytest.mark.slow
def test_predict_classifies_png_files_of_test_digits(project, tmp_path):
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    model = mlflow.keras.load_model("models:/mnist-cnn@champion")
    images, labels = slice_digits("t10k", 40)
    right = model.predict(images.astype(np.float32), verbose=0).argmax(axis=1) == labels
    chosen = np.flatnonzero(right)[:10]  # digits the champion knows from the raw arrays
    paths = []
    for number in chosen:
        paths.append(tmp_path / f"digit-{number}.png")
        as_photo(images[number], paths[-1])

    result = run_in([sys.executable, "-m", "pipeline.predict", *map(str, paths)], project)

    lines = result.stdout.strip().splitlines()
    assert len(lines) == 10
    predicted = [int(line.split(": ")[1].split(" ")[0]) for line in lines]
    assert predicted == labels[chosen].tolist()
