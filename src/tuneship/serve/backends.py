"""Model backends behind the chat API, and the router that picks one per request with fallback.

- LlamaCppModel: a version's GGUF in llama.cpp, in-process; the prompt is rendered with the version's own
  ChatFormat (a few-shot version's shots before the conversation) and generation stops on its stop tokens.
  One request at a time per model (llama.cpp contexts are not thread-safe).
- OllamaModel: an Ollama model over REST (/api/chat), through deploy/ollama.py's client.
- ModelPool: loaded GGUFs by version; when the champion moves, the old model is closed only once its
  in-flight requests are done, so a promotion never drops a request.
- Router: model name -> targets ("champion", "v<N>", "ollama:<model>"), primary then fallbacks; a target that
  raises or times out falls through, and the reply says which target answered.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tuneship.data.conversation import Conversation, Message, SourceRef
from tuneship.errors import TuneshipError
from tuneship.loop.shots import with_shots

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

    def stream(self, messages: list[dict], max_tokens: int, temperature: float, reply: Reply) -> Iterator[str]:
        """Yield text pieces; fills `reply` (finish reason, token counts) when done."""
        llm = self.runner.llm
        prompt = self.chat_format.generation_prompt(with_shots(to_conversation(messages), self.shots))
        stop_ids = set(self.chat_format.spec.stop_token_ids) | {llm.token_eos()}
        sampling = {"top_k": 1, "temp": 0.0} if temperature <= 0 else {"top_k": 40, "temp": temperature}
        with self.lock:
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
                if len(generated) >= max_tokens:
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

    def stream(self, messages: list[dict], max_tokens: int, temperature: float, reply: Reply) -> Iterator[str]:
        answer = self.client.chat(self.model, messages, {"temperature": temperature, "num_predict": max_tokens})
        reply.text = (answer.get("message") or {}).get("content", "")
        reply.finish_reason = "length" if answer.get("done_reason") == "length" else "stop"
        reply.prompt_tokens, reply.completion_tokens = answer.get("prompt_eval_count"), answer.get("eval_count")
        if reply.text:
            yield reply.text


class ModelPool:
    """GGUFs loaded by version id, reference-counted by in-flight requests."""

    def __init__(self, n_ctx: int):
        self.n_ctx = n_ctx
        self.models: dict[int, LlamaCppModel] = {}
        self.in_flight: dict[int, int] = {}
        self.wanted: set[int] = set()
        self.lock = threading.Lock()

    @contextmanager
    def use(self, version: Version) -> Iterator[LlamaCppModel]:
        with self.lock:
            model = self.models.get(version.id)
            if model is None:
                if not version.gguf or not Path(version.gguf).is_file():
                    raise BackendError(
                        f"v{version.id} ({version.name}) has no GGUF at {version.gguf}; run `tuneship export "
                        f"{version.run_dir}` first"
                    )
                model = LlamaCppModel(
                    Path(version.gguf),
                    Path(version.run_dir) / "adapter",
                    self.n_ctx,
                    version.name,
                    version.id,
                    version.shots,
                )
                self.models[version.id] = model
            self.in_flight[version.id] = self.in_flight.get(version.id, 0) + 1
        try:
            yield model
        finally:
            with self.lock:
                self.in_flight[version.id] -= 1
            self.release_unwanted()

    def keep_only(self, version_ids: set[int]) -> None:
        """Models outside `version_ids` are closed as soon as no request uses them."""
        with self.lock:
            self.wanted = set(version_ids)
        self.release_unwanted()

    def release_unwanted(self) -> None:
        with self.lock:
            idle = [v for v in self.models if v not in self.wanted and not self.in_flight.get(v)]
            closing = [self.models.pop(v) for v in idle]
        for model in closing:
            model.close()

    def close(self) -> None:
        self.keep_only(set())


class Router:
    """Resolves a request's model name to targets and answers with the first that works."""

    def __init__(self, loop: Loop, pool: ModelPool | None = None) -> None:
        self.loop = loop
        self.serve = loop.cfg.serve
        self.pool = pool or ModelPool(self.serve.n_ctx)
        self.executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="generate")

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

    @contextmanager
    def open_target(self, target: str):
        """A backend for one target, held for the duration of a request."""
        if target.startswith("ollama:"):
            yield OllamaModel(self.loop.cfg.deploy.host, target.removeprefix("ollama:"), self.serve.timeout)
            return
        version = self._version(target)
        if self.serve.backend == "ollama":
            name = self.loop.cfg.deploy.name or self.loop.name
            yield OllamaModel(self.loop.cfg.deploy.host, f"{name}:v{version.id}", self.serve.timeout, version.id)
            return
        self.pool.keep_only(self._wanted_versions())
        with self.pool.use(version) as model:
            yield model

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

    def _version(self, target: str):
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

    def complete(self, model: str, messages: list[dict], max_tokens: int, temperature: float) -> Reply:
        """Primary, then fallbacks; each gets serve.timeout seconds."""
        tried, errors = [], []
        for target in self.targets(model):
            tried.append(target)
            future = self.executor.submit(self._complete_on, target, messages, max_tokens, temperature)
            try:
                reply = future.result(timeout=self.serve.timeout)
            except FutureTimeout:
                errors.append(f"{target}: no answer within serve.timeout={self.serve.timeout:g} s")
                continue
            except Exception as exc:  # a backend that breaks is a backend that failed: the next target answers
                log.warning("target %s failed: %r", target, exc)
                errors.append(f"{target}: {exc}")
                continue
            reply.tried = tried
            return reply
        raise BackendError("no backend answered: " + "; ".join(errors))

    def _complete_on(self, target: str, messages: list[dict], max_tokens: int, temperature: float) -> Reply:
        reply = Reply("", "stop", None, None)
        with self.open_target(target) as backend:
            reply.answered_by, reply.version_id = backend.label, backend.version_id
            for _ in backend.stream(messages, max_tokens, temperature, reply):
                pass
        return reply

    def stream(self, model: str, messages: list[dict], max_tokens: int, temperature: float, reply: Reply):
        """Text pieces from the first target that yields; falls through only before the first piece."""
        errors = []
        for target in self.targets(model):
            reply.tried.append(target)
            started = False
            try:
                with self.open_target(target) as backend:
                    reply.answered_by, reply.version_id = backend.label, backend.version_id
                    for piece in backend.stream(messages, max_tokens, temperature, reply):
                        started = True
                        yield piece
                return
            except Exception as exc:  # as in complete(): fall through, but only before the first piece
                if started:
                    raise
                log.warning("target %s failed: %r", target, exc)
                errors.append(f"{target}: {exc}")
        raise BackendError("no backend answered: " + "; ".join(errors))

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.pool.close()


def elapsed_ms(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 1)
