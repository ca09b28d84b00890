"""Bounded generation queues per model, and the thread each generation runs in.

- Slots: one per model that answers (a loaded version, an Ollama model): `serve.max_concurrent` generations at
  once and `serve.max_queue` chats waiting for their turn. A waiting chat waits in the event loop and holds no
  thread; beyond the queue, or when its turn does not come within its deadline, `Overloaded` (the API answers
  429 with Retry-After).
- Generation: one generation on one backend, in a thread of its own (never one of the shared pool that answers
  the other endpoints); its text pieces reach the event loop through a queue. It stops between tokens when the
  client is gone or its deadline passes, and its slot is freed when its thread ends, not when a handler that
  waited for it gives up, so a slot counts a model that is really busy.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable

from tuneship.errors import TuneshipError

RETRY_AFTER_MAX = 60  # seconds; Retry-After is an estimate of when a turn frees up, never more than this

Emit = Callable[[str], None]
ShouldStop = Callable[[], bool]


class Overloaded(TuneshipError):
    """A model's queue is full (or the turn did not come in time): retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class GenerationTimeout(TuneshipError):
    """The generation did not finish within serve.timeout."""


class Slots:
    """`concurrent` generations at once on one model, `queue` more waiting in line; used from the event loop only.
    A turn passes straight from a generation that ends to the first chat in line."""

    def __init__(self, name: str, concurrent: int, queue: int) -> None:
        self.name = name
        self.concurrent = concurrent
        self.queue = queue
        self.running = 0  # turns held: generations whose thread has not ended
        self.turns: deque[asyncio.Future[None]] = deque()  # the chats in line, first first
        self.seconds = 1.0  # a moving average of one generation's time, for Retry-After

    @property
    def waiting(self) -> int:
        return len(self.turns)

    async def acquire(self, timeout: float) -> None:
        """Wait for a turn; Overloaded when the line is full or the turn does not come within `timeout` s."""
        if self.running + self.waiting >= self.concurrent + self.queue:
            raise Overloaded(
                f"model {self.name} is busy: {self.running} generating and {self.waiting} waiting "
                f"(serve.max_concurrent={self.concurrent}, serve.max_queue={self.queue}); retry later",
                self.retry_after(),
            )
        if self.running < self.concurrent and not self.turns:
            self.running += 1
            return
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.turns.append(turn)
        try:
            await asyncio.wait_for(turn, max(timeout, 0.0))
        except BaseException as exc:  # timed out, or the chat was cancelled (its client left)
            if turn in self.turns:
                self.turns.remove(turn)
            elif turn.done() and not turn.cancelled():  # the turn came just as the chat gave up: pass it on
                self._hand_over()
            if isinstance(exc, asyncio.TimeoutError):
                late = f"model {self.name} is busy: no turn within serve.timeout"
                raise Overloaded(late, self.retry_after()) from None
            raise

    def release(self, seconds: float) -> None:
        """A generation's thread ended after `seconds`: its turn goes to the first in line."""
        self.seconds = 0.8 * self.seconds + 0.2 * seconds
        self._hand_over()

    def _hand_over(self) -> None:
        while self.turns:
            turn = self.turns.popleft()
            if not turn.done():
                turn.set_result(None)  # `running` stays: the turn passes on
                return
        self.running -= 1

    def retry_after(self) -> int:
        """Seconds until the chats ahead are likely done (at least 1)."""
        turns = (self.running + self.waiting + 1) / self.concurrent
        return max(1, min(RETRY_AFTER_MAX, math.ceil(self.seconds * turns)))


class Generation:
    """`work(emit, should_stop)` run in a thread of its own, holding a turn of `slots` until it returns."""

    def __init__(
        self, work: Callable[[Emit, ShouldStop], None], slots: Slots, deadline: float, gone: threading.Event
    ) -> None:
        self.work = work
        self.slots = slots
        self.deadline = deadline
        self.gone = gone  # set when the client disconnects
        self.abandoned = threading.Event()  # set when nobody reads the pieces any more
        self.timed_out = False
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[str, object]] = asyncio.Queue()
        self.started = time.monotonic()

    def start(self) -> None:
        """Start the thread; the caller holds a turn of `slots`, which the thread's end gives back."""
        threading.Thread(target=self._run, daemon=True, name=f"generate-{self.slots.name}").start()

    def should_stop(self) -> bool:
        """Checked by the backend between tokens: the client is gone, nobody reads, or the deadline passed."""
        if time.monotonic() >= self.deadline:
            self.timed_out = True
        return self.timed_out or self.gone.is_set() or self.abandoned.is_set()

    def _run(self) -> None:
        try:
            self.work(lambda piece: self._call(self.queue.put_nowait, ("piece", piece)), self.should_stop)
            self._call(self.queue.put_nowait, ("done", None))
        except Exception as exc:  # handed to the event loop, where the router falls through to the next target
            self._call(self.queue.put_nowait, ("error", exc))
        finally:
            self._call(self.slots.release, time.monotonic() - self.started)

    def _call(self, function: Callable[..., object], *args: object) -> None:
        try:
            self.loop.call_soon_threadsafe(function, *args)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            pass

    async def pieces(self) -> AsyncIterator[str]:
        """Text pieces until the generation ends; GenerationTimeout when the deadline passes first. Leaving the
        iteration early (the client is gone, a timeout) stops the generation at its next token."""
        try:
            while True:
                kind, value = await self._next()
                if kind == "piece":
                    yield str(value)
                elif isinstance(value, Exception):
                    raise value
                elif self.timed_out:
                    raise GenerationTimeout("no answer within serve.timeout")
                else:
                    return
        finally:
            self.abandoned.set()

    async def _next(self) -> tuple[str, object]:
        if not self.queue.empty():
            return self.queue.get_nowait()
        try:
            return await asyncio.wait_for(self.queue.get(), max(self.deadline - time.monotonic(), 0.0))
        except asyncio.TimeoutError:
            self.timed_out = True
            raise GenerationTimeout("no answer within serve.timeout") from None
