"""`serve.feedback_per_minute` per client: a sliding window of the last minute's accepted feedback, in memory
(one server process; each replica counts its own)."""

from __future__ import annotations

import math
import threading
import time
from collections import defaultdict, deque

WINDOW_SECONDS = 60.0


class PerClientLimit:
    def __init__(self, per_minute: int):
        self.per_minute = per_minute
        self.sent: dict[str, deque[float]] = defaultdict(deque)
        self.lock = threading.Lock()

    def retry_after(self, client: str, now: float | None = None) -> int | None:
        """None when the client may send now (and counts it), else the seconds until it may."""
        now = time.monotonic() if now is None else now
        with self.lock:
            times = self.sent[client]
            while times and now - times[0] >= WINDOW_SECONDS:
                times.popleft()
            if len(times) >= self.per_minute:
                return max(1, math.ceil(WINDOW_SECONDS - (now - times[0])))
            times.append(now)
            return None
