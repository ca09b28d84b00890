"""`Run`: the run directory, the names of its artifacts and its manifest; and the pipeline that calls the
stages in order, skipping those recorded as done with the same inputs.

Each stage (`<package>/stage.py`: `run_<stage>(cfg, run, console) -> <Stage>Result`) records its own
manifest entry, so a stage run alone (`tuneship eval RUN`) counts for `tuneship run` too.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, get_args

from rich.console import Console

from tuneship.config import Config, OutType, Quant, save_config
from tuneship.errors import StageStatus, TuneshipError
from tuneship.paths import sha256_file

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
    def base_gguf(self) -> Path:
        """The base model as f16 GGUF, what the LoRA GGUF is checked on."""
        return self.gguf_dir / "base-f16.gguf"

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


LORA_KIND = "lora-f16"


class StageResult(Protocol):
    @property
    def detail(self) -> str:
        """One line for the pipeline's summary table."""
        ...


@dataclass
class StageOutcome:
    stage: StageName
    status: StageStatus
    detail: str


@dataclass
class PipelineSummary:
    run_dir: Path
    stages: list[StageOutcome] = field(default_factory=list)
    error: TuneshipError | None = None

    @property
    def failed(self) -> bool:
        return any(s.status == "failed" for s in self.stages)


@dataclass(frozen=True)
class PipelineStage:
    name: StageName
    inputs: Callable[[Config, Run], str]
    run: Callable[[], StageResult]


def run_pipeline(cfg: Config, console: Console, *, fresh: bool = False) -> PipelineSummary:
    """data -> train -> eval -> export -> template check -> deploy. Data always runs (it is what notices
    changed sources); a later stage is skipped when the manifest says it finished with the same inputs
    (unless `fresh`). The first failure stops the pipeline; after the summary table it is raised again, so
    `tuneship run` exits with the same code and message as the stage's own command."""
    from tuneship.data.stage import run_data
    from tuneship.deploy.stage import deploy_inputs, run_deploy, run_template_check, template_inputs
    from tuneship.evaluate.stage import eval_inputs, run_eval
    from tuneship.export.stage import export_inputs, run_export
    from tuneship.report import print_pipeline
    from tuneship.train.stage import run_train, train_inputs

    run = Run.create(cfg)
    summary = PipelineSummary(run.path)
    stage: StageName = "data"
    try:
        data = run_data(cfg, run, console)
        summary.stages.append(StageOutcome("data", "done", data.detail))
        stages = [
            PipelineStage("train", train_inputs, lambda: run_train(cfg, run, console, data=data, fresh=fresh)),
            PipelineStage("eval", eval_inputs, lambda: run_eval(cfg, run, console)),
            PipelineStage("export", export_inputs, lambda: run_export(cfg, run, console)),
            PipelineStage("template", template_inputs, lambda: run_template_check(cfg, run, console)),
            PipelineStage("deploy", deploy_inputs, lambda: run_deploy(cfg, run, console)),
        ]
        for step in stages:
            stage = step.name
            if not fresh and run.is_done(step.name, step.inputs(cfg, run)):
                summary.stages.append(StageOutcome(step.name, "skipped", "done before with the same inputs"))
                continue
            summary.stages.append(StageOutcome(step.name, "done", step.run().detail))
    except TuneshipError as exc:
        summary.stages.append(StageOutcome(stage, exc.stage_status, str(exc)))
        summary.error = exc
    print_pipeline(console, summary)
    if summary.failed and summary.error is not None:
        raise summary.error
    return summary
