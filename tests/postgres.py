"""A throwaway PostgreSQL server on loopback for the store tests and the feedback benchmark.

Debian's postgresql package (installed by `make setup` when run as root) provides initdb and pg_ctl.
PostgreSQL refuses to run as root, so as root the server runs as the `postgres` user (runuser). Without
PostgreSQL, `postgres_url()` yields None and the tests that need it skip.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _bin_dir() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(candidates[-1]).parent if candidates else None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _as_server_user(command: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@contextmanager
def postgres_url() -> Iterator[str | None]:
    """sqlalchemy URL of a fresh server and database, or None when PostgreSQL is not installed."""
    bin_dir = _bin_dir()
    if bin_dir is None or (os.geteuid() == 0 and not shutil.which("runuser")):
        yield None
        return
    root = Path(tempfile.mkdtemp(prefix="tuneship-pg-"))
    data, port = root / "data", _free_port()
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")

    def run(program: str, *args: str) -> None:
        subprocess.run(_as_server_user([str(bin_dir / program), *args]), check=True, capture_output=True)

    run("initdb", "-D", str(data), "-U", "tuneship", "--auth=trust", "-E", "UTF8")
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off -c max_connections=200"
    run("pg_ctl", "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "start")
    try:
        run("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "tuneship", "tuneship")
        yield f"postgresql+psycopg://tuneship@127.0.0.1:{port}/tuneship"
    finally:
        run("pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)
