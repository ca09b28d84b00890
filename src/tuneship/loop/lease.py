"""The cycle lease: one cycle at a time across processes and machines, renewed by a heartbeat.

A worker killed with -9 stops renewing, so the lease expires and the next cycle takes over. A renewal that fails
(the database locked or unreachable for a moment) is logged and tried again at the next beat: the heartbeat
outlives it, and the lease holds as long as one renewal in three succeeds.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tuneship.errors import TuneshipError
from tuneship.loop.store import Store

CYCLE_LEASE = "cycle"
log = logging.getLogger("tuneship.loop")


class CycleBusy(TuneshipError):
    """Another cycle holds the lease."""


class Heartbeat(threading.Thread):
    """Renews the lease every third of its length; `stage()` records where the cycle is."""

    def __init__(self, store: Store, holder: str, seconds: float):
        super().__init__(daemon=True, name="lease-heartbeat")
        self.store, self.holder, self.seconds = store, holder, seconds
        self.stopped = threading.Event()
        self.fields: dict[str, Any] = {}

    def stage(self, stage: str, version_id: int | None = None) -> None:
        self.fields = {"stage": stage, **({"version_id": version_id} if version_id else {})}
        self.beat()

    def run(self) -> None:
        while not self.stopped.wait(self.seconds / 3):
            self.beat()

    def beat(self) -> bool:
        """Renew the lease (with the stage); a failure is logged, and the next beat tries again."""
        try:
            return self.store.renew_lease(CYCLE_LEASE, self.holder, self.seconds, **self.fields)
        except Exception as exc:  # a database error must not end the heartbeat (the lease would expire mid-cycle)
            log.warning("cycle lease: renewal failed, trying again in %.0f s: %s", self.seconds / 3, exc)
            return False


def new_holder() -> str:
    """Who holds a lease: host, process and a random part (two cycles of one process differ)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@contextmanager
def cycle_lease(store: Store, seconds: float) -> Iterator[Heartbeat]:
    """Hold the cycle lease for the body, renewed by a heartbeat; CycleBusy when another cycle holds it."""
    holder = new_holder()
    if not store.acquire_lease(CYCLE_LEASE, holder, seconds, stage="starting"):
        lease = store.lease(CYCLE_LEASE)
        raise CycleBusy(f"a cycle is already running ({lease.holder if lease else '?'}); try again when it ends")
    heartbeat = Heartbeat(store, holder, seconds)
    heartbeat.start()
    try:
        yield heartbeat
    finally:
        heartbeat.stopped.set()
        store.release_lease(CYCLE_LEASE, holder)
