"""The command line: parse, call a stage, print its summary. Business logic lives in the stages."""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from tuneship.errors import TuneshipError
from tuneship.extras import missing_extra
from tuneship.loop import cli as _loop_cli
from tuneship.serve import cli as _serve_cli

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Fine-tune an open LLM on your examples and ship a model that answers and stops.",
)
data_app = typer.Typer(no_args_is_help=True, help="Read, audit and split training data.")
format_app = typer.Typer(no_args_is_help=True, help="Inspect the chat format used for training and inference.")
template_app = typer.Typer(no_args_is_help=True, help="Prove the chat template is the same in every renderer.")
hub_app = typer.Typer(no_args_is_help=True, help="Search, pull and push GGUF models on the Hugging Face hub.")
app.add_typer(hub_app, name="hub")
app.add_typer(data_app, name="data")
app.add_typer(format_app, name="format")
app.add_typer(template_app, name="template")
app.add_typer(_loop_cli.loop_app, name="loop")
app.add_typer(_loop_cli.feedback_app, name="feedback")
app.command("serve")(_serve_cli.serve)

console = Console()
err_console = Console(stderr=True)

ConfigOption = typer.Option(None, "--config", "-c", help="run config (YAML)", exists=False)
SetOption = typer.Option(None, "--set", help="override a config key: --set train.learning_rate=1e-4 (repeatable)")


def _load(config: Optional[Path], overrides: Optional[list[str]]):
    from tuneship.config import config_warnings, load_config

    cfg = load_config(config, overrides)
    for warning in config_warnings(cfg):
        err_console.print(f"[yellow]warning:[/] {escape(warning)}", soft_wrap=True)
    return cfg


@data_app.command("check")
def data_check(
    files: Optional[list[str]] = typer.Argument(
        None, help="files, folders, globs or s3:// URIs (default: data.sources)"
    ),
    config: Optional[Path] = ConfigOption,
    overrides: Optional[list[str]] = SetOption,
    max_seq_len: Optional[int] = typer.Option(None, help="check truncation at this length (loads the tokenizer)"),
    model: Optional[str] = typer.Option(None, help="tokenizer for the truncation check (default: model.base)"),
    out: Optional[Path] = typer.Option(None, help="write train/eval/dropped.jsonl and audit.json/.md here"),
    as_json: bool = typer.Option(False, "--json", help="print the machine-readable audit to stdout"),
    strict: bool = typer.Option(False, help="exit non-zero on any finding, as data.strict does for a run"),
) -> None:
    """Audit data: every problem with file and line; exit 0 when the data is usable."""
    from tuneship.data.stage import audit_json, check_data, require_clean, require_usable, write_data_outputs
    from tuneship.models import base_chat_format
    from tuneship.report import print_audit

    cfg = _load(config, overrides)
    if files:
        cfg.data.sources = list(files)
    if model:
        cfg.model.base = model
    if max_seq_len:
        cfg.train.max_seq_len = max_seq_len
    result = check_data(cfg, base_chat_format(cfg).measure if (model or max_seq_len) else None)
    written = write_data_outputs(result, out) if out else {}
    if as_json:
        sys.stdout.write(json.dumps(audit_json(result), indent=2, ensure_ascii=False) + "\n")
    else:
        print_audit(console, result, written)
    require_usable(result, written.get("audit.md"))
    if strict or cfg.data.strict:
        require_clean(result, written.get("audit.md"))


@format_app.command("show")
def format_show(
    config: Path = typer.Argument(..., help="run config (YAML)"),
    overrides: Optional[list[str]] = SetOption,
    n: int = typer.Option(3, "--n", help="how many training examples to show"),
) -> None:
    """Show rendered training examples with the supervised spans highlighted."""
    from tuneship.data.stage import check_data
    from tuneship.models import base_chat_format
    from tuneship.report import print_format

    cfg = _load(config, overrides)
    result = check_data(cfg)
    print_format(console, base_chat_format(cfg), (result.train + result.eval)[:n])


@app.command()
def train(
    config: Path = typer.Argument(..., help="run config (YAML)"),
    overrides: Optional[list[str]] = SetOption,
    fresh: bool = typer.Option(False, help="start over instead of resuming from the latest checkpoint"),
    dry_run: bool = typer.Option(False, help="prepare data and the chat format, run the pre-flight checks, stop"),
    nproc: int = typer.Option(1, "--nproc", min=1, help="training processes on this machine (DDP via torchrun)"),
    accelerate_config: Optional[Path] = typer.Option(
        None,
        "--accelerate-config",
        exists=True,
        dir_okay=False,
        help="start the processes with `accelerate launch --config_file FILE` (FSDP, DeepSpeed, GPUs)",
    ),
) -> None:
    """Fine-tune a LoRA adapter; resumes from the latest checkpoint automatically."""
    from tuneship.run import Run
    from tuneship.train.distributed import Processes, is_main_process, launch, world_size
    from tuneship.train.stage import run_train

    cfg = _load(config, overrides)
    processes = Processes(nproc, accelerate_config)
    if processes.several and world_size() == 1 and not dry_run:
        args = ["train", str(config), *[f"--set={o}" for o in overrides or []], *(["--fresh"] if fresh else [])]
        raise typer.Exit(launch(args, processes))
    run = Run.create(cfg) if is_main_process() else Run.of(cfg)  # under DDP rank 0 alone writes the run dir
    run_train(cfg, run, console, fresh=fresh, dry_run=dry_run)


def _load_run(target: str, overrides: Optional[list[str]]):
    """A run directory (its config.yaml) or a config file -> (config, Run)."""
    from tuneship.run import Run

    path = Path(target)
    config = path / "config.yaml" if path.is_dir() else path
    cfg = _load(config, overrides)
    return cfg, Run.of(cfg, path if path.is_dir() else None)


@app.command("eval")
def evaluate(
    run: str = typer.Argument(..., help="run directory (or its config file)"),
    overrides: Optional[list[str]] = SetOption,
) -> None:
    """Held-out loss and generation checks, base vs fine-tune, with gates (exit 4 when not met)."""
    from tuneship.evaluate.stage import run_eval

    run_eval(*_load_run(run, overrides), console)


@app.command("export")
def export(
    run: str = typer.Argument(..., help="run directory (or its config file)"),
    overrides: Optional[list[str]] = SetOption,
    quant: Optional[str] = typer.Option(
        None, "--quant", help="comma-separated, e.g. Q4_K_M,Q5_K_M,Q8_0 (default: export.quants)"
    ),
    merge: bool = typer.Option(True, "--merge/--no-merge", help="--no-merge: only the adapter, as a LoRA GGUF"),
) -> None:
    """Merge, convert to GGUF, quantize; validate each file and check its answers in llama.cpp (gates: exit 4)."""
    from tuneship.export.stage import run_export

    overrides = [*(overrides or []), *([f"export.quants=[{quant}]"] if quant else [])]
    if not merge:
        overrides.append("export.merge=false")
    run_export(*_load_run(run, overrides), console)


@app.command("chat")
def chat(
    target: str = typer.Argument(..., help="run directory (uses its first quantized GGUF) or a .gguf file"),
    max_new_tokens: int = typer.Option(256, help="answer length limit"),
) -> None:
    """Chat in the terminal with an exported GGUF through llama.cpp, with the run's chat template."""
    from tuneship.export.chat import chat_loop

    chat_loop(Path(target), console, max_new_tokens)


@template_app.command("check")
def template_check(
    run: str = typer.Argument(..., help="run directory (or its config file)"),
    overrides: Optional[list[str]] = SetOption,
) -> None:
    """Render probe conversations with training, HF, the GGUF's template and the Ollama TEMPLATE (Go); exit 5
    with the diffs when they differ."""
    from tuneship.deploy.stage import run_template_check

    run_template_check(*_load_run(run, overrides), console)


@app.command()
def deploy(
    run: str = typer.Argument(..., help="run directory (or its config file)"),
    overrides: Optional[list[str]] = SetOption,
    target: Optional[str] = typer.Option(
        None, "--target", help="ollama, lmstudio, llamacpp or none (default: deploy.target)"
    ),
) -> None:
    """Write the Modelfile and deploy the GGUF; for Ollama: upload, create, smoke-test, verify, unload."""
    from tuneship.deploy.stage import run_deploy

    overrides = [*(overrides or []), *([f"deploy.target={target}"] if target else [])]
    run_deploy(*_load_run(run, overrides), console)


@app.command("run")
def run_all(
    config: Path = typer.Argument(..., help="run config (YAML)"),
    overrides: Optional[list[str]] = SetOption,
    fresh: bool = typer.Option(False, help="start training over and skip nothing"),
) -> None:
    """Everything: data, train, eval, export, template check, deploy; stages done with the same inputs are
    skipped; a failure exits with its own code."""
    from tuneship.pipeline import run_pipeline

    run_pipeline(_load(config, overrides), console, fresh=fresh)


@app.command()
def doctor() -> None:
    """Check Python, torch, CUDA/MPS, bitsandbytes, llama.cpp, the converter, Go, disk and Ollama."""
    from tuneship.doctor import run_doctor
    from tuneship.report import print_doctor

    checks = run_doctor()
    print_doctor(console, checks)
    if any(c.status == "fail" for c in checks):
        raise typer.Exit(1)


@hub_app.command("search")
def hub_search(
    query: str = typer.Argument(..., help="words in the repo name, e.g. 'smollm2 instruct'"),
    limit: int = typer.Option(10, "--limit", help="how many repos"),
) -> None:
    """GGUF repos by downloads, with their quant files and sizes."""
    from tuneship.hub.client import search
    from tuneship.report import print_hub_search

    print_hub_search(console, search(query, limit))


@hub_app.command("pull")
def hub_pull(
    repo: str = typer.Argument(..., help="repo id, e.g. org/Model-GGUF"),
    quant: Optional[str] = typer.Option(
        None, "--quant", help="default: Q4_K_M, Q4_K_S, Q5_K_M, Q4_0, Q8_0, else the smallest"
    ),
    dest: Path = typer.Option(Path("models"), "--dest", help="download folder"),
    deploy_to_ollama: bool = typer.Option(
        False, "--deploy", help="then create it in Ollama with a Modelfile built from the GGUF's own chat template"
    ),
    name: Optional[str] = typer.Option(None, "--name", help="Ollama model name (default: the file's stem)"),
) -> None:
    """Download the right GGUF, verify its sha256 against the hub, validate it; optionally deploy it."""
    from tuneship.hub.pull import pull_and_validate

    for line in pull_and_validate(repo, dest / repo.replace("/", "--"), quant, deploy_to_ollama, name):
        console.print(escape(line), highlight=False)


@hub_app.command("push")
def hub_push(
    run: str = typer.Argument(..., help="run directory (or its config file)"),
    repo: str = typer.Argument(..., help="target repo id, e.g. me/my-model"),
    public: bool = typer.Option(False, "--public", help="create a public repo (default: private)"),
    overrides: Optional[list[str]] = SetOption,
) -> None:
    """Upload merged model, GGUFs, tokenizer files, Modelfile and a generated model card."""
    from tuneship.hub.push import push

    cfg, the_run = _load_run(run, overrides)
    console.print(f"pushed: {push(the_run, cfg, repo, private=not public)}")


def main(argv: Optional[list[str]] = None) -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)  # libraries' deprecation notes are not the user's
    try:
        app(args=argv, prog_name="tuneship")
    except (TuneshipError, ImportError) as exc:
        error = exc if isinstance(exc, TuneshipError) else missing_extra(exc)  # a module an extra brings
        if error is None:
            raise
        err_console.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
        sys.exit(error.exit_code)


if __name__ == "__main__":
    main()
