"""`Run`: the run directory, the names of its artifacts and its manifest records.

Each stage (`<package>/stage.py`: `run_<stage>(cfg, run, console) -> <Stage>Result`) records its own
manifest entry, so a stage run alone (`tuneship eval RUN`) counts for `tuneship run` too (pipeline.py).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, get_args


from tuneship.config import Config, OutType, Quant, save_config
from tuneship.errors import StageStatus, TuneshipError
from tuneship.paths import sha256_file

LORA_KIND = "lora-f16"
StageName = Literal["data", "train", "eval", "export", "template", "deploy"]


def fingerprint(*parts: Any) -> str:
    """A short, stable hash of JSON-able parts: what a stage's inputs hash is made of."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_fingerprint(path: Path) -> str | None:
    """The sha256 of a file's bytes, None when it does not exist."""
    return sha256_file(path)[:16] if path.is_file() else None


@dataclass
class StageRecord:
    """One manifest entry."""

    status: StageStatus
    inputs: str
    outputs: dict[str, Any]
    seconds: float


@dataclass(frozen=True)
class Run:
    """A run directory, `<run.dir>/<run.name>/`, and the one place that names what is in it."""

    path: Path
    name: str
    deployed_name: str
    deployed_quant: str

    @classmethod
    def of(cls, cfg: Config, path: Path | None = None) -> Run:
        """The run of a config, in `path` when given (a run directory that was copied or moved)."""
        return cls(
            path or cfg.run_dir,
            cfg.run.name,
            cfg.deploy.name or cfg.run.name,
            cfg.deploy.quant or (cfg.export.quants or [cfg.export.outtype])[0],
        )

    @classmethod
    def create(cls, cfg: Config) -> Run:
        """The run directory with the resolved config.yaml, made when missing."""
        run = cls.of(cfg)
        run.path.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run.path / "config.yaml")
        return run

    # artifacts ---------------------------------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        return self.path / "data"

    @property
    def chat_dir(self) -> Path:
        return self.path / "chat"

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def adapter_dir(self) -> Path:
        return self.path / "adapter"

    @property
    def merged_dir(self) -> Path:
        return self.path / "merged"

    @property
    def gguf_dir(self) -> Path:
        return self.path / "gguf"

    @property
    def reports_dir(self) -> Path:
        return self.path / "reports"

    @property
    def eval_report(self) -> Path:
        return self.reports_dir / "eval.json"

    @property
    def modelfile(self) -> Path:
        return self.path / "Modelfile"

    def gguf(self, kind: str) -> Path:
        """The run's model as GGUF: `<name>-<outtype or quant>.gguf`."""
        return self.gguf_dir / f"{self.name}-{kind}.gguf"

    @property
    def lora_gguf(self) -> Path:
        """`export.merge: false`: the adapter alone (no chat template, no vocabulary: not a model to run)."""
        return self.gguf(LORA_KIND)

    @property
    def deployed_gguf(self) -> Path:
        return self.gguf(self.deployed_quant)

    def model_ggufs(self) -> list[Path]:
        """The exported model GGUFs that exist, quantized first (never the LoRA or the base file)."""
        kinds = [*get_args(Quant), *get_args(OutType)]
        return [self.gguf(kind) for kind in kinds if self.gguf(kind).is_file()]

    # manifest ----------------------------------------------------------------------------------

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    def manifest(self) -> dict[str, StageRecord]:
        if not self.manifest_path.is_file():
            return {}
        raw = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        return {stage: StageRecord(**entry) for stage, entry in raw.items()}

    def record(self, stage: StageName, entry: StageRecord) -> None:
        manifest = {name: asdict(record) for name, record in self.manifest().items()}
        manifest[stage] = asdict(entry) | {"seconds": round(entry.seconds, 2)}
        self.path.mkdir(parents=True, exist_ok=True)
        partial = self.manifest_path.with_suffix(".json.partial")
        partial.write_text(json.dumps(manifest, indent=2, default=str), encoding="utf-8")
        partial.replace(self.manifest_path)

    def recorded_inputs(self, stage: StageName) -> str | None:
        """The inputs hash the stage last ran with (what later stages' hashes are chained on)."""
        entry = self.manifest().get(stage)
        return entry.inputs if entry else None

    def is_done(self, stage: StageName, inputs: str) -> bool:
        entry = self.manifest().get(stage)
        return entry is not None and entry.status == "done" and entry.inputs == inputs

    @contextmanager
    def recording(self, stage: StageName, inputs: str) -> Iterator[dict[str, Any]]:
        """Record the stage's manifest entry: the outputs its body fills in, with status "done" when the body
        returns, or the error's `stage_status` (and its message) when it raises a TuneshipError."""
        outputs: dict[str, Any] = {}
        started = time.monotonic()
        try:
            yield outputs
        except TuneshipError as exc:
            outputs["error"] = str(exc)
            self.record(stage, StageRecord(exc.stage_status, inputs, outputs, time.monotonic() - started))
            raise
        self.record(stage, StageRecord("done", inputs, outputs, time.monotonic() - started))
