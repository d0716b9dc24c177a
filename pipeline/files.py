"""Writing outputs so that a failure never leaves a half-written file or folder behind."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError


@contextlib.contextmanager
def staged_dir(target: Path) -> Iterator[Path]:
    """Yield an empty staging folder that replaces `target` only if the block succeeds.

    The stages' output folders hold files only: a `target` with folders inside is not
    one of them (a mistyped `paths.*` value such as `.` or `data`), and is refused
    rather than replaced.
    """
    if target.is_dir() and any(child.is_dir() for child in target.iterdir()):
        raise PipelineError(
            f"{target}: holds folders, so it is not an output folder of this pipeline and "
            "will not be replaced; check the paths.* values"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the output should not be
    try:
        yield staging
        retired = target.with_name(f".{target.name}.old-{os.getpid()}")
        if target.exists():
            target.rename(retired)
        staging.rename(target)
        shutil.rmtree(retired, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def staged_file(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside `target` that is renamed onto it on success."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=target.suffix, dir=target.parent
    )
    os.close(handle)
    temporary = Path(name)
    temporary.chmod(0o644)  # mkstemp makes it private; the output should not be
    try:
        yield temporary
        temporary.replace(target)
    finally:
        temporary.unlink(missing_ok=True)


def write_json(target: Path, content: Any) -> None:
    """Write JSON atomically, indented for people and for `dvc metrics show`."""
    with staged_file(target) as temporary:
        temporary.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
