"""The loop's only calls into the pipeline and the stages, kept in one place.

A challenger is an ordinary run: the base run's config with `run.name=<name>-v<N>`, the cycle's training file
as its only data source, the golden set as its eval prompts, `model.adapter_from` = the champion's run (it
trains on from the champion's adapter), and no deploy (the loop deploys on promotion). So everything true of a
run (audit, pre-flight, train with resume, eval gates, export, template contract) is true of each version.
"""

from __future__ import annotations

from pathlib import Path

from tuneship.config import Config


def version_gguf(cfg: Config, run_dir: Path) -> Path:
    """The GGUF a version ships: the run's deployed GGUF (deploy.quant or the first export quant)."""
    from tuneship.run import Run

    return Run.of(cfg, Path(run_dir)).deployed_gguf


def audit_settings_for(cfg: Config, measure=None):
    from tuneship.data.stage import audit_settings

    return audit_settings(cfg, measure)


def audit_file(path: Path, cfg: Config, out_dir: Path) -> Path:
    """A data file through the data audit; returns the kept records as Conversation JSONL."""
    from tuneship.data.stage import prepare_data, write_data_outputs

    result = prepare_data([str(path)], audit_settings_for(cfg))
    return write_data_outputs(result, out_dir)["train.jsonl"]


def challenger_config(base: Config, run_name: str, champion_run: Path, train_file: Path, golden_file: Path) -> Config:
    cfg = base.model_copy(deep=True)
    cfg.run.name = run_name
    cfg.model.adapter_from = str(champion_run)
    cfg.train.objective = base.loop.objective
    cfg.data.sources = [str(train_file)]
    cfg.data.format = "messages"
    cfg.data.columns = {}
    cfg.data.eval_ratio = 0.0
    cfg.eval.prompts = golden_file if golden_file.stat().st_size else None
    cfg.eval.train_prompts = max(cfg.eval.train_prompts, 1)
    cfg.deploy.target = "none"
    return cfg


def train_challenger(cfg: Config, console) -> str | None:
    """The whole pipeline for the challenger's run (resumes an interrupted one from its last checkpoint).
    Returns None when every stage passed, else "<stage>: <why>" when the challenger failed a quality gate or the
    template contract (a rejected challenger, an ordinary outcome); any other error is raised."""
    from tuneship.errors import ContractBroken, GateFailed
    from tuneship.run import Run, run_pipeline

    try:
        run_pipeline(cfg, console, fresh=False)
    except (GateFailed, ContractBroken) as exc:
        failed = [name for name, entry in Run.of(cfg).manifest().items() if entry.status == "failed"]
        return f"{failed[-1] if failed else 'pipeline'}: {exc}"
    return None


def publish_to_ollama(version_cfg: Config, run_dir: Path, names: list[str]) -> list[str]:
    """Create the version's GGUF in Ollama under each name (`name:v<N>`, `name:latest`) with its Modelfile
    fields, after the template contract check, as `tuneship deploy` does."""
    from tuneship.deploy.contract import check_contract, require_contract
    from tuneship.deploy.ollama import OllamaClient
    from tuneship.deploy.stage import build_spec, create_in_ollama
    from tuneship.models import trained_chat_format
    from tuneship.run import Run

    run = Run.of(version_cfg, Path(run_dir))
    chat_format = trained_chat_format(run)
    spec, template = build_spec(version_cfg, run, chat_format)
    require_contract(check_contract(chat_format, run.adapter_dir, template, spec.gguf))
    client = OllamaClient(version_cfg.deploy.host)
    return [create_in_ollama(client, name, spec) for name in names]
