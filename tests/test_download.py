"""The download stage against local folders and HTTP servers on 127.0.0.1, never the internet."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import SLICE_DIR, make_config

from pipeline import download
from pipeline.config import DownloadConfig, PipelineConfig

# In the order the stage fetches them; each file goes through the sources on its own.
FILE_NAMES = [
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
]
FAST = ["download.retries=2", "download.backoff_s=0.01", "download.timeout_s=2"]


class RecordingServer(http.server.ThreadingHTTPServer):
    """A server on a free port of 127.0.0.1 that remembers the path of every request."""

    def __init__(self, handler: type[http.server.BaseHTTPRequestHandler]) -> None:
        super().__init__(("127.0.0.1", 0), handler)
        self.paths: list[str] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/"


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the slice folder and records each request before answering it."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, directory=str(SLICE_DIR), **kwargs)

    def do_GET(self) -> None:
        self.server.paths.append(self.path.lstrip("/"))
        self.respond()

    def respond(self) -> None:
        super().do_GET()

    def log_message(self, format: str, *args) -> None:
        pass  # keep the test output to pytest's own report


def failing(status: int) -> type[QuietHandler]:
    """A handler that answers every request with an HTTP error status."""

    class Failing(QuietHandler):
        def respond(self) -> None:
            self.send_error(status)

    return Failing


class CutShort(QuietHandler):
    """Promises the whole file, sends its first 100 bytes, then closes the connection."""

    def respond(self) -> None:
        body = (SLICE_DIR / self.path.lstrip("/")).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[:100])


@pytest.fixture
def serve(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., RecordingServer]]:
    """Start local HTTP servers on demand; all are shut down when the test ends."""
    # A developer's proxy would otherwise receive the requests meant for 127.0.0.1.
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    servers: list[tuple[RecordingServer, threading.Thread]] = []

    def start(handler: type[QuietHandler]) -> RecordingServer:
        server = RecordingServer(handler)
        # A short poll interval: shutdown() waits for the next poll, 0.5 s by default.
        thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
        thread.start()
        servers.append((server, thread))
        return server

    yield start
    for server, thread in servers:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def mirrors(*locations: str) -> str:
    return f"data.mirrors=[{','.join(locations)}]"


def raw_dir(cfg: PipelineConfig) -> Path:
    return cfg.path(cfg.paths.raw_dir)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def assert_verified_slice(cfg: PipelineConfig) -> None:
    """raw_dir holds exactly the four files, each with the configured content checksum."""
    stored = raw_dir(cfg)
    assert sorted(path.name for path in stored.iterdir()) == sorted(FILE_NAMES)
    for key in download.FILE_KEYS:
        spec = getattr(cfg.data, key)
        content = gzip.decompress((stored / spec.name).read_bytes())
        assert hashlib.sha256(content).hexdigest() == spec.sha256, spec.name
    # Nothing of the staging survives beside the output.
    assert sorted(path.name for path in stored.parent.iterdir()) == [stored.name]


def assert_nothing_written(cfg: PipelineConfig) -> None:
    """No raw_dir, and beside it no staging folder (`.raw.partial-*`) nor anything else."""
    stored = raw_dir(cfg)
    assert not stored.exists()
    assert list(stored.parent.glob(f".{stored.name}.partial-*")) == []
    assert list(stored.parent.iterdir()) == []


# --- sources ---------------------------------------------------------------------------


def test_configured_folders_resolve_against_the_project_root(slice_cfg: PipelineConfig) -> None:
    assert download.sources(slice_cfg) == [
        download.Source(str(SLICE_DIR), "tests/data/mnist-slice")
    ]


def test_mnist_mirror_comes_first(
    slice_cfg: PipelineConfig, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("MNIST_MIRROR", f" {tmp_path} ")

    assert download.sources(slice_cfg) == [
        download.Source(str(tmp_path), f"{tmp_path} (MNIST_MIRROR)"),
        download.Source(str(SLICE_DIR), "tests/data/mnist-slice"),
    ]


def test_a_blank_mnist_mirror_is_ignored(
    slice_cfg: PipelineConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MNIST_MIRROR", "  ")

    assert [source.location for source in download.sources(slice_cfg)] == [str(SLICE_DIR)]


# --- success ---------------------------------------------------------------------------


def test_downloads_the_slice_from_a_folder_mirror(slice_cfg: PipelineConfig) -> None:
    download.run(slice_cfg)

    assert_verified_slice(slice_cfg)
    # A gzip mirror's files are stored as served, so DVC hashes the original archives.
    stored = snapshot(raw_dir(slice_cfg))
    assert stored == {name: (SLICE_DIR / name).read_bytes() for name in FILE_NAMES}


def test_a_new_download_replaces_the_earlier_files(slice_cfg: PipelineConfig) -> None:
    earlier = raw_dir(slice_cfg)
    earlier.mkdir(parents=True)
    (earlier / FILE_NAMES[0]).write_bytes(b"from an earlier run")
    (earlier / "stale.txt").write_bytes(b"not part of MNIST")

    download.run(slice_cfg)

    # Replaced as a whole: no stale file, and no retired copy (`.raw.old-*`) left.
    assert_verified_slice(slice_cfg)


def test_mnist_mirror_is_used_before_the_configured_mirrors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, serve: Callable[..., RecordingServer]
) -> None:
    broken = serve(failing(500))
    monkeypatch.setenv("MNIST_MIRROR", str(SLICE_DIR))
    cfg = make_config(tmp_path, mirrors(broken.url), *FAST)

    download.run(cfg)

    assert_verified_slice(cfg)
    assert broken.paths == []


def test_an_uncompressed_mirror_is_stored_reproducibly(tmp_path: Path) -> None:
    mirror = tmp_path / "plain"
    mirror.mkdir()
    for name in FILE_NAMES:
        (mirror / name).write_bytes(gzip.decompress((SLICE_DIR / name).read_bytes()))
    cfg = make_config(tmp_path, mirrors(str(mirror)))

    download.run(cfg)

    assert_verified_slice(cfg)
    # Compressed without a timestamp: the same bytes, and DVC hash, on every run.
    for name in FILE_NAMES:
        stored = (raw_dir(cfg) / name).read_bytes()
        assert stored == gzip.compress((mirror / name).read_bytes(), compresslevel=6, mtime=0)


def test_a_file_url_mirror_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MNIST_MIRROR", SLICE_DIR.as_uri())
    cfg = make_config(tmp_path, mirrors(str(tmp_path / "no-mirror")))

    download.run(cfg)

    assert_verified_slice(cfg)


# --- fallback between mirrors ----------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "attempts"),
    [(500, 2), (404, 1)],
    ids=["server-error-is-retried", "not-found-is-not"],
)
def test_falls_back_from_a_failing_http_mirror(
    tmp_path: Path, serve: Callable[..., RecordingServer], status: int, attempts: int
) -> None:
    broken, working = serve(failing(status)), serve(QuietHandler)
    cfg = make_config(tmp_path, mirrors(broken.url, working.url), *FAST)

    download.run(cfg)

    assert_verified_slice(cfg)
    assert broken.paths == [name for name in FILE_NAMES for _ in range(attempts)]
    assert working.paths == FILE_NAMES


def test_a_transfer_cut_short_is_retried_then_falls_back(
    tmp_path: Path, serve: Callable[..., RecordingServer]
) -> None:
    cut, working = serve(CutShort), serve(QuietHandler)
    cfg = make_config(tmp_path, mirrors(cut.url, working.url), *FAST)

    download.run(cfg)

    assert_verified_slice(cfg)
    assert cut.paths == [name for name in FILE_NAMES for _ in range(2)]
    assert working.paths == FILE_NAMES


def test_a_transfer_cut_short_is_reported_with_its_sizes(
    slice_cfg: PipelineConfig, serve: Callable[..., RecordingServer]
) -> None:
    cut = serve(CutShort)
    spec = slice_cfg.data.train_labels
    size = (SLICE_DIR / spec.name).stat().st_size
    settings = DownloadConfig(timeout_s=2, retries=3, backoff_s=0.01)

    with pytest.raises(download.DownloadError) as caught:
        download.fetch(spec, [download.Source(cut.url, "cut")], settings)

    failure = f"  - cut: transfer cut short at 100 of {size} bytes (3 attempts)"
    assert str(caught.value).splitlines()[1] == failure
    assert cut.paths == [spec.name] * 3


# --- failures --------------------------------------------------------------------------


def test_a_checksum_mismatch_names_the_file(tmp_path: Path) -> None:
    mirror = tmp_path / "tampered"
    shutil.copytree(SLICE_DIR, mirror)
    labels = bytearray(gzip.decompress((mirror / "train-labels-idx1-ubyte.gz").read_bytes()))
    labels[8] = (labels[8] + 1) % 10  # relabel the first digit; still a valid IDX file
    (mirror / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes(labels)))
    cfg = make_config(tmp_path, mirrors(str(mirror)))

    with pytest.raises(download.DownloadError) as caught:
        download.run(cfg)

    lines = str(caught.value).splitlines()
    digest = hashlib.sha256(labels).hexdigest()
    assert lines[0] == "could not download train-labels-idx1-ubyte.gz from any source:"
    assert lines[1] == (
        f"  - {mirror}: checksum mismatch: sha256 {digest}, "
        f"expected {cfg.data.train_labels.sha256}"
    )
    assert_nothing_written(cfg)


def test_all_sources_failing_names_each_and_the_way_out(
    tmp_path: Path, serve: Callable[..., RecordingServer]
) -> None:
    broken, missing = serve(failing(500)), tmp_path / "no-mirror"
    cfg = make_config(tmp_path, mirrors(broken.url, str(missing)), *FAST)

    with pytest.raises(download.DownloadError) as caught:
        download.run(cfg)

    name = cfg.data.train_images.name
    lines = str(caught.value).splitlines()
    assert lines[:3] == [
        f"could not download {name} from any source:",
        f"  - {broken.url}: HTTP 500 Internal Server Error (2 attempts)",
        f"  - {missing}: {missing / name} not found",
    ]
    assert "MNIST_MIRROR" in lines[3]
    assert len(lines) == 4
    # The run stops at the first file that no source serves.
    assert broken.paths == [name, name]
    assert_nothing_written(cfg)


def test_a_failed_download_keeps_the_earlier_files(tmp_path: Path) -> None:
    # The mirror serves the first file only, so the failure comes after a file is staged.
    mirror = tmp_path / "incomplete"
    mirror.mkdir()
    shutil.copy(SLICE_DIR / FILE_NAMES[0], mirror)
    cfg = make_config(tmp_path, mirrors(str(mirror)))
    earlier = raw_dir(cfg)
    earlier.mkdir(parents=True)
    (earlier / FILE_NAMES[0]).write_bytes(b"from an earlier run")
    (earlier / FILE_NAMES[1]).write_bytes(b"also from an earlier run")
    before = snapshot(earlier)

    with pytest.raises(download.DownloadError, match=f"could not download {FILE_NAMES[1]} "):
        download.run(cfg)

    assert snapshot(earlier) == before
    assert sorted(path.name for path in earlier.parent.iterdir()) == [earlier.name]


def test_no_sources_at_all(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, "data.mirrors=[]")

    with pytest.raises(download.DownloadError) as caught:
        download.run(cfg)

    assert str(caught.value) == "no sources: set MNIST_MIRROR or list data.mirrors"


def test_a_mistyped_url_scheme_is_not_retried(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, mirrors("htps://127.0.0.1/mnist/"), "download.backoff_s=60")

    # With a 60 s backoff a retry would hang the test; a typo is not worth retrying.
    with pytest.raises(download.DownloadError, match=r"htps://127\.0\.0\.1/mnist/: unknown url"):
        download.run(cfg)
