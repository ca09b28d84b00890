"""Which versions this server answers with, and its heartbeat row in the store (`replicas`).

Without `loop.artifacts_url` (one machine, or replicas sharing the runs' disk) a version is what the registry
says, its files where the row names them, and the champion the store's at every request, as always.

With `loop.artifacts_url`, versions' files come from object storage (loop/artifacts.py): every
`serve.sync_seconds` the SyncThread looks at the store's champion and, when it is a new one, brings its files into
this machine's cache, checked against the hashes the registry recorded. Only then does this server answer with
it; a file that cannot be had or whose hash differs leaves the previous champion serving, and the reason is in
this replica's row (GET /v1/loop/status, the Loop page). Each sync also writes that row: the version served and
when, so a replica that stopped reporting shows its age.
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import TYPE_CHECKING

from tuneship.errors import TuneshipError
from tuneship.loop.lease import new_holder
from tuneship.serve.pool import BackendError

if TYPE_CHECKING:
    from tuneship.loop.registry import Loop
    from tuneship.loop.tables import Version

log = logging.getLogger("tuneship.serve")


class Replica:
    """The versions this server serves (`champion()`, `version(id)`) and its heartbeat (`sync()`)."""

    def __init__(self, loop: Loop, url: str | None = None) -> None:
        self.loop = loop
        self.id = new_holder()
        self.host = socket.gethostname()
        self.url = url
        self.remote = bool(loop.cfg.loop.artifacts_url)
        self.serving: Version | None = None  # remote: the champion whose files are here and checked
        self.problem: str | None = None
        self.local: dict[int, Version] = {}  # remote: version id -> its row with the cached files' paths
        self.lock = threading.Lock()

    def champion(self) -> Version | None:
        if not self.remote:
            return self.loop.store.champion()
        if self.serving is None:
            self.sync()
        return self.serving

    def version(self, version_id: int) -> Version | None:
        version = self.loop.store.version(version_id)
        if version is None or not self.remote:
            return version
        try:
            return self._local(version)
        except TuneshipError as exc:
            raise BackendError(str(exc)) from None

    def sync(self) -> None:
        """Follow the store's champion (remote: once its files are here and checked), then report."""
        champion = self.loop.store.champion()
        if self.remote and champion is not None:
            try:
                self.serving, self.problem = self._local(champion), None
            except TuneshipError as exc:
                self.problem = f"v{champion.id} not served: {exc}"
                log.warning("replica: %s", self.problem)
        served = self.serving if self.remote else champion
        self.loop.store.report_replica(self.id, self.host, self.url, served.id if served else None, self.problem)

    def _local(self, version: Version) -> Version:
        from tuneship.loop.artifacts import local_version

        with self.lock:  # one download of a version at a time
            cached = self.local.get(version.id)
            if cached is None or cached.artifacts != version.artifacts:
                cached = self.local[version.id] = local_version(self.loop, version)
        return _with_status(cached, version)

    def close(self) -> None:
        try:
            self.loop.store.forget_replica(self.id)
        except Exception as exc:  # the server stops either way; its row then ages in the list
            log.warning("replica: could not remove this replica's row: %s", exc)


def _with_status(local: Version, row: Version) -> Version:
    """The cached copy with the row's current status and metrics (promotions change them, not the files)."""
    local.status, local.metrics, local.promoted_at = row.status, row.metrics, row.promoted_at
    return local


class SyncThread(threading.Thread):
    """`replica.sync()` every serve.sync_seconds until stopped."""

    def __init__(self, replica: Replica, seconds: float) -> None:
        super().__init__(daemon=True, name="replica-sync")
        self.replica, self.seconds = replica, seconds
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.seconds):
            try:
                self.replica.sync()
            except Exception:  # the thread outlives a database that is away for a moment
                log.exception("replica sync failed")
