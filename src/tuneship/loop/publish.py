"""`tuneship loop publish`: a version as files Ollama, LM Studio or the hub can take, checked like any export.

- As it serves (the default): a Modelfile in `<run.dir>/<name>-loop/v<N>/` whose FROM is the version's GGUF, and
  in adapter format FROM the base's quantized GGUF with ADAPTER its LoRA GGUF (`ollama create NAME -f` it). The
  template contract is checked as for any Modelfile.
- `merged`: the version's adapter merged and exported as `tuneship export` does (merge, f16 GGUF, quants, every
  file validated and answering the eval prompts under the eval gates and the KL gate), for LM Studio, the hub, or
  an Ollama without the base; its Modelfile names the merged quant.

Either way the published files are loaded in llama.cpp and answer the golden prompts and the version's new
examples; the result says how many answers are identical to the version's own as it serves, and the publication
fails when they stop less often than the version's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from tuneship.deploy.contract import check_contract, require_contract
from tuneship.deploy.modelfile import render_modelfile
from tuneship.deploy.stage import embedded_template_gguf
from tuneship.errors import TuneshipError
from tuneship.evaluate.prompts import EvalPrompt
from tuneship.loop.examples import examples_by_id, golden, prompts_from
from tuneship.loop.promotion import publish_config, version_spec
from tuneship.loop.gate import version_answers
from tuneship.loop.registry import Loop, RegistryError, require_servable
from tuneship.loop.tables import Version
from tuneship.models import trained_chat_format


@dataclass
class Published:
    version_id: int
    modelfile: Path
    gguf: Path
    adapter: Path | None
    prompts: int
    identical: int  # answers identical to the version's own as it serves
    stopped: int
    stopped_serving: int  # how many of the version's own answers stopped

    @property
    def detail(self) -> str:
        files = f"FROM {self.gguf.name}" + (f", ADAPTER {self.adapter.name}" if self.adapter else "")
        return (
            f"v{self.version_id}: {self.modelfile} ({files}); in llama.cpp {self.identical}/{self.prompts} answers "
            f"identical to the version as it serves, {self.stopped}/{self.prompts} stopped (the version: "
            f"{self.stopped_serving})"
        )


class PublishFailed(TuneshipError):
    """The published files stop less often in llama.cpp than the version as it serves."""


def publish_version(loop: Loop, version_id: int | None, merged: bool, console: Console) -> Published:
    version = loop.store.version(version_id) if version_id is not None else loop.store.champion()
    if version is None:
        raise RegistryError(f"no version {version_id}; see `tuneship loop versions`")
    require_servable(version)
    cfg = publish_config(loop, version)
    if merged:  # the quants the loop's config asks for (a cycle made only the one that serves)
        cfg.export = loop.cfg.export.model_copy(update={"merge": True})
        version = _merged_export(cfg, version, console)
    spec, template, run = version_spec(cfg, version)
    require_contract(check_contract(trained_chat_format(run), run.adapter_dir, template, embedded_template_gguf(spec)))
    folder = loop.cycle_dir(version.id) / ("publish-merged" if merged else "publish")
    folder.mkdir(parents=True, exist_ok=True)
    modelfile = folder / "Modelfile"
    modelfile.write_text(render_modelfile(spec, folder), encoding="utf-8")
    examples = golden(loop.store) + examples_by_id(loop.store, version.metrics.get("new_examples", []))
    prompts = prompts_from(examples)
    published = Published(
        version.id, modelfile, spec.gguf, spec.adapter, len(prompts), *_compare(loop, version.id, version, prompts)
    )
    if published.stopped < published.stopped_serving:
        raise PublishFailed(f"{published.detail}: the published files stop less often than the version")
    loop.store.add_event("exported", "cli", published.detail, {"modelfile": str(modelfile)}, version.id)
    return published


def _merged_export(cfg, version: Version, console: Console) -> Version:
    """The version's adapter merged and exported (merge, f16, quants, each checked), as a Version-like row whose
    GGUF is the merged quant (not saved: the registry keeps serving the version as it was)."""
    from tuneship.export.stage import run_export
    from tuneship.run import Run

    run = Run.of(cfg, Path(version.run_dir))
    run_export(cfg, run, console)
    return Version(
        id=version.id,
        name=version.name,
        run_dir=version.run_dir,
        gguf=str(run.deployed_gguf),
        adapter=None,
        kind=version.kind,
        shots=version.shots,
        metrics=version.metrics,
        status=version.status,
    )


def _compare(loop: Loop, version_id: int, published: Version, prompts: list[EvalPrompt]) -> tuple[int, int, int]:
    """(answers of the published files identical to the version's as it serves, published answers that stopped,
    the version's answers that stopped). The version's come from what the gate remembers when it asked them."""
    tokens = loop.cfg.eval.max_new_tokens
    theirs = version_answers(loop.store.version(version_id), prompts, tokens, loop.cycle_dir(version_id))
    ours = version_answers(published, prompts, tokens)
    identical = sum(a.text == b.text for a, b in zip(theirs, ours))
    return identical, sum(a.stopped for a in ours), sum(a.stopped for a in theirs)
