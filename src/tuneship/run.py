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
from tuneship.errors import DataError


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
    measure = load_chat_format(cfg).measure if with_tokens else None
    return prepare_data(cfg.data.sources, audit_settings(cfg, measure), eval_ratio=cfg.data.eval_ratio,
                        seed=cfg.data.seed, s3_settings=cfg.data.s3)


def run_data_stage(cfg: Config, run: Run, chat_format) -> DataResult:
    """The data stage of a run: always with the token check, outputs in <run>/data/."""
    started = time.monotonic()
    result = prepare_data(cfg.data.sources, audit_settings(cfg, chat_format.measure),
                          eval_ratio=cfg.data.eval_ratio, seed=cfg.data.seed, s3_settings=cfg.data.s3)
    written = write_data_outputs(result, run.subdir("data"))
    run.record("data", "done", fingerprint(cfg.data.model_dump(mode="json"), result.files),
               {k: str(v) for k, v in written.items()}, time.monotonic() - started)
    return result


def load_chat_format(cfg: Config):
    from tuneship.base_model import resolve_base_model
    from tuneship.chat.format import ChatFormat

    return ChatFormat.from_model_dir(resolve_base_model(cfg.model.base), cfg.chat)


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

    run = Run.create(cfg)
    base_dir = resolve_base_model(cfg.model.base)
    chat_format = ChatFormat.from_model_dir(base_dir, cfg.chat)
    data = run_data_stage(cfg, run, chat_format)
    if not data.is_usable:
        raise DataError(f"no usable training examples: {data.audit.records_read} read, all dropped or in eval; "
                        f"see {run.path / 'data' / 'audit.md'}")
    rendered = [chat_format.render(c) for c in data.train]
    preflight(chat_format, data.train, rendered, cfg.train.max_seq_len)
    chat_format.save(run.subdir("chat"))
    return PreparedRun(run, base_dir, chat_format, data, rendered)


def run_train(cfg: Config, console, *, fresh: bool = False, dry_run: bool = False, extra_callbacks=()):
    """The train stage: returns the PreparedRun for --dry-run, else the TrainResult."""
    from tuneship.train.trainer import train_adapter

    prepared = prepare_training(cfg)
    if dry_run:
        return prepared
    inputs_hash = fingerprint(cfg.model.model_dump(), cfg.chat.model_dump(), cfg.lora.model_dump(),
                              cfg.train.model_dump(exclude={"sample_every", "sample_prompts", "report_to"}),
                              [r.input_ids for r in prepared.rendered])
    started = time.monotonic()
    result = train_adapter(prepared.run.path, cfg, prepared.base_dir, prepared.chat_format, prepared.rendered,
                           inputs_hash, console, fresh=fresh, extra_callbacks=extra_callbacks)
    prepared.run.record("train", "done", inputs_hash, {"adapter": result.adapter_dir}, time.monotonic() - started)
    return result
