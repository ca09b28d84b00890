"""Model backends behind the chat API, and the router that picks one per request with fallback.

- LlamaCppModel: a version's GGUF in llama.cpp, in-process; the prompt is rendered with the version's own
  ChatFormat (a few-shot version's shots before the conversation) and generation stops on its stop tokens.
  One request at a time per model (llama.cpp contexts are not thread-safe); between tokens it asks whether to
  stop (the client is gone, serve.timeout has passed).
- OllamaModel: an Ollama model over REST (/api/chat), through deploy/ollama.py's client.
- ModelPool: loaded GGUFs by version. The champion and the versions routes name stay loaded, and of the others
  the `serve.max_loaded_models` most recently used (an LRU); a GGUF loads outside the pool's lock, so loading one
  never holds up another version. When the champion moves, the old model is closed only once its in-flight
  requests are done (or kept, while it is among the recently used), so a promotion never drops a request.
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
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tuneship.data.conversation import Conversation, Message, SourceRef
from tuneship.errors import TuneshipError
from tuneship.loop.shots import with_shots
from tuneship.serve.generation import Emit, Generation, GenerationTimeout, Overloaded, ShouldStop, Slots

if TYPE_CHECKING:
    from tuneship.loop.registry import Loop
    from tuneship.loop.tables import Version


log = logging.getLogger("tuneship.serve")


class BackendError(TuneshipError):
    """No backend could answer."""


class UnknownModel(TuneshipError):
    """The request names a model this server does not serve."""


@dataclass
class Reply:
    text: str
    finish_reason: str
    prompt_tokens: int | None
    completion_tokens: int | None
    answered_by: str = ""
    version_id: int | None = None
    tried: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Ask:
    """What one chat request asks of a backend."""

    messages: list[dict]
    max_tokens: int
    temperature: float


def never() -> bool:
    return False


def to_conversation(messages: list[dict]) -> Conversation:
    """OpenAI-style messages -> the canonical Conversation (a leading system message becomes its system)."""
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
    turns = [Message(m["role"], m["content"]) for m in messages[1 if system is not None else 0 :]]
    return Conversation(turns, SourceRef("request", 0), system)


class LlamaCppModel:
    def __init__(
        self,
        gguf: Path,
        chat_format_dir: Path,
        n_ctx: int,
        label: str,
        version_id: int | None = None,
        shots: list[dict] | None = None,
    ):
        from tuneship.chat.format import ChatFormat
        from tuneship.evaluate.backends import LlamaCppRunner

        self.runner = LlamaCppRunner(gguf, n_ctx)
        self.chat_format = ChatFormat.load(chat_format_dir)
        self.label = label
        self.version_id = version_id
        self.shots = list(shots or [])
        self.lock = threading.Lock()

    def stream(
        self, messages: list[dict], max_tokens: int, temperature: float, reply: Reply, stop: ShouldStop = never
    ) -> Iterator[str]:
        """Yield text pieces; fills `reply` (finish reason, token counts) when done. `stop()` is asked between
        tokens: when it says so, the answer ends there (finish reason "length")."""
        llm = self.runner.llm
        prompt = self.chat_format.generation_prompt(with_shots(to_conversation(messages), self.shots))
        stop_ids = set(self.chat_format.spec.stop_token_ids) | {llm.token_eos()}
        sampling = {"top_k": 1, "temp": 0.0} if temperature <= 0 else {"top_k": 40, "temp": temperature}
        with self.lock:
            if stop():
                return
            tokens = llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
            if len(tokens) + max_tokens > llm.n_ctx():
                shots = f" (with {len(self.shots)} few-shot turns)" if self.shots else ""
                raise BackendError(
                    f"messages: the prompt is {len(tokens)} tokens{shots}; with max_tokens={max_tokens} it exceeds "
                    f"the context of {llm.n_ctx()} (serve.n_ctx)"
                )
            reply.prompt_tokens, reply.finish_reason = len(tokens), "length"
            generated: list[int] = []
            sent = ""
            for token in llm.generate(tokens, top_p=1.0, repeat_penalty=1.0, reset=True, **sampling):
                if token in stop_ids:
                    reply.finish_reason = "stop"
                    break
                generated.append(token)
                text = llm.detokenize(generated, special=True).decode("utf-8", "replace")
                if not text.endswith("\ufffd") and len(text) > len(sent):
                    yield text[len(sent) :]
                    sent = text
                if len(generated) >= max_tokens or stop():
                    break
            reply.completion_tokens = len(generated)
            reply.text = sent

    def close(self) -> None:
        self.runner.close()


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


def load_version(version: Version, n_ctx: int) -> LlamaCppModel:
    if not version.gguf or not Path(version.gguf).is_file():
        raise BackendError(
            f"v{version.id} ({version.name}) has no GGUF at {version.gguf}; run `tuneship export {version.run_dir}` "
            "first"
        )
    return LlamaCppModel(
        Path(version.gguf), Path(version.run_dir) / "adapter", n_ctx, version.name, version.id, version.shots
    )


class ModelPool:
    """GGUFs loaded by version id, reference-counted by in-flight requests. The wanted versions stay loaded, and
    of the others the `keep_recent` most recently used; the rest are closed as soon as no request uses them."""

    def __init__(self, n_ctx: int, keep_recent: int = 0):
        self.n_ctx = n_ctx
        self.keep_recent = keep_recent
        self.models: dict[int, LlamaCppModel] = {}
        self.in_flight: dict[int, int] = {}
        self.wanted: set[int] = set()
        self.recent: OrderedDict[int, None] = OrderedDict()  # version ids, least recently used first
        self.loading: dict[int, threading.Lock] = {}  # one load at a time per version
        self.lock = threading.Lock()

    @contextmanager
    def use(self, version: Version) -> Iterator[LlamaCppModel]:
        model = self._acquire(version)
        try:
            yield model
        finally:
            with self.lock:
                self.in_flight[version.id] -= 1
            self.release_unwanted()

    def _acquire(self, version: Version) -> LlamaCppModel:
        with self.lock:
            if version.id in self.models:
                return self._take(version.id)
            loading = self.loading.setdefault(version.id, threading.Lock())
        with loading:  # outside the pool's lock: the other versions answer while this one loads
            with self.lock:
                if version.id in self.models:
                    return self._take(version.id)
            model = load_version(version, self.n_ctx)
            with self.lock:
                self.models[version.id] = model
                return self._take(version.id)

    def _take(self, version_id: int) -> LlamaCppModel:
        """One more request on a loaded model, now the most recently used (under the pool's lock)."""
        self.in_flight[version_id] = self.in_flight.get(version_id, 0) + 1
        self.recent[version_id] = None
        self.recent.move_to_end(version_id)
        return self.models[version_id]

    def keep_only(self, version_ids: set[int]) -> None:
        """Models outside `version_ids` (and the `keep_recent` most recently used) are closed once idle."""
        with self.lock:
            self.wanted = set(version_ids)
        self.release_unwanted()

    def release_unwanted(self) -> None:
        with self.lock:
            spare = [v for v in self.recent if v in self.models and v not in self.wanted]
            kept = set(spare[max(0, len(spare) - self.keep_recent) :])
            idle = [v for v in spare if v not in kept and not self.in_flight.get(v)]
            for version_id in idle:
                del self.recent[version_id]
            closing = [self.models.pop(v) for v in idle]
        for model in closing:
            model.close()

    def close(self) -> None:
        self.keep_recent = 0
        self.keep_only(set())


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

    def __init__(self, loop: Loop, pool: ModelPool | None = None) -> None:
        self.loop = loop
        self.serve = loop.cfg.serve
        self.pool = pool or ModelPool(self.serve.n_ctx, self.serve.max_loaded_models)
        self.slots: dict[str, Slots] = {}  # target key -> its queue (touched in the event loop only)

    def warm_up(self) -> None:
        """Load the champion's GGUF and ChatFormat before the first request (and before any other thread
        imports transformers: its lazy imports are not safe to race)."""
        champion = self.loop.store.champion()
        if (
            self.serve.backend != "llamacpp"
            or champion is None
            or not champion.gguf
            or not Path(champion.gguf).is_file()
        ):
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
        champion = self.loop.store.champion()
        named = {
            int(t[1:])
            for route in self.serve.routes.values()
            for t in [route.primary, *route.fallbacks]
            if t.startswith("v") and t[1:].isdigit()
        }
        return named | ({champion.id} if champion else set())

    def _version(self, target: str) -> Version:
        if target == "champion":
            version = self.loop.store.champion()
            if version is None:
                raise BackendError("no champion version in the registry; promote one (`tuneship loop versions`)")
            return version
        if target.startswith("v") and target[1:].isdigit():
            version = self.loop.store.version(int(target[1:]))
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
