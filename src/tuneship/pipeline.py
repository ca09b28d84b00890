"""`run_pipeline`: the stages in order, skipping those recorded as done with the same inputs.

Imported only by the CLI, the loop's cycle and tests: the library below never imports the recipe that drives it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from rich.console import Console

from tuneship.config import Config
from tuneship.data.stage import run_data
from tuneship.deploy.stage import deploy_inputs, run_deploy, run_template_check, template_inputs
from tuneship.errors import StageStatus, TuneshipError
from tuneship.evaluate.stage import eval_inputs, run_eval
from tuneship.export.stage import export_inputs, run_export
from tuneship.report import print_pipeline
from tuneship.run import Run, StageName
from tuneship.train.stage import run_train, train_inputs


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
