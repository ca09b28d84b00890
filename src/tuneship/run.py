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
