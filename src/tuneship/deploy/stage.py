"""The deploy stage: Modelfile on disk, then the target (Ollama, LM Studio, llama.cpp or none)."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from tuneship.deploy.modelfile import ModelfileError, ModelSpec, render_modelfile
from tuneship.deploy.ollama import OllamaClient, OllamaError, file_digest
from tuneship.deploy.ollama_template import OllamaTemplate, to_ollama
from tuneship.errors import TuneshipError
from tuneship.export.stage import gguf_name

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "generation_config.json",
    "config.json",
    "chat_format.json",
)


@dataclass
class DeployResult:
    target: str
    name: str
    modelfile: Path | None
    lines: list[str] = field(default_factory=list)
    smoke: dict | None = None


def deployed_gguf(cfg, run_path: Path) -> Path:
    quant = cfg.deploy.quant or cfg.export.quants[0]
    path = run_path / "gguf" / gguf_name(cfg.run.name, quant)
    if not path.is_file():
        raise TuneshipError(f"{path} does not exist; run `tuneship export {run_path}` first (deploy.quant={quant})")
    return path


def build_spec(cfg, run_path: Path, chat_format) -> tuple[ModelSpec, OllamaTemplate]:
    template = to_ollama(chat_format)
    tokenizer = chat_format.tokenizer
    stop = [chat_format.spec.stop_token] + [
        tokenizer.convert_ids_to_tokens(i) for i in chat_format.spec.stop_token_ids[1:]
    ]
    parameters = {"num_ctx": cfg.deploy.num_ctx or cfg.train.max_seq_len, **cfg.deploy.parameters}
    spec = ModelSpec(
        deployed_gguf(cfg, run_path),
        template.template,
        template.system,
        stop,
        parameters,
        list(cfg.deploy.messages),
        _license(run_path),
    )
    return spec, template


def _license(run_path: Path) -> str | None:
    from tuneship.export.gguf import read_gguf_field

    for name in ("LICENSE", "LICENSE.txt", "LICENSE.md"):
        if (run_path / "merged" / name).is_file():
            return (run_path / "merged" / name).read_text(encoding="utf-8", errors="replace").strip()
    f16 = next((run_path / "gguf").glob("*-f16.gguf"), None)
    return read_gguf_field(f16, "general.license") if f16 else None


def require_contract(chat_format, run_path: Path, template: OllamaTemplate, gguf: Path) -> None:
    """Nothing is deployed with a template that was not proven equal to the trained one."""
    from tuneship.deploy.contract import ContractBroken, check_contract

    result = check_contract(chat_format, run_path / "adapter", template, gguf)
    if not result.is_equal:
        raise ContractBroken(
            "refusing to deploy: the template renders differently than in training:\n" + "\n".join(result.differences)
        )


def write_modelfile(spec: ModelSpec, run_path: Path) -> tuple[Path | None, str | None]:
    """<run>/Modelfile, or (None, why) when a value cannot be expressed in Modelfile syntax."""
    try:
        text = render_modelfile(spec, run_path)
    except ModelfileError as exc:
        return None, str(exc)
    path = run_path / "Modelfile"
    path.write_text(text, encoding="utf-8")
    return path, None


def run_deploy(cfg, run_path: Path, console, target: str | None = None) -> DeployResult:
    from tuneship.chat.format import ChatFormat

    chat_format = ChatFormat.load(run_path / "adapter")
    spec, template = build_spec(cfg, run_path, chat_format)
    require_contract(chat_format, run_path, template, spec.gguf)
    target = target or cfg.deploy.target
    name = cfg.deploy.name or cfg.run.name
    modelfile, why_not = write_modelfile(spec, run_path)
    result = DeployResult(target, name, modelfile)
    result.lines.append(
        f"Modelfile: {modelfile}  (ollama create {name} -f {modelfile})" if modelfile else f"no Modelfile: {why_not}"
    )
    if target == "ollama":
        deploy_ollama(cfg, run_path, chat_format, spec, name, result, console)
    elif target == "lmstudio":
        result.lines.append(f"LM Studio: {place_for_lmstudio(spec.gguf, run_path, cfg)}")
    elif target == "llamacpp":
        result.lines += llamacpp_commands(spec.gguf, spec.all_parameters()["num_ctx"])
    return result


def place_for_lmstudio(gguf: Path, run_path: Path, cfg) -> Path:
    """<models>/<publisher>/<model>/: the GGUF (with its embedded template) and the tokenizer files."""
    root = cfg.deploy.lmstudio_dir or Path.home() / ".lmstudio" / "models"
    folder = Path(root).expanduser() / "tuneship" / (cfg.deploy.name or cfg.run.name)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy2(gguf, folder / gguf.name)
    for name in TOKENIZER_FILES:
        if (run_path / "merged" / name).is_file():
            shutil.copy2(run_path / "merged" / name, folder / name)
    return folder


def llamacpp_commands(gguf: Path, num_ctx: int) -> list[str]:
    return [
        "serve it with llama.cpp (the GGUF carries the chat template; --jinja makes llama-server use it):",
        f"  llama-server -m {gguf} -c {num_ctx} --jinja",
        "or with llama-cpp-python's server:",
        f"  python -m llama_cpp.server --model {gguf} --n_ctx {num_ctx}",
    ]


def create_in_ollama(client: OllamaClient, name: str, spec: ModelSpec) -> str:
    """Upload the GGUF blob unless the server has it, then /api/create with the spec's JSON fields."""
    digest = file_digest(spec.gguf)
    uploaded = client.push_blob(spec.gguf, digest)
    payload = {
        "model": name,
        "files": {spec.gguf.name: digest},
        "template": spec.template,
        "parameters": spec.all_parameters(),
    }
    optional = {"system": spec.system, "messages": spec.messages, "license": spec.license}
    payload.update({key: value for key, value in optional.items() if value})
    client.create(payload)
    return f"blob {digest[:19]}... {'uploaded' if uploaded else 'already on the server'}; created {name}"


def deploy_ollama(cfg, run_path: Path, chat_format, spec: ModelSpec, name: str, result: DeployResult, console) -> None:
    client = OllamaClient(cfg.deploy.host)
    result.lines.append(f"Ollama {client.version()} at {client.host}")
    result.lines.append(create_in_ollama(client, name, spec))
    try:
        verify_show(client.show(name), name, spec, chat_format)
        result.smoke = smoke_test(client, name, cfg, run_path, chat_format)
    finally:
        client.unload(name)
    result.lines.append(
        f"smoke test: {result.smoke['passed']}/{result.smoke['prompts']} answers stopped and "
        "matched the GGUF in llama.cpp; unloaded"
    )


def verify_show(shown: dict, name: str, spec: ModelSpec, chat_format) -> None:
    stored = shown.get("template")
    if stored != spec.template:
        raise OllamaError(
            f"{name}: Ollama stored another template than the one sent:\n  stored: {stored!r}\n"
            f"  sent:   {spec.template!r}"
        )
    eos = (shown.get("model_info") or {}).get("tokenizer.ggml.eos_token_id")
    if eos != chat_format.spec.stop_token_ids[0]:
        raise OllamaError(
            f"{name}: Ollama reports eos id {eos}, the run stops on {chat_format.spec.stop_token!r} "
            f"(id {chat_format.spec.stop_token_ids[0]})"
        )


def smoke_test(client: OllamaClient, name: str, cfg, run_path: Path, chat_format) -> dict:
    """Greedy /api/chat on eval prompts: each must stop (done_reason "stop"), leak nothing, and equal
    what the same GGUF answered in llama.cpp at export."""
    from tuneship.evaluate.checks import leaked
    from tuneship.evaluate.prompts import build_prompt_set

    prompts = build_prompt_set(run_path, cfg.eval)[: cfg.deploy.smoke_prompts]
    reference = _gguf_answers(run_path, cfg)
    markers = chat_format.special_tokens()
    failures = []
    options = {"temperature": 0, "seed": 0, "num_predict": cfg.eval.max_new_tokens}
    for index, prompt in enumerate(prompts):
        reply = client.chat(name, prompt.conversation.prompt_messages(), options)
        text = (reply.get("message") or {}).get("content", "").strip()
        problems = []
        if reply.get("done_reason") != "stop":
            problems.append(f"done_reason {reply.get('done_reason')!r} (the answer did not stop)")
        if leaked(text, markers):
            problems.append(f"leaked {leaked(text, markers)}")
        if reference and index < len(reference) and text != reference[index]:
            problems.append(f"answered {text!r}, the GGUF in llama.cpp answered {reference[index]!r}")
        if problems:
            failures.append(f"{prompt.question!r}: " + "; ".join(problems))
    if failures:
        raise OllamaError(
            f"smoke test of {name} failed on {len(failures)} of {len(prompts)} prompts:\n  " + "\n  ".join(failures)
        )
    return {"prompts": len(prompts), "passed": len(prompts)}


def _gguf_answers(run_path: Path, cfg) -> list[str]:
    report = run_path / "reports" / "eval.json"
    if not report.is_file():
        return []
    column = json.loads(report.read_text(encoding="utf-8"))["models"].get(
        f"gguf-{cfg.deploy.quant or cfg.export.quants[0]}"
    )
    return [a["answer"] for a in column["answers"]] if column else []
