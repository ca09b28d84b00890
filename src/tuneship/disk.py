"""Free-space checks before writing large artifacts: training's checkpoints and export's files share them."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tuneship.errors import DiskFull

HEADROOM = 1.1


def free_disk_bytes(path: Path) -> int:
    """Free bytes for an unprivileged writer in `path` (created when missing)."""
    path.mkdir(parents=True, exist_ok=True)
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def require_disk(folder: Path, needed_bytes: int, what: str, then: str) -> None:
    """Raise DiskFull (exit 3) when `folder` has less than `needed_bytes` free; `then` says what to do."""
    free = free_disk_bytes(folder)
    if free < needed_bytes:
        raise DiskFull(
            f"disk guard: {free / 1e9:.2f} GB free in {folder}, {what} needs {needed_bytes / 1e9:.2f} GB; {then}"
        )


def require_disk_for_file(folder: Path, expected_bytes: int, what: str) -> None:
    """Export's check: the expected size with 10 % headroom; finished steps are skipped on the rerun."""
    require_disk(
        folder,
        int(expected_bytes * HEADROOM),
        what,
        "free space and run the command again (finished steps are skipped)",
    )


@contextmanager
def written_atomically(path: Path) -> Iterator[Path]:
    """A temporary name beside `path` to write it under (this process's own); renamed to `path` when the write
    succeeded, removed if not, so a reader never sees half a file."""
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        yield partial
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)


@contextmanager
def locked(lock_path: Path) -> Iterator[None]:
    """An exclusive lock on `lock_path` (created when missing) among the processes of this machine (POSIX)."""
    import fcntl

    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
