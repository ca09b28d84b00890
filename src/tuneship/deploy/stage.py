"""The deploy stage: Modelfile on disk, then the target (Ollama, LM Studio, llama.cpp or none)."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from rich.markup import escape

from tuneship.deploy.contract import ContractResult, check_contract, require_contract
from tuneship.deploy.modelfile import ModelfileError, ModelSpec, render_modelfile, system_first
from tuneship.deploy.ollama import OllamaClient, OllamaError, OllamaUnreachable, file_digest
from tuneship.deploy.ollama_template import OllamaTemplate, to_ollama
from tuneship.errors import ConfigError, TuneshipError
from tuneship.export.stage import export_inputs
from tuneship.run import Run, fingerprint

if TYPE_CHECKING:
    from rich.console import Console

    from tuneship.chat.format import ChatFormat
    from tuneship.config import Config

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "generation_config.json",
    "config.json",
    "chat_format.json",
)


NUM_CTX_STEP = 256


@dataclass
class DeployResult:
    target: str
    name: str
    modelfile: Path | None
    lines: list[str] = field(default_factory=list)
    smoke: dict | None = None

    @property
    def detail(self) -> str:
        return "; ".join(self.lines)


def template_inputs(cfg: Config, run: Run) -> str:
    """The exported artifacts (their export inputs) and which GGUF is deployed, i.e. checked."""
    return fingerprint(export_inputs(cfg, run), run.deployed_quant)


def deploy_inputs(cfg: Config, run: Run) -> str:
    return fingerprint(export_inputs(cfg, run), cfg.deploy.model_dump(mode="json"))


def contract_gguf(run: Run) -> Path | None:
    """The GGUF whose embedded template the contract checks: the deployed one, else any model GGUF of the run
    (never the LoRA GGUF of `export.merge: false`, which has no chat template); None before export."""
    if run.deployed_gguf.is_file():
        return run.deployed_gguf
    return next(iter(run.model_ggufs()), None)


def run_template_check(cfg: Config, run: Run, console: Console) -> ContractResult:
    """The template contract: training, HF, the GGUF's template and the Ollama TEMPLATE (Go) render every probe
    the same; ContractBroken (exit 5) with the diffs when not."""
    from tuneship.models import trained_chat_format
    from tuneship.report import print_contract

    with run.recording("template", template_inputs(cfg, run)) as outputs:
        chat_format = trained_chat_format(run)
        result = check_contract(chat_format, run.adapter_dir, to_ollama(chat_format), contract_gguf(run))
        outputs.update(renderers=result.renderers, gguf=str(result.gguf) if result.gguf else None)
        print_contract(console, result)
        require_contract(result)
    return result


def lora_files(cfg: Config, run: Run) -> dict[str, Path]:
    """export.merge false: {"gguf": the base's quantized GGUF, "adapter": the run's LoRA GGUF}, what is deployed
    (FROM and ADAPTER); else {} (the run's deployed GGUF alone)."""
    if cfg.export.merge:
        return {}
    from tuneship.base_gguf import base_gguf
    from tuneship.models import adapter_base_dir

    return {"gguf": base_gguf(adapter_base_dir(run), run.deployed_quant), "adapter": run.lora_gguf}


def embedded_template_gguf(spec: ModelSpec) -> Path | None:
    """The GGUF whose embedded template the contract checks for a spec: its own, but none when a LoRA GGUF is
    applied on a base's GGUF (that file carries the base's template, which nothing applying the adapter uses:
    Ollama takes the Modelfile's TEMPLATE, tuneship the ChatFormat)."""
    return None if spec.adapter is not None else spec.gguf


def deployed_column(cfg: Config, run: Run) -> str:
    """The column of the eval report that holds the deployed model's answers in llama.cpp."""
    return f"gguf-{'' if cfg.export.merge else 'lora-'}{run.deployed_quant}"


def deployed_gguf(run: Run) -> Path:
    if not run.deployed_gguf.is_file():
        raise TuneshipError(
            f"{run.deployed_gguf} does not exist; run `tuneship export {run.path}` first "
            f"(deploy.quant={run.deployed_quant})"
        )
    return run.deployed_gguf


def context_length(cfg: Config, run: Run) -> int:
    """num_ctx: room for the longest trained conversation plus the answer budget. Unset, it is derived
    (rounded up to a multiple of 256); set (deploy.num_ctx or deploy.parameters.num_ctx), it is checked."""
    budget = max(cfg.eval.max_new_tokens, int(cfg.deploy.parameters.get("num_predict", 0)))
    longest = longest_conversation(cfg, run)
    needed = longest + budget
    explicit = cfg.deploy.parameters.get("num_ctx", cfg.deploy.num_ctx)
    if explicit is None:
        return max(NUM_CTX_STEP, math.ceil(needed / NUM_CTX_STEP) * NUM_CTX_STEP)
    if explicit < max(needed, NUM_CTX_STEP):
        raise ConfigError(
            f"deploy.num_ctx={explicit} is too short: the longest trained conversation has {longest} tokens and "
            f"an answer may take {budget} (eval.max_new_tokens / deploy.parameters.num_predict), so answers "
            f"would be cut; set it to at least {max(needed, NUM_CTX_STEP)}, or leave it unset to derive it"
        )
    return int(explicit)


def longest_conversation(cfg: Config, run: Run) -> int:
    """From the data audit's token count; without one, train.max_seq_len bounds every trained example."""
    audit = run.data_dir / "audit.json"
    if audit.is_file():
        tokens = json.loads(audit.read_text(encoding="utf-8"))["stats"].get("tokens")
        if tokens:
            return int(tokens["max"])
    return cfg.train.max_seq_len


def build_spec(
    cfg: Config, run: Run, chat_format: ChatFormat, gguf: Path | None = None, adapter: Path | None = None
) -> tuple[ModelSpec, OllamaTemplate]:
    """The Modelfile's fields and the Ollama TEMPLATE the contract checks. With MESSAGE turns (deploy.messages,
    a few-shot version's shots) the TEMPLATE renders the system prompt before them, a request's own too, as
    llama.cpp does (see modelfile.system_first). `gguf` and `adapter`: another model file than the run's deployed
    GGUF, and a LoRA GGUF applied on it (a loop version in adapter format)."""
    template = to_ollama(chat_format)
    messages = list(cfg.deploy.messages)
    if messages:
        template = replace(template, template=system_first(template.template, messages))
    tokenizer = chat_format.tokenizer
    stop = [chat_format.spec.stop_token] + [
        tokenizer.convert_ids_to_tokens(i) for i in chat_format.spec.stop_token_ids[1:]
    ]
    parameters = {**cfg.deploy.parameters, "num_ctx": context_length(cfg, run)}
    spec = ModelSpec(
        gguf or deployed_gguf(run),
        template.template,
        template.system,
        stop,
        parameters,
        messages,
        _license(run),
        adapter,
    )
    return spec, template


def _license(run: Run) -> str | None:
    from tuneship.gguf_header import read_gguf_field

    for name in ("LICENSE", "LICENSE.txt", "LICENSE.md"):
        if (run.merged_dir / name).is_file():
            return (run.merged_dir / name).read_text(encoding="utf-8", errors="replace").strip()
    ggufs = run.model_ggufs()
    return read_gguf_field(ggufs[0], "general.license") if ggufs else None


def write_modelfile(spec: ModelSpec, run: Run) -> tuple[Path | None, str | None]:
    """<run>/Modelfile, or (None, why) when a value cannot be expressed in Modelfile syntax."""
    try:
        text = render_modelfile(spec, run.path)
    except ModelfileError as exc:
        return None, str(exc)
    run.modelfile.write_text(text, encoding="utf-8")
    return run.modelfile, None


def run_deploy(cfg: Config, run: Run, console: Console) -> DeployResult:
    """The Modelfile, after the template contract holds for the deployed GGUF, then `deploy.target`."""
    from tuneship.models import trained_chat_format

    with run.recording("deploy", deploy_inputs(cfg, run)) as outputs:
        chat_format = trained_chat_format(run)
        spec, template = build_spec(cfg, run, chat_format, **lora_files(cfg, run))
        require_contract(check_contract(chat_format, run.adapter_dir, template, embedded_template_gguf(spec)))
        modelfile, why_not = write_modelfile(spec, run)
        result = DeployResult(cfg.deploy.target, run.deployed_name, modelfile)
        result.lines.append(
            f"Modelfile: {modelfile}  (ollama create {run.deployed_name} -f {modelfile})"
            if modelfile
            else f"no Modelfile: {why_not}"
        )
        if cfg.deploy.target == "ollama":
            _deploy_ollama_or_say_how(cfg, run, chat_format, spec, result, console)
        elif cfg.deploy.target == "lmstudio":
            result.lines.append(f"LM Studio: {place_for_lmstudio(spec.gguf, run, cfg)}")
        elif cfg.deploy.target == "llamacpp":
            result.lines += llamacpp_commands(spec.gguf, spec.all_parameters()["num_ctx"])
        outputs.update(target=result.target, name=result.name, modelfile=str(modelfile or ""), smoke=result.smoke)
    for line in result.lines:
        console.print(escape(line), highlight=False)
    return result


def _deploy_ollama_or_say_how(
    cfg: Config, run: Run, chat_format: ChatFormat, spec: ModelSpec, result: DeployResult, console: Console
) -> None:
    try:
        deploy_ollama(cfg, run, chat_format, spec, result, console)
    except OllamaUnreachable as exc:
        raise OllamaUnreachable(
            f"{exc}. The GGUF (verified in llama.cpp at export) and the Modelfile are ready: "
            f"`ollama create {run.deployed_name} -f {run.modelfile}` once Ollama runs, or `tuneship deploy "
            f"{run.path}` again"
        ) from None


def place_for_lmstudio(gguf: Path, run: Run, cfg: Config) -> Path:
    """<models>/<publisher>/<model>/: the GGUF (with its embedded template) and the tokenizer files."""
    root = cfg.deploy.lmstudio_dir or Path.home() / ".lmstudio" / "models"
    folder = Path(root).expanduser() / "tuneship" / run.deployed_name
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy2(gguf, folder / gguf.name)
    for name in TOKENIZER_FILES:
        if (run.merged_dir / name).is_file():
            shutil.copy2(run.merged_dir / name, folder / name)
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
    if spec.adapter is not None:
        adapter_digest = file_digest(spec.adapter)
        client.push_blob(spec.adapter, adapter_digest)
        payload["adapters"] = {spec.adapter.name: adapter_digest}
    optional = {"system": spec.system, "messages": spec.messages, "license": spec.license}
    payload.update({key: value for key, value in optional.items() if value})
    client.create(payload)
    return f"blob {digest[:19]}... {'uploaded' if uploaded else 'already on the server'}; created {name}"


def deploy_ollama(
    cfg: Config, run: Run, chat_format: ChatFormat, spec: ModelSpec, result: DeployResult, console: Console
) -> None:
    client = OllamaClient(cfg.deploy.host)
    name = run.deployed_name
    result.lines.append(f"Ollama {client.version()} at {client.host}")
    result.lines.append(create_in_ollama(client, name, spec))
    try:
        verify_show(client.show(name), name, spec, chat_format)
        result.smoke = smoke_test(client, name, cfg, run, chat_format)
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


def smoke_test(client: OllamaClient, name: str, cfg: Config, run: Run, chat_format: ChatFormat) -> dict:
    """Greedy /api/chat on eval prompts: each must stop (done_reason "stop"), leak nothing, and equal
    what the same GGUF answered in llama.cpp at export."""
    from tuneship.evaluate.checks import leaked
    from tuneship.evaluate.prompts import build_prompt_set

    prompts = build_prompt_set(run.data_dir, cfg.eval)[: cfg.deploy.smoke_prompts]
    reference = _gguf_answers(cfg, run)
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


def _gguf_answers(cfg: Config, run: Run) -> list[str]:
    """What the deployed GGUF answered in llama.cpp at export (its column of eval.json)."""
    if not run.eval_report.is_file():
        return []
    column = json.loads(run.eval_report.read_text(encoding="utf-8"))["models"].get(deployed_column(cfg, run))
    return [a["answer"] for a in column["answers"]] if column else []
