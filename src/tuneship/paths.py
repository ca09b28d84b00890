"""Where tuneship keeps its cache (converted base models, S3 mirror)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def cache_dir() -> Path:
    """$TUNESHIP_CACHE, else $XDG_CACHE_HOME/tuneship, else ~/.cache/tuneship."""
    if os.environ.get("TUNESHIP_CACHE"):
        return Path(os.environ["TUNESHIP_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tuneship"


def sha256_file(path: Path) -> str:
    """The sha256 hex digest of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as data:
        for chunk in iter(lambda: data.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
