"""`tuneship hub pull`: download, verify, validate, and optionally deploy a hub GGUF."""

from __future__ import annotations

from pathlib import Path

from tuneship.hub.client import HubError, pull
from tuneship.hub.gguf_files import SPLIT


def pull_and_validate(repo_id: str, dest: Path, quant: str | None, deploy: bool, name: str | None) -> list[str]:
    from tuneship.export.gguf import ExportError, read_gguf

    files = pull(repo_id, dest, quant)
    lines = [f"downloaded {p} ({p.stat().st_size / 1e6:.1f} MB, sha256 verified)" for p in files]
    first = files[0]
    if SPLIT.match(first.name):
        lines.append(f"split GGUF in {len(files)} parts: llama.cpp and Ollama load it from {first.name}")
        return lines
    try:
        info = read_gguf(first, "pulled")
    except ExportError as exc:
        raise HubError(str(exc)) from None
    if not info.architecture or not info.tensor_count:
        raise HubError(f"{first}: the GGUF has no architecture or no tensors")
    lines.append(
        f"validated: {info.architecture}, {info.tensor_count} tensors, eos id {info.eos_token_id}, "
        f"{'a' if info.chat_template else 'NO'} chat template"
    )
    if deploy:
        lines += deploy_pulled(first, info, name or first.stem)
    return lines


def deploy_pulled(gguf: Path, info, name: str) -> list[str]:
    """A Modelfile from the GGUF's own template and tokenizer, then ollama create through the REST API."""
    from transformers import AutoTokenizer

    from tuneship.chat.format import ChatFormat
    from tuneship.deploy.modelfile import ModelSpec, render_modelfile
    from tuneship.deploy.ollama import OllamaClient
    from tuneship.deploy.ollama_template import to_ollama
    from tuneship.deploy.stage import create_in_ollama

    if not info.chat_template:
        raise HubError(f"{gguf.name} carries no chat template; Ollama would need one: pick another repo")
    chat_format = ChatFormat.from_tokenizer(AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name))
    template = to_ollama(chat_format)
    spec = ModelSpec(gguf, template.template, template.system, [chat_format.spec.stop_token], {"num_ctx": 4096})
    modelfile = gguf.parent / "Modelfile"
    modelfile.write_text(render_modelfile(spec, gguf.parent), encoding="utf-8")
    client = OllamaClient()
    return [f"wrote {modelfile}", f"Ollama at {client.host}: {create_in_ollama(client, name, spec)}"]
