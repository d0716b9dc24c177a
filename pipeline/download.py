"""download stage: fetch the four MNIST files from the first mirror that serves them intact.

Sources are tried in order: the MNIST_MIRROR environment variable (a URL or a local
folder, not a tracked parameter, so offline machines and CI can point at a copy), then
`data.mirrors`. A file is accepted when the SHA-256 of its decompressed bytes matches
the config. The files land in a temporary folder that replaces `paths.raw_dir` only
when all four are verified, so a failure leaves nothing half-written.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import logging
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from pipeline import cli, files, idx
from pipeline.config import DownloadConfig, MnistFile, PipelineConfig
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

MIRROR_ENV = "MNIST_MIRROR"
FILE_KEYS = ("train_images", "train_labels", "test_images", "test_labels")
_CHUNK = 1 << 16


class DownloadError(PipelineError):
    """No source served a file with the expected content."""


class _Transient(Exception):
    """A failure worth retrying on the same source (timeout, reset, server error)."""


class _Permanent(Exception):
    """A failure that retrying the same source will not fix (not found, bad content)."""


@dataclass(frozen=True)
class Source:
    location: str  # a URL or a local folder
    label: str  # how error messages name it

    @property
    def is_url(self) -> bool:
        return "://" in self.location


def sources(cfg: PipelineConfig) -> list[Source]:
    """The sources to try, in order: MNIST_MIRROR first when it is set."""
    found = []
    override = os.environ.get(MIRROR_ENV, "").strip()
    if override:
        found.append(Source(override, f"{override} ({MIRROR_ENV})"))
    for mirror in cfg.data.mirrors:
        # A configured folder is relative to the project root, like every other path.
        location = mirror if "://" in mirror else str(cfg.path(mirror))
        found.append(Source(location, mirror))
    return found


def _read_url(url: str, timeout_s: float, name: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            # file:// responses have no length; HTTP ones have it unless chunked.
            expected = getattr(response, "length", None)
            chunks = []
            with tqdm(
                total=expected, desc=name, unit="B", unit_scale=True, leave=False, disable=None
            ) as bar:
                while chunk := response.read(_CHUNK):
                    chunks.append(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as error:
        failure = f"HTTP {error.code} {error.reason}"
        if error.code >= 500 or error.code in (408, 429):
            raise _Transient(failure) from None
        raise _Permanent(failure) from None
    except urllib.error.URLError as error:
        if isinstance(error.reason, FileNotFoundError):
            raise _Permanent("file not found") from None
        if str(error.reason).startswith("unknown url type"):  # a typo such as htps://
            raise _Permanent(str(error.reason)) from None
        raise _Transient(str(error.reason)) from None
    except (TimeoutError, ConnectionError, http.client.HTTPException) as error:
        raise _Transient(f"{type(error).__name__}: {error}") from None
    payload = b"".join(chunks)
    if expected is not None and len(payload) != expected:
        raise _Transient(f"transfer cut short at {len(payload)} of {expected} bytes")
    return payload


def _read_folder(folder: str, name: str) -> bytes:
    path = Path(folder).expanduser() / name
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise _Permanent(f"{path} not found") from None
    except OSError as error:
        raise _Permanent(f"cannot read {path} ({error.strerror})") from None


def _fetch_once(source: Source, spec: MnistFile, timeout_s: float) -> bytes:
    """Fetch a file from a source and return it as served, once its content is verified."""
    if source.is_url:
        payload = _read_url(source.location.rstrip("/") + "/" + spec.name, timeout_s, spec.name)
    else:
        payload = _read_folder(source.location, spec.name)
    try:
        content = idx.decompress(payload, spec.name)
    except idx.IdxFormatError as error:
        raise _Permanent(str(error)) from None
    digest = hashlib.sha256(content).hexdigest()
    if digest != spec.sha256:
        raise _Permanent(f"checksum mismatch: sha256 {digest}, expected {spec.sha256}")
    return payload


def fetch(spec: MnistFile, candidates: list[Source], settings: DownloadConfig) -> bytes:
    """Return one file, as served by the first source whose copy verifies."""
    failures = []
    for source in candidates:
        delay = settings.backoff_s
        for attempt in range(1, settings.retries + 1):
            try:
                return _fetch_once(source, spec, settings.timeout_s)
            except _Permanent as error:
                failures.append(f"{source.label}: {error}")
                break
            except _Transient as error:
                if attempt == settings.retries:
                    failures.append(f"{source.label}: {error} ({attempt} attempts)")
                    break
                log.warning(
                    "%s from %s: %s; retrying in %.1f s", spec.name, source.label, error, delay
                )
                time.sleep(delay)
                delay *= 2
    raise DownloadError(
        f"could not download {spec.name} from any source:\n"
        + "".join(f"  - {failure}\n" for failure in failures)
        + f"To use a local copy, set {MIRROR_ENV} to a folder holding the four MNIST files "
        f"(or to a mirror URL), e.g. `{MIRROR_ENV}=/path/to/mnist dvc repro`."
    )


def run(cfg: PipelineConfig) -> None:
    """Download, verify and store the four MNIST files in `paths.raw_dir`."""
    raw_dir = cfg.path(cfg.paths.raw_dir)
    candidates = sources(cfg)
    if not candidates:
        raise DownloadError(f"no sources: set {MIRROR_ENV} or list data.mirrors")
    with files.staged_dir(raw_dir) as staging:
        for key in FILE_KEYS:
            spec = getattr(cfg.data, key)
            started = time.perf_counter()
            payload = fetch(spec, candidates, cfg.download)
            if not payload.startswith(idx.GZIP_MAGIC):
                # An uncompressed mirror: store it as the configured .gz name says;
                # mtime=0 keeps the archive bytes, and so DVC's hash, reproducible.
                payload = gzip.compress(payload, compresslevel=6, mtime=0)
            (staging / spec.name).write_bytes(payload)
            log.info(
                "%s: verified (sha256 of content %s...) in %.1f s",
                spec.name,
                spec.sha256[:12],
                time.perf_counter() - started,
            )
    log.info("MNIST is in %s", raw_dir)


if __name__ == "__main__":
    cli.main(run)
