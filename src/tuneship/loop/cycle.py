"""One cycle of the loop, run in its own process (`tuneship loop cycle`), under the store's lease, start to
conclusion:

lease -> harvest feedback -> examples (new + replay sample; golden held out) -> a challenger, either a fine-tuned
run through the pipeline or, on the fast path, a few-shot candidate (the champion + shots) -> gate in llama.cpp vs
the champion -> promote (Ollama `name:v<N>` + `name:latest`) -> smoke test on the live path -> automatic restore
of the previous champion when it fails.

The promotion re-checks, in its own transaction, that the challenger's parent is still the champion: when a
manual promote or rollback moved the champion meanwhile, the cycle ends "stale" (the challenger is rejected, its
examples wait for the next cycle, an event says why) instead of undoing that move.

A fine-tuned challenger is an ordinary run: the base run's config with `run.name=<name>-v<N>`, the cycle's
training file as its only data source, the golden set as its eval prompts, `model.adapter_from` = the champion's
run (it trains on from the champion's adapter), and no deploy (the loop deploys on promotion). So everything true
of a run (audit, pre-flight, train with resume, eval gates, export, template contract) is true of each version.

A version left in status "training" by a crashed cycle is resumed with exactly its own examples (the run resumes
from its last checkpoint). Examples are marked used only when their version is promoted: a rejected challenger's
examples wait for the next cycle, except those blamed for the rejection, which wait for review (blame.py). None
is lost or counted twice.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from rich.console import Console

from tuneship.base_gguf import ServedBaseUnavailable
from tuneship.config import Config
from tuneship.errors import ContractBroken, GateFailed, TuneshipError
from tuneship.loop.artifacts import publish_artifacts
from tuneship.loop.adapter_form import (
    adapter_files,
    drop_checkpoints,
    in_adapter_form,
    is_adapter_format,
    served_base,
)
from tuneship.loop.blame import hold_blamed
from tuneship.loop.examples import (
    CycleData,
    current_waiting,
    gate_examples_known_ahead,
    gate_sets,
    prompts_from,
    replay_sample,
    write_cycle_data,
)
from tuneship.loop.fewshot import SELECTED_EVENT, ShotChoice, select_shots
from tuneship.loop.gate import GateDecision, remember_export_answers, run_gate, version_answers
from tuneship.loop.lease import CYCLE_LEASE, Heartbeat, cycle_lease
from tuneship.loop.prune import prune_versions
from tuneship.loop.promotion import fewshot_modelfile, promote_version, restore_previous, smoke_problems
from tuneship.loop.registry import Loop, require_servable, version_chat_format, version_gguf
from tuneship.loop.signals import harvest
from tuneship.loop.store import StaleChampion
from tuneship.loop.trigger import finetune_due
from tuneship.loop.tables import Version, VersionKind
from tuneship.pipeline import run_pipeline
from tuneship.run import Run
from tuneship.train.distributed import Processes, train_run_in_processes


CycleStatus = Literal["promoted", "rejected", "failed", "rolled_back", "stale"]
UNCONCLUDED = ("training", "candidate")  # a version a failure may mark failed: nothing concluded it yet


class NothingToTrain(TuneshipError):
    """No new accepted examples wait for a cycle."""


@dataclass
class CycleResult:
    version_id: int
    status: CycleStatus
    reasons: list[str]


def run_cycle(
    loop: Loop,
    console: Console,
    actor: str = "cli",
    reason: str = "by hand",
    live_url: str | None = None,
    kind: VersionKind = "finetune",
    train_processes: Processes = Processes(),
) -> CycleResult:
    """One cycle under the lease: a fine-tuned challenger (trained in `train_processes`), or (kind
    "fewshot") the fast path's few-shot candidate."""
    require_servable(loop.store.champion())
    with cycle_lease(loop.store, loop.cfg.loop.lease_seconds) as heartbeat:
        try:
            if kind == "fewshot":
                result = fewshot_cycle(loop, console, heartbeat, actor, reason, live_url)
            else:
                result = finetune_cycle(loop, console, heartbeat, actor, reason, live_url, train_processes)
        except NothingToTrain:
            raise
        except Exception as exc:  # any failure is recorded, so the trigger backs off instead of retrying at once
            _record_failure(loop, actor, exc)
            raise
        prune_versions(loop)  # loop.keep_versions: storage stays bounded (outside the try: a concluded cycle)
        return result


def _record_failure(loop: Loop, actor: str, exc: Exception) -> None:
    """The cycle's version is marked failed unless the cycle concluded it (promoted, rolled back, rejected) before
    the failure: a failure after its promotion (the smoke test, the cleanup) leaves the champion the champion."""
    lease = loop.store.lease(CYCLE_LEASE)
    version_id = lease.version_id if lease else None
    version = loop.store.version(version_id) if version_id is not None else None
    if version is not None and version.status in UNCONCLUDED:
        loop.store.update_version(version.id, status="failed")
    loop.store.add_event("cycle_failed", actor, f"{type(exc).__name__}: {exc}", {}, version_id)


def preload() -> None:
    """Imports what a fine-tune cycle uses (PyTorch, transformers' Trainer, PEFT, llama.cpp: about 7 s on 2
    cores), for a process started before its cycle is due (`tuneship loop standby`). PyTorch first, as in a
    cycle started without a standby: the OpenMP runtime loaded first serves both libraries, and that is then the
    one PyTorch ships with (llama.cpp first would load the system's libgomp for both)."""
    import torch  # noqa: F401
    import peft  # noqa: F401
    import transformers.trainer  # noqa: F401

    import tuneship.export.stage  # noqa: F401
    import tuneship.train.trainer  # noqa: F401
    import llama_cpp  # noqa: F401


def warm_gate_answers(loop: Loop) -> int:
    """Before a cycle is due (`tuneship loop standby`): the champion's answers to what the next gate asks it
    whatever the new examples are (golden, and the earlier facts of a small knowledge base), into its gate cache,
    so that gate asks it only about the new ones. A champion that came out of a cycle has most of them from its
    export; v1 brought into adapter form has none. Returns how many prompts its cache now answers (0 also when
    the champion is not yet in the form the loop serves)."""
    champion = loop.store.champion()
    if champion is None or not champion.gguf or (is_adapter_format(loop.cfg) and not champion.adapter):
        return 0
    prompts = prompts_from(gate_examples_known_ahead(loop.store, loop.cfg.loop))
    if prompts:
        version_answers(champion, prompts, loop.cfg.eval.max_new_tokens, _answers_folder(loop)(champion))
    return len(prompts)


# fine-tune ------------------------------------------------------------------------------------


def finetune_cycle(
    loop: Loop,
    console: Console,
    heartbeat: Heartbeat,
    actor: str,
    reason: str,
    live_url: str | None,
    train_processes: Processes = Processes(),
) -> CycleResult:
    """Harvest, choose examples, train the challenger through the pipeline, gate it, conclude."""
    store = loop.store
    champion = in_adapter_form(loop, store.champion())
    heartbeat.stage("harvest")
    harvest(store, loop.cfg, version_chat_format(champion).measure)
    version = _resume_or_new_version(loop, champion)
    heartbeat.stage("train", version.id)
    store.add_event(
        "cycle_started",
        actor,
        reason,
        {"new": len(version.metrics["new_examples"]), "replay": len(version.metrics["replay_examples"])},
        version.id,
    )
    data = write_cycle_data(store, version, loop.cycle_dir(version.id))
    cfg = challenger_config(loop.cfg, version.name, Path(champion.run_dir), data, _train_on_quant(loop, version))
    try:
        if train_processes.several:
            train_run_in_processes(cfg, train_processes)
        run_pipeline(cfg, console, fresh=False)  # resumes an interrupted run from its last checkpoint
    except ContractBroken as exc:
        store.update_version(version.id, status="failed")
        store.add_event("cycle_failed", actor, f"{failed_stage(cfg)}: {exc}", {}, version.id)
        return CycleResult(version.id, "failed", [f"{failed_stage(cfg)}: {exc}"])
    except GateFailed as exc:  # its own eval or export gates (recall of what it was taught): an ordinary rejection
        decision = GateDecision(False, [f"{failed_stage(cfg)}: {exc}"])
        return conclude(loop, heartbeat, version, decision, actor, live_url)
    version = store.update_version(version.id, status="candidate", **_served_files(cfg, Path(version.run_dir)))
    heartbeat.stage("gate", version.id)
    remember_export_answers(version, cfg, loop.cycle_dir(version.id))
    decision = run_gate(champion, version, gate_sets(store, version), loop.cfg, _answers_folder(loop))
    return conclude(loop, heartbeat, version, decision, actor, live_url)


def _resume_or_new_version(loop: Loop, champion: Version) -> Version:
    """A version a crashed cycle left in "training" is resumed as it was; else a new one with the waiting
    examples and a replay sample."""
    store = loop.store
    interrupted = [v for v in store.versions() if v.status == "training"]
    if interrupted:
        version = interrupted[-1]
        store.add_event(
            "cycle_resumed", "tuneship", f"resuming v{version.id} left by an interrupted cycle", {}, version.id
        )
        return version
    objective = loop.cfg.loop.objective
    new = [e.id for e in current_waiting(store, objective)]
    if not new:
        raise NothingToTrain(
            f"no new accepted {objective} examples to train on (loop.objective={objective}); post feedback "
            "(POST /v1/feedback, `tuneship feedback import`) or approve pending ones"
        )
    version_id = store.next_version_id()
    name = loop.version_name(version_id)
    return store.add_version(
        id=version_id,
        name=name,
        parent_id=champion.id,
        run_dir=str(Path(loop.cfg.run.dir).resolve() / name),
        gguf=None,
        status="training",
        example_ids=new,
        metrics={"new_examples": new, "replay_examples": replay_sample(store, loop.cfg.loop, set(new), version_id)},
    )


def _answers_folder(loop: Loop) -> Callable[[Version], Path]:
    """Where each version's gate answers are kept: its cycle folder (a few-shot version's own, as its shots
    change its answers)."""
    return lambda version: loop.cycle_dir(version.id)


def _served_files(cfg: Config, run_dir: Path) -> dict[str, str | None]:
    """The registry's `gguf` and `adapter` of a trained challenger, by loop.version_format."""
    if is_adapter_format(cfg):
        base, lora = adapter_files(cfg, run_dir)
        return {"gguf": str(base), "adapter": str(lora)}
    return {"gguf": str(version_gguf(cfg, run_dir)), "adapter": None}


def _train_on_quant(loop: Loop, version: Version) -> str | None:
    """In adapter format, the quant the challenger serves on, which it trains on (`model.train_on_quant`; the
    standby process made that base ahead, else it is made here); None in merged format, or where transformers
    cannot dequantize that quant: an event says so, and the challenger trains on the base's own weights (its learned
    check then measures other weights than llama.cpp's)."""
    if not is_adapter_format(loop.cfg):
        return None
    try:
        served_base(loop.cfg)
    except ServedBaseUnavailable as exc:
        message = f"v{version.id} trains on the base's own weights, not as it serves: {exc}"
        loop.store.add_event("base_as_is", "tuneship", message, {}, version.id)
        return None
    return Run.of(loop.cfg).deployed_quant


def challenger_config(
    base: Config, run_name: str, champion_run: Path, data: CycleData, train_on_quant: str | None = None
) -> Config:
    """The challenger's run: the new and replayed examples, warm-started from the champion's adapter, on the base
    as `train_on_quant` serves it when given (in adapter format)."""
    cfg = base.model_copy(deep=True)
    cfg.run.name = run_name
    cfg.model.train_on_quant = train_on_quant
    cfg.model.adapter_from = str(champion_run)
    cfg.train.objective = base.loop.objective
    cfg.data.sources = [str(data.train)]
    cfg.data.format = "messages"
    cfg.data.columns = {}
    cfg.data.eval_ratio = 0.0
    cfg.eval.prompts = data.golden if data.golden.stat().st_size else None
    cfg.eval.train_prompts = max(cfg.eval.train_prompts, data.gate_asked, 1)  # the gate's, answered at export
    cfg.deploy.target = "none"
    cfg.train.stop_when_learned = True  # the epochs are the budget: a cycle stops once its examples are learned
    cfg.train.train_layers = cycle_train_layers(base)
    cfg.eval.generate = False  # that check was PyTorch's answers; what serves answers at export, in llama.cpp
    if is_adapter_format(base):  # the LoRA GGUF, checked on the base quant
        cfg.export.merge = False
    else:  # the merged quant that serves (`tuneship loop publish --merged` makes them all)
        cfg.export.quants = [quant for quant in cfg.export.quants if quant == Run.of(cfg).deployed_quant]
    return cfg


def cycle_train_layers(cfg: Config) -> float:
    """loop.train_layers, or by the version format: in adapter format the top half of the layers train (the LoRA
    stays f16 on the champion's base quant); merged, all of them (a delta concentrated in half the layers, merged and
    quantized with their weights, lost a learned correction on the quant in 2 of 2 runs on SmolLM2)."""
    if cfg.loop.train_layers is not None:
        return cfg.loop.train_layers
    return 0.5 if is_adapter_format(cfg) else 1.0


def failed_stage(cfg: Config) -> str:
    """The stage of the challenger's run that failed last (its manifest)."""
    failed = [name for name, entry in Run.of(cfg).manifest().items() if entry.status == "failed"]
    return failed[-1] if failed else "pipeline"


# few-shot -------------------------------------------------------------------------------------


def fewshot_cycle(
    loop: Loop, console: Console, heartbeat: Heartbeat, actor: str, reason: str, live_url: str | None
) -> CycleResult:
    """Harvest, choose shots, register the candidate (the champion's run + shots), gate it, then promote or
    reject it as any challenger."""
    store = loop.store
    champion = in_adapter_form(loop, store.champion())
    heartbeat.stage("harvest")
    chat_format = version_chat_format(champion)
    harvest(store, loop.cfg, chat_format.measure)
    if actor == "trigger":  # by hand, a few-shot candidate is asked for: it is made
        _give_way_to_finetune(loop)
    choice = select_shots(loop, champion, chat_format)
    store.add_event(SELECTED_EVENT, actor, choice.summary(), choice.to_json())
    if not choice.shots:
        raise NothingToTrain(
            f"no correction to use as a few-shot example: {choice.summary()}"
            + ("; raise loop.fast_path_budget or serve.n_ctx" if choice.left_out else "; post corrections first")
        )
    version = _register_candidate(loop, champion, choice)
    store.add_event(
        "cycle_started",
        actor,
        reason,
        {
            "kind": "fewshot",
            "shots": len(choice.example_ids),
            "tokens": choice.tokens,
            "modelfile": fewshot_modelfile(loop, version),
        },
        version.id,
    )
    heartbeat.stage("gate", version.id)
    decision = run_gate(champion, version, gate_sets(store, version), loop.cfg, _answers_folder(loop))
    return conclude(loop, heartbeat, version, decision, actor, live_url)


def _give_way_to_finetune(loop: Loop) -> None:
    """A few-shot candidate the trigger started is not made when, with what was harvested since, a fine-tune cycle
    is due: corrections that come in a burst start the fine-tune as soon as this process ends (NothingToTrain
    records no failure, so no backoff follows)."""
    due_because, _ = finetune_due(loop.store, loop.cfg.loop)
    if due_because is not None:
        raise NothingToTrain(f"no few-shot candidate: a fine-tune cycle is due ({due_because})")


def _register_candidate(loop: Loop, champion: Version, choice: ShotChoice) -> Version:
    version_id = loop.store.next_version_id()
    metrics = {
        "new_examples": choice.example_ids,
        "replay_examples": replay_sample(loop.store, loop.cfg.loop, set(choice.example_ids), version_id),
        "fewshot": {k: v for k, v in choice.to_json().items() if k not in ("shots", "considered")},
    }
    return loop.store.add_version(
        id=version_id,
        name=loop.version_name(version_id),
        parent_id=champion.id,
        run_dir=champion.run_dir,
        gguf=champion.gguf,
        adapter=champion.adapter,
        artifacts=champion.artifacts,  # the same files: published already when the champion was
        status="candidate",
        kind="fewshot",
        shots=choice.shots,
        example_ids=choice.example_ids,
        metrics=metrics,
    )


# conclusion -----------------------------------------------------------------------------------


def conclude(
    loop: Loop, heartbeat: Heartbeat, version: Version, decision: GateDecision, actor: str, live_url: str | None
) -> CycleResult:
    """After the gate: record the decision; reject, or promote and smoke-test (restoring the previous champion
    when the smoke test fails)."""
    store = loop.store
    version = store.update_version(version.id, metrics={**version.metrics, "gate": decision.metrics})
    data = {"promoted": decision.is_promoted, **decision.metrics, "regressed": decision.regressed}
    store.add_event("gated", actor, "; ".join(decision.reasons), data, version.id)
    drop_checkpoints(loop, version)
    if loop.cfg.loop.artifacts_url and _has_files(version):  # replicas elsewhere serve it (promoted now or by hand
        heartbeat.stage("publish", version.id)  # later) from there: its files go before it can be champion
        version = publish_artifacts(loop, version)
    if not decision.is_promoted:
        store.update_version(version.id, status="rejected")
        blamed = hold_blamed(loop, version, decision) if version.kind == "finetune" else {}
        waiting = len(version.metrics["new_examples"]) - len(blamed)
        store.add_event(
            "cycle_finished",
            actor,
            f"challenger rejected by the gate; {len(blamed)} examples blamed wait for review, {waiting} wait for "
            "the next cycle",
            {},
            version.id,
        )
        return CycleResult(version.id, "rejected", decision.reasons)
    used = version.metrics["new_examples"] + version.metrics["replay_examples"] if version.kind == "finetune" else []
    heartbeat.stage("promote", version.id)
    why = "won the gate: " + "; ".join(decision.reasons)
    try:
        promote_version(loop, version.id, actor, why, version.parent_id, used)
    except StaleChampion as exc:
        return _stale(loop, version, actor, str(exc))
    smoke = smoke_problems(loop, version.id, live_url)
    if smoke:
        try:
            why = f"smoke test of v{version.id} failed: " + "; ".join(smoke)
            restored = restore_previous(loop, "smoke-test", why, champion=version.id)
        except StaleChampion as exc:  # replaced by hand meanwhile: that move stands
            store.add_event("cycle_finished", actor, f"v{version.id} failed its smoke test; {exc}", {}, version.id)
            return CycleResult(version.id, "stale", smoke)
        store.add_event(
            "cycle_finished", actor, f"v{version.id} failed its smoke test; v{restored.id} restored", {}, version.id
        )
        return CycleResult(version.id, "rolled_back", smoke)
    store.add_event("cycle_finished", actor, f"v{version.id} promoted", {}, version.id)
    return CycleResult(version.id, "promoted", decision.reasons)


def _has_files(version: Version) -> bool:
    """Exported: a version rejected by its own eval or export gates may have no GGUF to publish."""
    return bool(version.gguf) and Path(version.gguf).is_file()


def _stale(loop: Loop, version: Version, actor: str, why: str) -> CycleResult:
    """The champion moved while the cycle ran (a manual promote or rollback): the challenger is not promoted over
    it; rejected, its examples wait for the next cycle."""
    loop.store.update_version(version.id, status="rejected", metrics={**version.metrics, "stale": why})
    reason = f"stale: {why}; not promoted, its examples wait for the next cycle"
    loop.store.add_event("cycle_finished", actor, reason, {"stale": True}, version.id)
    return CycleResult(version.id, "stale", [reason])
