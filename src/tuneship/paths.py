"""Where tuneship keeps its cache (converted base models, S3 mirror)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$TUNESHIP_CACHE, else $XDG_CACHE_HOME/tuneship, else ~/.cache/tuneship."""
    if os.environ.get("TUNESHIP_CACHE"):
        return Path(os.environ["TUNESHIP_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tuneship"
