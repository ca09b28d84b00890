"""The run directory, its manifest, and the stage entry points the CLI calls."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneship.config import Config, save_config
from tuneship.data.audit import AuditSettings
from tuneship.data.stage import DataResult, prepare_data, write_data_outputs
from tuneship.errors import DataError, TuneshipError


@dataclass
class Run:
    """A run directory: `<run.dir>/<run.name>/` with config.yaml and manifest.json."""

    path: Path

    @classmethod
    def create(cls, cfg: Config) -> Run:
        run = cls(cfg.run_dir)
        run.path.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run.path / "config.yaml")
        return run

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    def manifest(self) -> dict[str, Any]:
        if self.manifest_path.is_file():
            return json.loads(self.manifest_path.read_text(encoding="utf-8"))
        return {}

    def record(self, stage: str, status: str, inputs_hash: str, outputs: dict[str, Any], seconds: float) -> None:
        manifest = self.manifest()
        manifest[stage] = {"status": status, "inputs": inputs_hash, "outputs": outputs, "seconds": round(seconds, 2)}
        partial = self.manifest_path.with_suffix(".json.partial")
        partial.write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        partial.replace(self.manifest_path)

    def subdir(self, name: str) -> Path:
        path = self.path / name
        path.mkdir(parents=True, exist_ok=True)
        return path


def fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def audit_settings(cfg: Config, measure=None) -> AuditSettings:
    return AuditSettings(
        format=cfg.data.format,
        columns=cfg.data.columns,
        near_duplicate_similarity=cfg.data.near_duplicate_similarity,
        max_seq_len=cfg.train.max_seq_len if measure else None,
        measure=measure,
    )


def run_data_check(cfg: Config, *, with_tokens: bool) -> DataResult:
    return _prepare_data(cfg, load_chat_format(cfg).measure if with_tokens else None)


def _prepare_data(cfg: Config, measure) -> DataResult:
    return prepare_data(
        cfg.data.sources,
        audit_settings(cfg, measure),
        eval_ratio=cfg.data.eval_ratio,
        seed=cfg.data.seed,
        s3_settings=cfg.data.s3,
    )


def run_data_stage(cfg: Config, run: Run, chat_format) -> DataResult:
    """The data stage of a run: always with the token check, outputs in <run>/data/."""
    started = time.monotonic()
    result = _prepare_data(cfg, chat_format.measure)
    written = write_data_outputs(result, run.subdir("data"))
    run.record(
        "data",
        "done",
        fingerprint(cfg.data.model_dump(mode="json"), result.files),
        {k: str(v) for k, v in written.items()},
        time.monotonic() - started,
    )
    return result


def load_chat_format(cfg: Config):
    from tuneship.base_model import resolve_base_model
    from tuneship.chat.format import ChatFormat

    return ChatFormat.from_model_dir(resolve_base_model(cfg.model.base, weights=False), cfg.chat)


@dataclass
class PreparedRun:
    """Everything training needs, made and checked before any weight moves."""

    run: Run
    base_dir: str
    chat_format: Any
    data: DataResult
    rendered: list


def prepare_training(cfg: Config) -> PreparedRun:
    """Run dir, chat format, data stage, rendering and the pre-flight checks."""
    from tuneship.base_model import resolve_base_model
    from tuneship.chat.format import ChatFormat
    from tuneship.train.preflight import preflight

    from tuneship.train.distributed import is_main_process

    is_writer = is_main_process()  # under DDP every process prepares the same data; rank 0 writes it
    run = Run.create(cfg) if is_writer else Run(cfg.run_dir)
    base_dir = resolve_base_model(cfg.model.base, weights=False)  # the trainer fetches weights after its estimate
    chat_format = ChatFormat.from_model_dir(base_dir, cfg.chat)
    data = run_data_stage(cfg, run, chat_format) if is_writer else _prepare_data(cfg, chat_format.measure)
    if not data.is_usable:
        raise DataError(
            f"no usable training examples: {data.audit.records_read} read, all dropped or in eval; "
            f"see {run.path / 'data' / 'audit.md'}"
        )
    rendered = [chat_format.render(c) for c in data.train]
    preflight(chat_format, data.train, rendered, cfg.train.max_seq_len)
    if is_writer:
        chat_format.save(run.subdir("chat"))
    return PreparedRun(run, base_dir, chat_format, data, rendered)


def train_inputs_hash(cfg: Config, prepared: PreparedRun) -> str:
    """What the adapter depends on: model, chat format, LoRA and training settings, the rendered data."""
    return fingerprint(
        cfg.model.model_dump(),
        cfg.chat.model_dump(),
        cfg.lora.model_dump(),
        cfg.train.model_dump(exclude={"sample_every", "sample_prompts", "report_to"}),
        [r.input_ids for r in prepared.rendered],
    )


def train_prepared(cfg: Config, prepared: PreparedRun, console, *, fresh: bool = False, extra_callbacks=()):
    from tuneship.train.trainer import train_adapter

    inputs_hash = train_inputs_hash(cfg, prepared)
    started = time.monotonic()
    result = train_adapter(
        prepared.run.path,
        cfg,
        prepared.base_dir,
        prepared.chat_format,
        prepared.rendered,
        inputs_hash,
        console,
        fresh=fresh,
        extra_callbacks=extra_callbacks,
    )
    from tuneship.train.distributed import is_main_process

    if is_main_process():
        prepared.run.record("train", "done", inputs_hash, {"adapter": result.adapter_dir}, time.monotonic() - started)
    return result


def run_train(cfg: Config, console, *, fresh: bool = False, dry_run: bool = False, extra_callbacks=()):
    """The train stage: returns the PreparedRun for --dry-run, else the TrainResult."""
    prepared = prepare_training(cfg)
    if dry_run:
        return prepared
    return train_prepared(cfg, prepared, console, fresh=fresh, extra_callbacks=extra_callbacks)


def run_template_check(cfg: Config, run_dir: Path):
    from tuneship.chat.format import ChatFormat
    from tuneship.deploy.contract import check_contract
    from tuneship.deploy.ollama_template import to_ollama

    chat_format = ChatFormat.load(run_dir / "adapter")
    ggufs = sorted((run_dir / "gguf").glob(f"{cfg.run.name}-*.gguf")) if (run_dir / "gguf").is_dir() else []
    return check_contract(chat_format, run_dir / "adapter", to_ollama(chat_format), ggufs[0] if ggufs else None)


@dataclass
class StageOutcome:
    stage: str
    status: str
    detail: str


@dataclass
class PipelineSummary:
    run_dir: Path
    stages: list[StageOutcome]

    @property
    def failed(self) -> bool:
        return any(s.status == "failed" for s in self.stages)


def run_pipeline(cfg: Config, console, *, fresh: bool = False) -> PipelineSummary:
    """data -> format -> train -> eval -> export -> template check -> deploy; each stage is skipped when the
    manifest says it finished with the same inputs, and stops the pipeline when it fails."""
    prepared = prepare_training(cfg)
    run = prepared.run
    summary = PipelineSummary(
        run.path,
        [
            StageOutcome(
                "data",
                "done",
                f"{len(prepared.data.train)} train / {len(prepared.data.eval)} eval, "
                f"{len(prepared.data.audit.dropped)} dropped ({run.path / 'data' / 'audit.md'})",
            ),
            StageOutcome(
                "format",
                "done",
                f"{prepared.chat_format.spec.family} template, stop on "
                f"{prepared.chat_format.spec.stop_token}, pre-flight passed",
            ),
        ],
    )
    train_hash = train_inputs_hash(cfg, prepared)
    stages = [
        ("train", train_hash, lambda: _train_stage(cfg, prepared, console, fresh)),
        ("eval", fingerprint(train_hash, cfg.eval.model_dump(mode="json")), lambda: _eval_stage(cfg, run, console)),
        (
            "export",
            fingerprint(train_hash, cfg.eval.model_dump(mode="json"), cfg.export.model_dump()),
            lambda: _export_stage(cfg, run, console),
        ),
        ("template", fingerprint(train_hash, cfg.export.model_dump()), lambda: _template_stage(cfg, run)),
        (
            "deploy",
            fingerprint(train_hash, cfg.export.model_dump(), cfg.deploy.model_dump(mode="json")),
            lambda: _deploy_stage(cfg, run, console),
        ),
    ]
    for stage, inputs_hash, action in stages:
        done = run.manifest().get(stage, {})
        if not fresh and done.get("status") == "done" and done.get("inputs") == inputs_hash:
            summary.stages.append(StageOutcome(stage, "skipped", "done before with the same inputs"))
            continue
        started = time.monotonic()
        try:
            status, detail = action()
        except TuneshipError as exc:
            summary.stages.append(StageOutcome(stage, "failed", str(exc)))
            break
        run.record(stage, status, inputs_hash, {"detail": detail}, time.monotonic() - started)
        summary.stages.append(StageOutcome(stage, status, detail))
        if status != "done":
            break
    return summary


def _train_stage(cfg, prepared, console, fresh):
    result = train_prepared(cfg, prepared, console, fresh=fresh)
    loss = f", final loss {result.final_loss:.4f}" if result.final_loss is not None else ""
    return "done", f"{result.steps} steps in {result.seconds:.0f} s{loss} -> {result.adapter_dir}"


def _gates(summaries: dict, failures: list[str]) -> tuple[str, str]:
    if failures:
        raise TuneshipError("evaluation gates not met: " + "; ".join(failures))
    return "done", "; ".join(
        f"{name}: stop {s['stop_rate']:.0%}" + (f", exact {s['exact_match']:.0%}" if "exact_match" in s else "")
        for name, s in summaries.items()
    )


def _eval_stage(cfg, run, console):
    from tuneship.evaluate.stage import run_eval

    result = run_eval(cfg, run.path, console)
    return _gates(result.summaries, result.gate_failures)


def _export_stage(cfg, run, console):
    from tuneship.export.stage import run_export

    result = run_export(cfg, run.path, console)
    status, detail = _gates(result.summaries, result.gate_failures)
    files = ", ".join(Path(info["path"]).name for info in result.ggufs)
    return status, f"{files}; {detail}"


def _template_stage(cfg, run):
    result = run_template_check(cfg, run.path)
    if not result.is_equal:
        raise TuneshipError("template contract broken:\n" + "\n".join(result.differences))
    return "done", "identical in " + ", ".join(result.renderers)


def _deploy_stage(cfg, run, console):
    from tuneship.deploy.ollama import OllamaUnreachable
    from tuneship.deploy.stage import run_deploy

    try:
        result = run_deploy(cfg, run.path, console)
    except OllamaUnreachable as exc:
        return "not reachable", (
            f"{exc}. Stopped after the llama.cpp-verified GGUF and the Modelfile: "
            f"`ollama create {cfg.deploy.name or cfg.run.name} -f {run.path / 'Modelfile'}` "
            "once Ollama runs, or `tuneship deploy` again"
        )
    return "done", "; ".join(result.lines)
