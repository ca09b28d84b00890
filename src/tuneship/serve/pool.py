"""The versions the server answers with in llama.cpp, in-process.

- SharedGGUF: one GGUF loaded in llama.cpp (one context), shared by every version served from that file. A
  version in adapter format (loop.version_format) is a LoRA GGUF applied on its base's quantized GGUF: all such
  versions share one loaded base, and answering with another version only switches the context's adapter
  (llama.cpp's `llama_set_adapters_lora`, a few MB per adapter, loaded once), never reloads the base.
- LlamaCppModel: a version on its SharedGGUF: its own ChatFormat (a few-shot version's shots before the
  conversation), its adapter, its stop tokens. One generation at a time per loaded GGUF (a llama.cpp context is
  not thread-safe); between tokens it asks whether to stop (the client is gone, serve.timeout has passed).
- ModelPool: the loaded versions. The champion and the versions routes name stay loaded, and of the others the
  `serve.max_loaded_models` most recently used (an LRU); a version loads outside the pool's lock, so loading one
  never holds up another. When the champion moves, the old version is closed only once its in-flight requests
  are done (or kept, while among the recently used), so a promotion never drops a request. `loads` counts the
  GGUF files loaded: a promotion in adapter format adds none.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tuneship.data.conversation import Conversation, Message, SourceRef
from tuneship.errors import TuneshipError
from tuneship.loop.shots import with_shots
from tuneship.serve.generation import ShouldStop

if TYPE_CHECKING:
    from tuneship.loop.tables import Version


class BackendError(TuneshipError):
    """No backend could answer."""


@dataclass
class Reply:
    text: str
    finish_reason: str
    prompt_tokens: int | None
    completion_tokens: int | None
    answered_by: str = ""
    version_id: int | None = None
    tried: list[str] = field(default_factory=list)


def never() -> bool:
    return False


def to_conversation(messages: list[dict]) -> Conversation:
    """OpenAI-style messages -> the canonical Conversation (a leading system message becomes its system)."""
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
    turns = [Message(m["role"], m["content"]) for m in messages[1 if system is not None else 0 :]]
    return Conversation(turns, SourceRef("request", 0), system)


class SharedGGUF:
    """A GGUF in llama.cpp and the LoRA adapters loaded for it; `lock` is held for a whole generation."""

    def __init__(self, gguf: Path, n_ctx: int):
        from tuneship.evaluate.backends import LlamaCppRunner

        self.gguf = gguf
        self.runner = LlamaCppRunner(gguf, n_ctx)
        self.lock = threading.Lock()
        self.adapters: dict[Path, object] = {}
        self.applied: Path | None = None
        self.users = 0  # versions holding it (under the pool's lock)

    @property
    def llm(self):
        return self.runner.llm

    def load_adapter(self, lora: Path) -> None:
        """Load a LoRA GGUF for this model (once; a few MB), without applying it."""
        from tuneship.evaluate.llama_parallel import load_lora

        with self.lock:
            if lora not in self.adapters:
                try:
                    self.adapters[lora] = load_lora(self.llm.model, lora)
                except RuntimeError as exc:
                    raise BackendError(str(exc)) from None

    def apply(self, lora: Path | None) -> None:
        """The context answers with `lora` (None: the file alone) from now on; under `lock`. Switching clears the
        cached prompt, whose keys and values the previous adapter computed."""
        from tuneship.evaluate.llama_parallel import set_lora

        if lora == self.applied:
            return
        try:
            set_lora(self.llm._ctx.ctx, self.adapters[lora] if lora is not None else None)
        except RuntimeError as exc:
            raise BackendError(str(exc)) from None
        self.llm.reset()
        self.applied = lora

    def drop_adapter(self, lora: Path) -> None:
        import llama_cpp

        with self.lock:
            if self.applied == lora:
                self.apply(None)
            adapter = self.adapters.pop(lora, None)
            if adapter is not None:
                llama_cpp.llama_adapter_lora_free(adapter)

    def close(self) -> None:
        self.runner.close()


class LlamaCppModel:
    """A version answering on a SharedGGUF (with its LoRA adapter, in adapter format)."""

    def __init__(
        self,
        base: SharedGGUF,
        chat_format_dir: Path,
        label: str,
        version_id: int | None = None,
        shots: list[dict] | None = None,
        adapter: Path | None = None,
    ):
        from tuneship.chat.format import ChatFormat

        self.base = base
        self.chat_format = ChatFormat.load(chat_format_dir)
        self.label = label
        self.version_id = version_id
        self.shots = list(shots or [])
        self.adapter = adapter

    def stream(
        self, messages: list[dict], max_tokens: int, temperature: float, reply: Reply, stop: ShouldStop = never
    ) -> Iterator[str]:
        """Yield text pieces; fills `reply` (finish reason, token counts) when done. `stop()` is asked between
        tokens: when it says so, the answer ends there (finish reason "length")."""
        llm = self.base.llm
        prompt = self.chat_format.generation_prompt(with_shots(to_conversation(messages), self.shots))
        stop_ids = set(self.chat_format.spec.stop_token_ids) | {llm.token_eos()}
        sampling = {"top_k": 1, "temp": 0.0} if temperature <= 0 else {"top_k": 40, "temp": temperature}
        with self.base.lock:
            if stop():
                return
            self.base.apply(self.adapter)
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


def require_files(version: Version) -> tuple[Path, Path | None]:
    """(the GGUF llama.cpp loads, the LoRA GGUF applied on it or None); BackendError when a file is missing."""
    from tuneship.loop.registry import has_served_files

    if not has_served_files(version):
        raise BackendError(
            f"v{version.id} ({version.name}) has no GGUF at {version.gguf}"
            + (f" or no LoRA GGUF at {version.adapter}" if version.adapter else "")
            + f"; run `tuneship export {version.run_dir}` first"
        )
    return Path(version.gguf), Path(version.adapter) if version.adapter else None


class ModelPool:
    """Versions loaded by id, reference-counted by in-flight requests, on SharedGGUFs by file. The wanted versions
    stay loaded, and of the others the `keep_recent` most recently used; the rest are closed as soon as no request
    uses them (a SharedGGUF once no version uses it)."""

    def __init__(self, n_ctx: int, keep_recent: int = 0):
        self.n_ctx = n_ctx
        self.keep_recent = keep_recent
        self.models: dict[int, LlamaCppModel] = {}
        self.bases: dict[Path, SharedGGUF] = {}
        self.loads = 0  # GGUF files loaded so far
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
            model = self._load(version)
            with self.lock:
                self.models[version.id] = model
                return self._take(version.id)

    def _load(self, version: Version) -> LlamaCppModel:
        gguf, adapter = require_files(version)
        base = self._base(gguf)
        try:
            if adapter is not None:
                base.load_adapter(adapter)
            return LlamaCppModel(
                base, Path(version.run_dir) / "adapter", version.name, version.id, version.shots, adapter
            )
        except Exception:
            self._release_base(base)
            raise

    def _base(self, gguf: Path) -> SharedGGUF:
        """The loaded SharedGGUF of `gguf`, loading it when no version uses it yet; one more user."""
        with self.lock:
            base = self.bases.get(gguf)
            if base is not None:
                base.users += 1
                return base
        loaded = SharedGGUF(gguf, self.n_ctx)  # outside the lock; a racing load of the same file is dropped
        with self.lock:
            base = self.bases.setdefault(gguf, loaded)
            base.users += 1
            if base is loaded:
                self.loads += 1
        if base is not loaded:
            loaded.close()
        return base

    def _release_base(self, base: SharedGGUF) -> None:
        with self.lock:
            base.users -= 1
            unused = base.users == 0 and self.bases.get(base.gguf) is base
            if unused:
                del self.bases[base.gguf]
        if unused:
            base.close()

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
            if model.adapter is not None and not self._adapter_shared(model):
                model.base.drop_adapter(model.adapter)
            self._release_base(model.base)

    def _adapter_shared(self, model: LlamaCppModel) -> bool:
        """Another loaded version applies the same LoRA GGUF on the same base (a few-shot version on a champion)."""
        with self.lock:
            return any(m.base is model.base and m.adapter == model.adapter for m in self.models.values())

    def close(self) -> None:
        self.keep_recent = 0
        self.keep_only(set())
