"""Disk checks before writing large artifacts."""

from __future__ import annotations

from pathlib import Path

from tuneship.errors import TuneshipError
from tuneship.train.device import free_disk_bytes

HEADROOM = 1.1


class DiskFull(TuneshipError):
    """Not enough free space for an artifact."""


def require_disk(folder: Path, expected_bytes: int, what: str) -> None:
    free = free_disk_bytes(folder)
    needed = int(expected_bytes * HEADROOM)
    if free < needed:
        raise DiskFull(
            f"{what} needs about {needed / 1e9:.2f} GB in {folder}, only {free / 1e9:.2f} GB is free; "
            "free space and run the command again (finished steps are skipped)"
        )
