"""Moving the champion alias: promote, rollback, publishing a version to Ollama (`name:v<N>` and `name:latest`),
and the smoke test of a promotion on the live path.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

from tuneship.config import Config
from tuneship.deploy.contract import check_contract, require_contract
from tuneship.deploy.modelfile import ModelfileError, render_modelfile
from tuneship.deploy.ollama import OllamaClient
from tuneship.deploy.stage import build_spec, create_in_ollama
from tuneship.errors import TuneshipError
from tuneship.evaluate.backends import gguf_answers
from tuneship.evaluate.prompts import EvalPrompt
from tuneship.loop.examples import examples_by_id, golden, prompts_from
from tuneship.loop.registry import Loop, RegistryError, version_chat_format
from tuneship.loop.shots import prompts_with_shots
from tuneship.loop.tables import Version, utcnow
from tuneship.models import trained_chat_format
from tuneship.run import Run


def promote(loop: Loop, version_id: int, actor: str, reason: str) -> Version:
    """Move the champion alias to `version_id`; the previous champion is retired (and can be restored)."""
    version = loop.store.version(version_id)
    if version is None:
        raise RegistryError(f"no version {version_id}; see `tuneship loop versions`")
    if version.status in ("training", "failed"):
        raise RegistryError(f"v{version_id} is {version.status}: only a trained version can be promoted")
    if not version.gguf or not Path(version.gguf).is_file():
        raise RegistryError(f"v{version_id} has no GGUF ({version.gguf}); it cannot serve")
    previous = loop.store.champion()
    if previous is not None and previous.id == version_id:
        return version
    if previous is not None:
        loop.store.update_version(previous.id, status="retired")
    promoted = loop.store.update_version(version_id, status="champion", promoted_at=utcnow())
    loop.store.add_event(
        "promoted",
        actor,
        reason,
        {"from": previous.id if previous else None, "to": version_id},
        version_id=version_id,
    )
    return promoted


def previous_champion(loop: Loop) -> Version | None:
    """The version that was champion before the current one (the latest promoted of the retired)."""
    retired = [v for v in loop.store.versions() if v.status == "retired" and v.promoted_at is not None]
    return max(retired, key=lambda v: v.promoted_at, default=None)


def rollback(loop: Loop, actor: str, reason: str) -> Version:
    """Restore the previous champion; the current one is marked rejected so it is not restored again."""
    current = loop.store.champion()
    previous = previous_champion(loop)
    if current is None or previous is None:
        raise RegistryError("nothing to roll back to: no earlier champion in the registry")
    loop.store.update_version(current.id, status="rejected")
    restored = loop.store.update_version(previous.id, status="champion", promoted_at=utcnow())
    loop.store.add_event("rolled_back", actor, reason, {"from": current.id, "to": previous.id}, version_id=previous.id)
    return restored


def ollama_names(loop: Loop, version_id: int) -> tuple[str, str]:
    name = loop.cfg.deploy.name or loop.name
    return f"{name}:v{version_id}", f"{name}:latest"


def promote_version(loop: Loop, version_id: int, actor: str, reason: str) -> Version:
    """Move the champion alias; with the Ollama backend also create `name:v<N>` and point `name:latest` at it."""
    if loop.cfg.serve.backend == "ollama":
        _publish(loop, version_id, both=True)
    return promote(loop, version_id, actor, reason)


def restore_previous(loop: Loop, actor: str, reason: str) -> Version:
    """Roll back to the previous champion (and `name:latest` with it in Ollama)."""
    restored = rollback(loop, actor, reason)
    if loop.cfg.serve.backend == "ollama":
        _publish(loop, restored.id, both=False)
    return restored


def _publish(loop: Loop, version_id: int, both: bool) -> None:
    version = loop.store.version(version_id)
    if version is None:
        raise RegistryError(f"no version {version_id}; see `tuneship loop versions`")
    tagged, latest = ollama_names(loop, version_id)
    version_cfg = publish_config(loop, version)
    lines = publish_to_ollama(version_cfg, Path(version.run_dir), [tagged, latest] if both else [latest])
    loop.store.add_event("published", "tuneship", "; ".join(lines), {"names": [tagged, latest]}, version_id)


def smoke_problems(loop: Loop, version_id: int, live_url: str | None) -> list[str]:
    """Golden (else new) prompts through the live path: the running server when `live_url` is given (the answer
    must come from the new version), else what serves without it (Ollama's `name:latest`, or the champion's GGUF
    in llama.cpp). Returns the problems (empty: passed)."""
    version = loop.store.version(version_id)
    examples = golden(loop.store) or examples_by_id(loop.store, version.metrics.get("new_examples", []))
    problems = []
    for prompt in prompts_from(examples[: loop.cfg.loop.smoke_prompts]):
        messages = prompt.conversation.prompt_messages()
        try:
            answer = _ask_live(live_url, loop, messages) if live_url else _ask_directly(loop, version, prompt)
        except (TuneshipError, OSError, KeyError) as exc:
            problems.append(f"{prompt.question!r}: {exc}")
            continue
        if answer["version"] != version_id:
            problems.append(f"{prompt.question!r}: answered by v{answer['version']}, not v{version_id}")
        elif answer["finish_reason"] != "stop" or not answer["text"].strip():
            problems.append(f"{prompt.question!r}: finish {answer['finish_reason']!r}, answer {answer['text']!r}")
    return problems


def _ask_live(live_url: str, loop: Loop, messages: list[dict]) -> dict:
    body = json.dumps({"model": loop.name, "messages": messages, "max_tokens": loop.cfg.eval.max_new_tokens})
    request = urllib.request.Request(
        live_url.rstrip("/") + "/v1/chat/completions", body.encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=loop.cfg.serve.timeout) as response:
        reply = json.loads(response.read())
    choice = reply["choices"][0]
    return {
        "version": reply["tuneship"]["version"],
        "finish_reason": choice["finish_reason"],
        "text": choice["message"]["content"],
    }


def _ask_directly(loop: Loop, version: Version, prompt: EvalPrompt) -> dict:
    if loop.cfg.serve.backend == "ollama":
        options = {"temperature": 0, "seed": 0, "num_predict": loop.cfg.eval.max_new_tokens}
        reply = OllamaClient(loop.cfg.deploy.host).chat(
            ollama_names(loop, version.id)[1], prompt.conversation.prompt_messages(), options
        )
        finish = "stop" if reply.get("done_reason") == "stop" else "length"
        return {"version": version.id, "finish_reason": finish, "text": (reply.get("message") or {}).get("content", "")}

    chat_format = version_chat_format(version)
    [answer], _ = gguf_answers(
        Path(version.gguf), chat_format, prompts_with_shots([prompt], version.shots), loop.cfg.eval.max_new_tokens
    )
    return {"version": version.id, "finish_reason": "stop" if answer.stopped else "length", "text": answer.text}


def publish_config(loop: Loop, version: Version) -> Config:
    """The config a version is published to Ollama with: its run's, at this loop's Ollama; for a few-shot version
    its shots as MESSAGE lines and num_ctx the context they were budgeted against."""
    cfg = loop.version_config(version)
    cfg.deploy.host = loop.cfg.deploy.host  # where this loop's Ollama is, whatever the run used
    if version.kind == "fewshot":
        cfg.deploy.messages = [*cfg.deploy.messages, *version.shots]
        cfg.deploy.num_ctx = version.metrics["fewshot"]["context"]
    return cfg


def publish_to_ollama(version_cfg: Config, run_dir: Path, names: list[str]) -> list[str]:
    """Create the version's GGUF in Ollama under each name (`name:v<N>`, `name:latest`) with its Modelfile
    fields, after the template contract check, as `tuneship deploy` does."""
    run = Run.of(version_cfg, Path(run_dir))
    chat_format = trained_chat_format(run)
    spec, template = build_spec(version_cfg, run, chat_format)
    require_contract(check_contract(chat_format, run.adapter_dir, template, spec.gguf))
    client = OllamaClient(version_cfg.deploy.host)
    return [create_in_ollama(client, name, spec) for name in names]


def fewshot_modelfile(loop: Loop, version: Version) -> str:
    """<run.dir>/<name>-loop/v<N>/Modelfile (`ollama create name:v<N> -f` it by hand), or why there is none."""
    cfg = publish_config(loop, version)
    run = Run.of(cfg, Path(version.run_dir))
    spec, _ = build_spec(cfg, run, trained_chat_format(run))
    folder = loop.cycle_dir(version.id)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        text = render_modelfile(spec, folder)
    except ModelfileError as exc:
        return f"no Modelfile ({exc}); publishing through the REST API carries the shots"
    (folder / "Modelfile").write_text(text, encoding="utf-8")
    return str(folder / "Modelfile")
