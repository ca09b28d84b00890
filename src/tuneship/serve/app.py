"""The FastAPI app of `tuneship serve`: `create_app(loop, ...)`.

`app.state.loop` is the Loop (config, base run, store: see tuneship.loop.registry / tuneship.loop.store),
`app.state.router` the model Router (backends.py), `app.state.cycles` the CycleLauncher that starts a cycle in
its own process. The web pages (serve/web/) are mounted over the runs folder beside the base run.
Errors are JSON `{"error": {"message", "type", "param"}}` with a 4xx for anything the client can fix (the
field named in `param`), never a 500 for bad input. Bodies over `serve.max_body_bytes` get 413.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tuneship.data.audit import Measure
from tuneship.errors import TuneshipError
from tuneship.loop.tables import VersionKind
from tuneship.serve.errors import error_body
from tuneship.serve.ratelimit import PerClientLimit

if TYPE_CHECKING:
    from tuneship.loop.registry import Loop
    from tuneship.serve.backends import Router

log = logging.getLogger("tuneship.serve")


class BodyLimit:
    """ASGI middleware: 413 when the body is larger than `max_bytes`, by its Content-Length or, for a chunked
    body, as it streams in. The body (bounded, so small) is read here and handed to the app as received."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._reject(send)
        messages, received = [], 0
        while True:
            message = await receive()
            messages.append(message)
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                return await self._reject(send)
            if message["type"] != "http.request" or not message.get("more_body"):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _reject(self, send: Send) -> None:
        body = json.dumps(
            error_body(
                f"request body: larger than serve.max_body_bytes={self.max_bytes}; send a smaller body",
                "request_too_large",
                "body",
            )
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})


SECRET_OVERRIDES = {"serve.api_key": "TUNESHIP_API_KEY"}


def split_secrets(overrides: list[str]) -> tuple[list[str], dict[str, str]]:
    """The `--set` overrides without the keys, and the keys as environment variables: a key never goes on a
    command line (where `ps` shows it) nor into a version's config.yaml."""
    kept, env = [], {}
    for override in overrides:
        name, _, value = override.partition("=")
        if name.strip() in SECRET_OVERRIDES:
            env[SECRET_OVERRIDES[name.strip()]] = value.strip()
        else:
            kept.append(override)
    return kept, env


class CycleLauncher:
    """Starts `tuneship loop cycle` in its own process, so serving goes on while it trains. Keys reach it
    through the environment (TUNESHIP_API_KEY), never its command line.

    With a `standby` folder (serve.standby_cycle), the next cycle's process is started ahead whenever no cycle
    runs (`tuneship loop standby`, logging to that folder's cycle.log): it has imported PyTorch and the rest by
    the time a cycle is due, and is told which cycle to run on its stdin. It ends with the server (its stdin
    closes)."""

    def __init__(self, target: str, overrides: list[str], live_url: str | None, standby: Path | None = None):
        self.target = target
        self.overrides, self.secret_env = split_secrets(overrides)
        self.live_url = live_url
        self.processes: list[subprocess.Popen] = []
        self.lock = threading.Lock()
        self.standby_dir = standby
        self.standby: subprocess.Popen | None = None
        self._keep_standby()

    def command(self, actor: str, reason: str, kind: VersionKind = "finetune") -> list[str]:
        command = [*self._tuneship("cycle"), "--actor", actor, "--reason", reason, "--kind", kind]
        return command + self._shared_options()

    def start(self, actor: str, reason: str, log_dir: Path, kind: VersionKind = "finetune") -> int:
        with self.lock:
            self.processes = [p for p in self.processes if p.poll() is None]
            process = self._told(actor, reason, kind) if log_dir == self.standby_dir else None
            process = process or self._spawn(self.command(actor, reason, kind), log_dir)
            self.processes.append(process)
            return process.pid

    def running(self) -> bool:
        """Whether a cycle this server started still runs; when none does, the standby is (re)started."""
        with self.lock:
            if any(p.poll() is None for p in self.processes):
                return True
            self._keep_standby()
            return False

    def _told(self, actor: str, reason: str, kind: VersionKind) -> subprocess.Popen | None:
        """The standby, told to run this cycle; None when there is none (or it died)."""
        standby, self.standby = self.standby, None
        if standby is None or standby.poll() is not None:
            return None
        try:
            standby.stdin.write(json.dumps({"actor": actor, "reason": reason, "kind": kind}).encode() + b"\n")
            standby.stdin.close()
        except OSError:  # it ended after the poll
            return None
        return standby

    def _keep_standby(self) -> None:
        """A standby that ended untold failed (it ends by itself only when its stdin closes): then no other is
        started, every cycle starts its own process, and the log says where to look."""
        if self.standby_dir is None:
            return
        if self.standby is not None and self.standby.poll() is not None:
            log.warning("the standby cycle process ended (%s); see %s", self.standby.returncode, self.standby_dir)
            self.standby_dir = self.standby = None
            return
        if self.standby is None:
            command = self._tuneship("standby") + self._shared_options()
            self.standby = self._spawn(command, self.standby_dir, stdin=subprocess.PIPE)

    def _tuneship(self, command: str) -> list[str]:
        return [sys.executable, "-m", "tuneship.cli", "loop", command, self.target]

    def _shared_options(self) -> list[str]:
        options = [item for override in self.overrides for item in ("--set", override)]
        return options + (["--live-url", self.live_url] if self.live_url else [])

    def _spawn(self, command: list[str], log_dir: Path, stdin=None) -> subprocess.Popen:
        log_dir.mkdir(parents=True, exist_ok=True)
        with open(log_dir / "cycle.log", "ab") as out:
            return subprocess.Popen(
                command, stdin=stdin, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **self.secret_env}
            )


class TriggerThread(threading.Thread):
    """Harvest new feedback into examples, and start a cycle (or the fast path's few-shot candidate) when due:
    every serve.trigger_every seconds, and at once (at most once per MIN_TICK_SECONDS) when new feedback came in
    (`feedback_came`) or a cycle this server started has ended, so the correction that reaches loop.min_examples
    starts its cycle without waiting for the next tick. A few-shot candidate waits until no feedback came for
    BURST_QUIET_SECONDS: corrections sent in a burst go to the fine-tune they add up to, not to a candidate that
    would hold the lease meanwhile."""

    MIN_TICK_SECONDS = 1.0
    BURST_QUIET_SECONDS = 3.0

    def __init__(self, app: FastAPI) -> None:
        super().__init__(daemon=True, name="loop-trigger")
        self.app = app
        self.stopped = threading.Event()
        self.wake = threading.Event()
        self.measure: Measure | None = None
        self.feedback_at = float("-inf")  # time.monotonic() of the last new feedback
        self.retry_in: float | None = None  # a deferred few-shot candidate: look again this much later

    def feedback_came(self) -> None:
        self.feedback_at = time.monotonic()
        self.wake.set()

    def run(self) -> None:
        while not self.stopped.is_set():
            every = self.app.state.loop.cfg.serve.trigger_every
            if self.app.state.cycles.running():  # then its end is seen within a second
                every = self.MIN_TICK_SECONDS
            self.wake.wait(min(every, self.retry_in) if self.retry_in is not None else every)
            self.wake.clear()
            self.retry_in = None
            if self.stopped.is_set():
                break
            try:
                self.tick()
            except TuneshipError as exc:
                log.warning("loop trigger: %s", exc)
            except Exception:  # the thread must outlive one bad tick; the traceback goes to the log
                log.exception("loop trigger failed")
            self.stopped.wait(self.MIN_TICK_SECONDS)  # at most one tick a second, however much feedback comes in

    def tick(self) -> bool:
        from tuneship.loop.signals import harvest
        from tuneship.loop.lease import CYCLE_LEASE
        from tuneship.loop.trigger import trigger_decision

        loop, cycles = self.app.state.loop, self.app.state.cycles
        if loop.store.lease(CYCLE_LEASE) is not None or cycles.running():
            return False
        harvest(loop.store, loop.cfg, self._measure())
        decision = trigger_decision(loop.store, loop.cfg.loop)
        quiet_left = self.BURST_QUIET_SECONDS - (time.monotonic() - self.feedback_at)
        if decision.is_due and decision.kind == "fewshot" and quiet_left > 0:
            self.retry_in = quiet_left
            return False
        if decision.is_due:
            cycles.start("trigger", decision.reason, loop.log_dir, decision.kind)
        return decision.is_due

    def _measure(self) -> Measure:
        if self.measure is None:
            from tuneship.loop.registry import version_chat_format

            self.measure = version_chat_format(self.app.state.loop.store.champion()).measure
        return self.measure


def log_loop_warnings(loop: Loop) -> None:
    """What `tuneship loop status` warns about (too few golden facts), in the server's log at start."""
    from tuneship.loop.status import loop_warnings

    for warning in loop_warnings(loop):
        log.warning("loop: %s", warning)


def create_app(
    loop: Loop,
    *,
    router: Router | None = None,
    cycles: CycleLauncher | None = None,
    trigger: bool = False,
    url: str | None = None,
) -> FastAPI:
    """The app over one Loop. `router` defaults to a Router over the loop's registry; `cycles` to a launcher
    for `tuneship loop cycle <base run>`; `trigger` starts the background trigger thread with the app (unless
    serve.cycles is external: a worker runs them). `url`: where this server answers, in its replica row."""
    from contextlib import asynccontextmanager

    from tuneship.serve.api import router as api_router
    from tuneship.serve.auth import install_auth
    from tuneship.serve.backends import Router
    from tuneship.serve.errors import install_error_handlers
    from tuneship.serve.golden_api import router as golden_router
    from tuneship.serve.guard import HostOriginGuard
    from tuneship.serve.replica import Replica, SyncThread
    from tuneship.serve.review import router as review_router
    from tuneship.serve.web.pages import mount_web

    serve_cfg = loop.cfg.serve

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        log_loop_warnings(loop)
        replica = app.state.router.replica
        replica.sync()
        app.state.router.warm_up()
        sync = SyncThread(replica, serve_cfg.sync_seconds)
        sync.start()
        starts_cycles = trigger and serve_cfg.trigger_every > 0 and serve_cfg.cycles == "local"
        thread = TriggerThread(app) if starts_cycles else None
        if thread:
            thread.start()
        app.state.trigger = thread
        yield
        if thread:
            thread.stopped.set()
            thread.wake.set()
        sync.stopped.set()
        replica.close()
        app.state.router.close()

    app = FastAPI(
        title="tuneship serve",
        version="1",
        description="OpenAI-compatible chat API over the loop's champion, feedback, and the learning loop.",
        lifespan=lifespan,
    )
    loop.store.use_timeout(loop.cfg.serve.db_timeout)  # a locked database: 503 within serve.db_timeout, not 30 s
    app.state.loop = loop
    app.state.feedback_limit = PerClientLimit(loop.cfg.serve.feedback_per_minute)
    app.state.router = router or Router(loop, replica=Replica(loop, url))
    app.state.cycles = cycles or CycleLauncher(str(loop.target), [], None)
    install_auth(app, loop.cfg.serve)
    install_error_handlers(app)
    app.include_router(api_router)
    app.include_router(review_router)
    app.include_router(golden_router)
    mount_web(app, loop.base_run.parent)  # the web pages (tuneship.serve.web)
    app.add_middleware(BodyLimit, max_bytes=loop.cfg.serve.max_body_bytes)
    app.add_middleware(  # the outermost: a foreign Host or Origin is refused before anything else
        HostOriginGuard, allowed_hosts=serve_cfg.allowed_hosts, allowed_origins=serve_cfg.allowed_origins
    )
    return app
