"""Moving the champion alias: promote, rollback, publishing a version to Ollama (`name:v<N>` and `name:latest`),
and the smoke test of a promotion on the live path.

Atomic: a promotion or a rollback is one transaction of the store (`Store.promote`, `Store.restore_previous`),
ordered after any other, so there is never a moment without a champion and never two (a partial unique index
says so too); a cycle's promotion re-checks there that its parent is still the champion (else StaleChampion: a
manual promote or rollback made meanwhile is not undone). A rollback restores only a version that can serve.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Collection
from pathlib import Path

from tuneship.config import Config
from tuneship.deploy.contract import check_contract, require_contract
from tuneship.deploy.modelfile import ModelfileError, ModelSpec, render_modelfile
from tuneship.deploy.ollama import OllamaClient
from tuneship.deploy.stage import build_spec, create_in_ollama, embedded_template_gguf
from tuneship.deploy.ollama_template import OllamaTemplate
from tuneship.errors import TuneshipError
from tuneship.evaluate.backends import gguf_answers
from tuneship.evaluate.prompts import EvalPrompt
from tuneship.loop.examples import examples_by_id, golden, prompts_from
from tuneship.loop.registry import (
    Loop,
    RegistryError,
    has_served_files,
    is_published,
    require_servable,
    version_chat_format,
)
from tuneship.loop.shots import prompts_with_shots
from tuneship.loop.tables import Version
from tuneship.models import trained_chat_format
from tuneship.run import Run


def promote(
    loop: Loop, version_id: int, actor: str, reason: str, parent: int | None = None, used: Collection[str] = ()
) -> Version:
    """Move the champion alias to `version_id` in one transaction; the previous champion is retired (and can be
    restored). With `parent` (a cycle's), StaleChampion when the champion is no longer that version; `used`: the
    examples the version trained on, marked used in the same transaction."""
    return loop.store.promote(version_id, actor, reason, check=promotable, parent=parent, used=used)


def promotable(version: Version) -> None:
    """A version that can be made the champion: trained, with its GGUF in place (RegistryError if not)."""
    if version.status in ("training", "failed"):
        raise RegistryError(f"v{version.id} is {version.status}: only a trained version can be promoted")
    if not (has_served_files(version) or is_published(version)):
        raise RegistryError(f"v{version.id} has no GGUF file; it cannot serve (see `tuneship loop versions`)")


def restorable(version: Version) -> None:
    """A version a rollback may restore: published to loop.artifacts_url, or its files in place here."""
    if not is_published(version):
        require_servable(version)


def previous_champion(loop: Loop) -> Version | None:
    """The version that was champion before the current one (the latest promoted of the retired)."""
    return loop.store.previous_champion()


def rollback(loop: Loop, actor: str, reason: str, champion: int | None = None) -> Version:
    """Restore the previous champion in one transaction, when it can serve (its GGUF and adapter in place); the
    current one is marked rejected so it is not restored again. With `champion`, only when that version is still
    the champion (else StaleChampion)."""
    restored = loop.store.restore_previous(actor, reason, check=restorable, champion=champion)
    if restored is None:
        raise RegistryError("nothing to roll back to: no earlier champion in the registry")
    return restored


def ollama_names(loop: Loop, version_id: int) -> tuple[str, str]:
    name = loop.cfg.deploy.name or loop.name
    return f"{name}:v{version_id}", f"{name}:latest"


def promote_version(
    loop: Loop, version_id: int, actor: str, reason: str, parent: int | None = None, used: Collection[str] = ()
) -> Version:
    """Move the champion alias (see `promote`); with the Ollama backend also create `name:v<N>` first and point
    `name:latest` at it once the registry moved."""
    is_ollama = loop.cfg.serve.backend == "ollama"
    if is_ollama:
        _publish(loop, version_id, both=False, latest=False)
    promoted = promote(loop, version_id, actor, reason, parent, used)
    if is_ollama:
        _publish(loop, version_id, both=False)
    return promoted


def restore_previous(loop: Loop, actor: str, reason: str, champion: int | None = None) -> Version:
    """Roll back to the previous champion (and `name:latest` with it in Ollama); see `rollback`."""
    restored = rollback(loop, actor, reason, champion)
    if loop.cfg.serve.backend == "ollama":
        _publish(loop, restored.id, both=False)
    return restored


def _publish(loop: Loop, version_id: int, both: bool, latest: bool = True) -> None:
    """Create the version in Ollama as `name:v<N>` and `name:latest` (both), else as one of them (latest)."""
    version = loop.store.version(version_id)
    if version is None:
        raise RegistryError(f"no version {version_id}; see `tuneship loop versions`")
    tagged, latest_name = ollama_names(loop, version_id)
    names = [tagged, latest_name] if both else [latest_name if latest else tagged]
    version_cfg = publish_config(loop, version)
    lines = publish_to_ollama(version_cfg, version, names)
    loop.store.add_event("published", "tuneship", "; ".join(lines), {"names": names}, version_id)


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
            answer = _ask_live(live_url, loop, version, messages) if live_url else _ask_directly(loop, version, prompt)
        except (TuneshipError, OSError, KeyError) as exc:
            problems.append(f"{prompt.question!r}: {exc}")
            continue
        if answer["version"] != version_id:
            problems.append(f"{prompt.question!r}: answered by v{answer['version']}, not v{version_id}")
        elif answer["finish_reason"] != "stop" or not answer["text"].strip():
            problems.append(f"{prompt.question!r}: finish {answer['finish_reason']!r}, answer {answer['text']!r}")
    return problems


def _ask_live(live_url: str, loop: Loop, version: Version, messages: list[dict]) -> dict:
    """Asks the running server for the promoted version by its own name (`<name>-v<N>`): the loop's name may be
    routed elsewhere (serve.routes)."""
    body = json.dumps({"model": version.name, "messages": messages, "max_tokens": loop.cfg.eval.max_new_tokens})
    headers = {"Content-Type": "application/json"}
    if loop.cfg.serve.admin_key():  # the server asks for a key when one is set (from the environment, not argv)
        headers["Authorization"] = f"Bearer {loop.cfg.serve.admin_key()}"
    request = urllib.request.Request(live_url.rstrip("/") + "/v1/chat/completions", body.encode(), headers)
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
    lora = Path(version.adapter) if version.adapter else None
    prompts = prompts_with_shots([prompt], version.shots)
    [answer], _ = gguf_answers(Path(version.gguf), chat_format, prompts, loop.cfg.eval.max_new_tokens, lora)
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


def version_spec(version_cfg: Config, version: Version) -> tuple[ModelSpec, OllamaTemplate, Run]:
    """A version's Modelfile fields as it serves: its GGUF, and in adapter format the base's quantized GGUF
    (FROM) with its LoRA GGUF (ADAPTER)."""
    run = Run.of(version_cfg, Path(version.run_dir))
    files = {"gguf": Path(version.gguf), "adapter": Path(version.adapter)} if version.adapter else {}
    spec, template = build_spec(version_cfg, run, trained_chat_format(run), **files)
    return spec, template, run


def publish_to_ollama(version_cfg: Config, version: Version, names: list[str]) -> list[str]:
    """Create the version in Ollama under each name (`name:v<N>`, `name:latest`) with its Modelfile fields, after
    the template contract check, as `tuneship deploy` does."""
    spec, template, run = version_spec(version_cfg, version)
    require_contract(check_contract(trained_chat_format(run), run.adapter_dir, template, embedded_template_gguf(spec)))
    client = OllamaClient(version_cfg.deploy.host)
    return [create_in_ollama(client, name, spec) for name in names]


def fewshot_modelfile(loop: Loop, version: Version) -> str:
    """<run.dir>/<name>-loop/v<N>/Modelfile (`ollama create name:v<N> -f` it by hand), or why there is none."""
    spec, _, _ = version_spec(publish_config(loop, version), version)
    folder = loop.cycle_dir(version.id)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        text = render_modelfile(spec, folder)
    except ModelfileError as exc:
        return f"no Modelfile ({exc}); publishing through the REST API carries the shots"
    (folder / "Modelfile").write_text(text, encoding="utf-8")
    return str(folder / "Modelfile")
