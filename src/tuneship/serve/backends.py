"""Model backends behind the chat API, and the router that picks one per request with fallback.

- LlamaCppModel (pool.py): a version in llama.cpp, in-process, loaded in the ModelPool (adapter-format versions
  share one loaded base GGUF).
- OllamaModel: an Ollama model over REST (/api/chat), through deploy/ollama.py's client.
- Router: model name -> targets ("champion", "v<N>", "ollama:<model>"), primary then fallbacks. Each model that
  answers has a bounded queue (generation.py: `serve.max_concurrent` at once, `serve.max_queue` waiting) and each
  generation runs in a thread of its own; a target that is full, raises or times out falls through, and the
  reply says which target answered. When every target is full the request is refused with `Overloaded` (429).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tuneship.errors import TuneshipError
from tuneship.loop.registry import has_served_files
from tuneship.serve.pool import BackendError, LlamaCppModel, ModelPool, Reply, never
from tuneship.serve.replica import Replica
from tuneship.serve.generation import Emit, Generation, GenerationTimeout, Overloaded, ShouldStop, Slots

if TYPE_CHECKING:
    from tuneship.loop.registry import Loop
    from tuneship.loop.tables import Version


log = logging.getLogger("tuneship.serve")


class UnknownModel(TuneshipError):
    """The request names a model this server does not serve."""


@dataclass(frozen=True)
class Ask:
    """What one chat request asks of a backend."""

    messages: list[dict]
    max_tokens: int
    temperature: float


class OllamaModel:
    def __init__(self, host: str | None, model: str, timeout: float, version_id: int | None = None):
        from tuneship.deploy.ollama import OllamaClient

        self.client = OllamaClient(host, timeout=timeout)
        self.model = model
        self.label = f"ollama:{model}"
        self.version_id = version_id

    def stream(
        self, messages: list[dict], max_tokens: int, temperature: float, reply: Reply, stop: ShouldStop = never
    ) -> Iterator[str]:
        """One piece: Ollama answers whole (`stop` is asked once, before the request)."""
        if stop():
            return
        answer = self.client.chat(self.model, messages, {"temperature": temperature, "num_predict": max_tokens})
        reply.text = (answer.get("message") or {}).get("content", "")
        reply.finish_reason = "length" if answer.get("done_reason") == "length" else "stop"
        reply.prompt_tokens, reply.completion_tokens = answer.get("prompt_eval_count"), answer.get("eval_count")
        if reply.text:
            yield reply.text


@dataclass(frozen=True)
class Target:
    """A route's target resolved for one request: what answers, and the queue it waits in."""

    name: str  # as the routes name it: champion, v<N>, ollama:<model>
    key: str  # the model that answers: v<N> (llama.cpp), ollama:<model>
    label: str  # the model's name in messages
    version: Version | None = None


@dataclass
class Stream:
    """A streamed answer whose first piece has come (or that ended without one)."""

    reply: Reply
    first: str | None
    rest: AsyncGenerator[str, None]

    async def pieces(self) -> AsyncIterator[str]:
        """The answer's pieces; past serve.timeout the answer ends where it is (finish reason "length")."""
        sent: list[str] = []
        try:
            if self.first is not None:
                sent.append(self.first)
                yield self.first
            async for piece in self.rest:
                sent.append(piece)
                yield piece
        except GenerationTimeout:
            self.reply.finish_reason, self.reply.text = "length", "".join(sent)
        finally:
            await self.rest.aclose()


class Failures:
    """Why each target of a request did not answer: a 429 when any was only busy, else a 503."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.errors: list[str] = []
        self.busy: list[Overloaded] = []

    def add(self, target: str, exc: Exception) -> None:
        if isinstance(exc, Overloaded):
            self.busy.append(exc)
        elif isinstance(exc, GenerationTimeout):
            self.errors.append(f"{target}: no answer within serve.timeout={self.timeout:g} s")
        else:
            log.warning("target %s failed: %r", target, exc)
            self.errors.append(f"{target}: {exc}")

    def error(self) -> TuneshipError:
        if self.busy:
            messages = [str(e) for e in self.busy] + self.errors
            return Overloaded("; ".join(messages), min(e.retry_after for e in self.busy))
        return BackendError("no backend answered: " + "; ".join(self.errors))


class Router:
    """Resolves a request's model name to targets and answers with the first that works."""

    def __init__(self, loop: Loop, pool: ModelPool | None = None, replica: Replica | None = None) -> None:
        self.loop = loop
        self.serve = loop.cfg.serve
        self.pool = pool or ModelPool(self.serve.n_ctx, self.serve.max_loaded_models)
        self.replica = replica or Replica(loop)  # which versions answer here (their files in the artifacts cache)
        self.slots: dict[str, Slots] = {}  # target key -> its queue (touched in the event loop only)

    def warm_up(self) -> None:
        """Load the champion before the first request (and before any other thread imports transformers: its lazy
        imports are not safe to race); in adapter format (loop.version_format) first bring it into that form, so
        every later version shares its loaded base."""
        from tuneship.loop.adapter_form import in_adapter_form

        champion = self.loop.store.champion()
        if self.serve.backend != "llamacpp" or champion is None or not champion.gguf:
            return
        if self.replica.remote:  # its files come from the artifacts (the worker brings it into adapter form)
            champion = self.replica.champion()
        else:
            try:
                champion = in_adapter_form(self.loop, champion)
            except TuneshipError as exc:  # it still serves as it is; the cycle will say the same when it needs it
                log.warning("v%s stays in its merged GGUF: %s", champion.id, exc)
        if champion is None or not has_served_files(champion):
            return
        self.pool.keep_only(self._wanted_versions())
        with self.pool.use(champion):
            pass

    def model_names(self) -> list[str]:
        names = list(self.serve.routes) or [self.loop.name]
        return names + [v.name for v in self.loop.store.versions() if v.status not in ("training", "failed")]

    def targets(self, model: str) -> list[str]:
        if model in self.serve.routes:
            route = self.serve.routes[model]
            return [route.primary, *route.fallbacks]
        if model == self.loop.name and not self.serve.routes:
            return ["champion"]
        for version in self.loop.store.versions():
            if version.name == model:
                return [f"v{version.id}"]
        raise UnknownModel(f"model: {model!r} is not served here; GET /v1/models lists what is")

    def plan(self, model: str) -> list[tuple[str, Target | BackendError]]:
        """Each target of `model`, resolved now, or why it cannot answer (UnknownModel: no such model)."""
        names = self.targets(model)
        if self.serve.backend == "llamacpp":
            self.pool.keep_only(self._wanted_versions())
        plan: list[tuple[str, Target | BackendError]] = []
        for name in names:
            try:
                plan.append((name, self._resolve(name)))
            except BackendError as exc:
                plan.append((name, exc))
        return plan

    def _resolve(self, name: str) -> Target:
        if name.startswith("ollama:"):
            return Target(name, name, name.removeprefix("ollama:"))
        version = self._version(name)
        if self.serve.backend == "ollama":
            model = f"{self.loop.cfg.deploy.name or self.loop.name}:v{version.id}"
            return Target(name, f"ollama:{model}", model, version)
        return Target(name, f"v{version.id}", version.name, version)

    def _wanted_versions(self) -> set[int]:
        """The champion and the versions routes name stay loaded; any other is closed once idle."""
        champion = self.replica.champion()
        named = {
            int(t[1:])
            for route in self.serve.routes.values()
            for t in [route.primary, *route.fallbacks]
            if t.startswith("v") and t[1:].isdigit()
        }
        return named | ({champion.id} if champion else set())

    def _version(self, target: str) -> Version:
        if target == "champion":
            version = self.replica.champion()
            if version is None:
                raise BackendError(
                    self.replica.problem
                    or "no champion version in the registry; promote one (`tuneship loop versions`)"
                )
            return version
        if target.startswith("v") and target[1:].isdigit():
            version = self.replica.version(int(target[1:]))
            if version is not None:
                return version
        raise BackendError(f"serve.routes: unknown target {target!r}; use champion, v<N> or ollama:<model>")

    @contextmanager
    def open_target(self, target: Target) -> Iterator[LlamaCppModel | OllamaModel]:
        """A backend for one target, held for the duration of a generation (in the generation's thread)."""
        if target.version is None:
            yield OllamaModel(self.loop.cfg.deploy.host, target.label, self.serve.timeout)
        elif self.serve.backend == "ollama":
            yield OllamaModel(self.loop.cfg.deploy.host, target.label, self.serve.timeout, target.version.id)
        else:
            with self.pool.use(target.version) as model:
                yield model

    async def complete(self, model: str, ask: Ask, gone: threading.Event) -> Reply:
        """Primary, then fallbacks; each gets serve.timeout seconds, its wait for a turn included."""
        failures, tried = Failures(self.serve.timeout), []
        for name, target in await asyncio.to_thread(self.plan, model):
            tried.append(name)
            reply = Reply("", "stop", None, None, tried=tried)
            try:
                async for _ in (await self._start(target, ask, reply, gone)).pieces():
                    pass
                return reply
            except Exception as exc:  # a backend that breaks is a backend that failed: the next target answers
                failures.add(name, exc)
        raise failures.error()

    async def open_stream(self, model: str, ask: Ask, gone: threading.Event) -> Stream:
        """The first target whose generation yields its first piece; falls through only before that piece."""
        failures, tried = Failures(self.serve.timeout), []
        for name, target in await asyncio.to_thread(self.plan, model):
            tried.append(name)
            reply = Reply("", "stop", None, None, tried=tried)
            try:
                rest = (await self._start(target, ask, reply, gone)).pieces()
                return Stream(reply, await anext(rest, None), rest)
            except Exception as exc:  # as in complete()
                failures.add(name, exc)
        raise failures.error()

    async def _start(self, target: Target | BackendError, ask: Ask, reply: Reply, gone: threading.Event) -> Generation:
        """Wait for a turn on the target's model (in the event loop), then generate in a thread of its own."""
        if isinstance(target, BackendError):
            raise target
        deadline = time.monotonic() + self.serve.timeout
        slots = self._slots(target)
        await slots.acquire(deadline - time.monotonic())

        def work(emit: Emit, should_stop: ShouldStop) -> None:
            with self.open_target(target) as backend:
                reply.answered_by, reply.version_id = backend.label, backend.version_id
                for piece in backend.stream(ask.messages, ask.max_tokens, ask.temperature, reply, should_stop):
                    emit(piece)

        generation = Generation(work, slots, deadline, gone)
        generation.start()
        return generation

    def _slots(self, target: Target) -> Slots:
        if target.key not in self.slots:
            self.slots[target.key] = Slots(target.label, self.serve.max_concurrent, self.serve.max_queue)
        return self.slots[target.key]

    def close(self) -> None:
        self.pool.close()


def elapsed_ms(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 1)
