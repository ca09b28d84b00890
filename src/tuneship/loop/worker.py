"""One cycle of the loop, run in its own process (`tuneship loop cycle`), under the store's lease:

lease -> harvest feedback -> examples (new + replay sample; golden held out) -> challenger run through the
pipeline (cycle.py), or on the fast path a few-shot candidate (fewshot.py) -> gate in llama.cpp vs the champion
-> promote (Ollama `name:v<N>` + `name:latest`) -> smoke test on the live path -> automatic restore of the
previous champion when it fails.

A heartbeat thread renews the lease; a worker killed with -9 stops renewing, so the lease expires and the
next cycle takes over. A version left in status "training" is resumed with exactly its own examples (the run
resumes from its last checkpoint), and examples are marked used only when their cycle ends: none is lost or
counted twice.
"""

from __future__ import annotations

import json
import os
import random
import socket
import threading
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

from tuneship.data.conversation import write_jsonl
from tuneship.errors import TuneshipError
from tuneship.loop.cycle import challenger_config, publish_to_ollama, train_challenger, version_gguf
from tuneship.loop.fewshot import fewshot_cycle, prompts_with_shots, publish_config
from tuneship.loop.gate import prompts_from, run_gate
from tuneship.loop.models import VersionKind
from tuneship.loop.registry import Loop, RegistryError, promote, require_servable, rollback
from tuneship.loop.signals import example_record, harvest
from tuneship.loop.trigger import CYCLE_LEASE, waiting_examples

GATE_REPLAY_LIMIT = 20
# What a cycle replays per loop.objective: dpo earlier pairs; sft and kto earlier SFT examples (to KTO, a record
# without a label is a desirable answer).
REPLAY_KIND = {"sft": "sft", "dpo": "dpo", "kto": "sft"}


class CycleBusy(TuneshipError):
    """Another cycle holds the lease."""


class NothingToTrain(TuneshipError):
    """No new accepted examples wait for a cycle."""


@dataclass
class CycleResult:
    version_id: int
    status: str
    reasons: list[str]


class Heartbeat(threading.Thread):
    """Renews the lease every third of its length; `stage()` records where the cycle is."""

    def __init__(self, loop: Loop, holder: str):
        super().__init__(daemon=True, name="lease-heartbeat")
        self.loop, self.holder = loop, holder
        self.seconds = loop.cfg.loop.lease_seconds
        self.stopped = threading.Event()
        self.fields: dict = {}

    def stage(self, stage: str, version_id: int | None = None) -> None:
        self.fields = {"stage": stage, **({"version_id": version_id} if version_id else {})}
        self.loop.store.renew_lease(CYCLE_LEASE, self.holder, self.seconds, **self.fields)

    def run(self) -> None:
        while not self.stopped.wait(self.seconds / 3):
            self.loop.store.renew_lease(CYCLE_LEASE, self.holder, self.seconds, **self.fields)


def run_cycle(
    loop: Loop,
    console,
    actor: str = "cli",
    reason: str = "by hand",
    live_url: str | None = None,
    kind: VersionKind = "finetune",
):
    """One cycle under the lease: a fine-tuned challenger, or (kind "fewshot") the fast path's few-shot candidate."""
    require_servable(loop.store.champion())
    holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    if not loop.store.acquire_lease(CYCLE_LEASE, holder, loop.cfg.loop.lease_seconds, stage="starting"):
        lease = loop.store.lease(CYCLE_LEASE)
        raise CycleBusy(f"a cycle is already running ({lease.holder if lease else '?'}); try again when it ends")
    heartbeat = Heartbeat(loop, holder)
    heartbeat.start()
    try:
        body = fewshot_cycle if kind == "fewshot" else _cycle
        return body(loop, console, heartbeat, actor, reason, live_url)
    except NothingToTrain:
        raise
    except Exception as exc:  # any failure is recorded, so the trigger backs off instead of retrying at once
        lease = loop.store.lease(CYCLE_LEASE)
        version_id = lease.version_id if lease else None
        if version_id is not None:
            loop.store.update_version(version_id, status="failed")
        loop.store.add_event("cycle_failed", actor, f"{type(exc).__name__}: {exc}", {}, version_id)
        raise
    finally:
        heartbeat.stopped.set()
        loop.store.release_lease(CYCLE_LEASE, holder)


def _cycle(loop: Loop, console, heartbeat: Heartbeat, actor: str, reason: str, live_url: str | None):
    from tuneship.chat.format import ChatFormat

    store = loop.store
    champion = store.champion()
    heartbeat.stage("harvest")
    harvest(store, loop.cfg, ChatFormat.load(Path(champion.run_dir) / "adapter").measure)
    version = _resume_or_new_version(loop, champion)
    heartbeat.stage("train", version.id)
    store.add_event(
        "cycle_started",
        actor,
        reason,
        {"new": len(version.metrics["new_examples"]), "replay": len(version.metrics["replay_examples"])},
        version.id,
    )
    run_dir = Path(version.run_dir)
    cfg = challenger_config(loop.cfg, version.name, Path(champion.run_dir), *_write_cycle_data(loop, version))
    failure = train_challenger(cfg, console)
    if failure:
        store.update_version(version.id, status="failed")
        store.add_event("cycle_failed", actor, failure, {}, version.id)
        return CycleResult(version.id, "failed", [failure])
    version = store.update_version(version.id, status="candidate", gguf=str(version_gguf(cfg, run_dir)))
    heartbeat.stage("gate", version.id)
    decision = run_gate(champion, version, gate_sets(loop, version), loop.cfg)
    store.mark_used(version.metrics["new_examples"] + version.metrics["replay_examples"], version.id)
    return conclude(loop, heartbeat, version, decision, actor, live_url)


def conclude(loop: Loop, heartbeat: Heartbeat, version, decision, actor: str, live_url: str | None) -> CycleResult:
    """After the gate: record the decision; reject, or promote and smoke-test (restoring the previous champion
    when the smoke test fails)."""
    store = loop.store
    store.update_version(version.id, metrics={**version.metrics, "gate": decision.metrics})
    store.add_event(
        "gated", actor, "; ".join(decision.reasons), {"promoted": decision.is_promoted, **decision.metrics}, version.id
    )
    if not decision.is_promoted:
        store.update_version(version.id, status="rejected")
        store.add_event("cycle_finished", actor, "challenger rejected by the gate", {}, version.id)
        return CycleResult(version.id, "rejected", decision.reasons)
    heartbeat.stage("promote", version.id)
    promote_version(loop, version.id, actor, "won the gate: " + "; ".join(decision.reasons))
    smoke = smoke_test(loop, version.id, live_url)
    if smoke:
        restored = restore_previous(loop, "smoke-test", f"smoke test of v{version.id} failed: " + "; ".join(smoke))
        store.add_event(
            "cycle_finished", actor, f"v{version.id} failed its smoke test; v{restored.id} restored", {}, version.id
        )
        return CycleResult(version.id, "rolled_back", smoke)
    store.add_event("cycle_finished", actor, f"v{version.id} promoted", {}, version.id)
    return CycleResult(version.id, "promoted", decision.reasons)


def _resume_or_new_version(loop: Loop, champion):
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
    new = [e.id for e in _current_waiting(store, objective)]
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
        metrics={"new_examples": new, "replay_examples": replay_sample(loop, set(new), version_id)},
    )


def _current_waiting(store, objective: str) -> list:
    """The waiting examples; of two SFT answers to one prompt (two corrections) only the newer is trained, the
    older is marked "superseded" with the reason (counted, not lost)."""
    waiting = waiting_examples(store, objective)
    if objective != "sft":
        return waiting
    current, superseded = latest_per_prompt(waiting)
    if superseded:
        store.set_example_status([e.id for e in superseded], "superseded", "a newer example answers the same prompt")
    return current


def replay_sample(loop: Loop, new: set[str], seed: int) -> list[str]:
    """Earlier examples to train on again, from what the champion learned (of the new examples' REPLAY_KIND):
    `loop.replay_ratio` per new one but at least `loop.min_replay` (a small knowledge base is replayed whole: a
    few new facts trained alone for many epochs bleed into the old answers)."""
    pool = sorted(e.id for e in _learned_facts(loop, new, _replay_kind(loop, new)))
    settings = loop.cfg.loop
    count = min(len(pool), max(round(settings.replay_ratio * len(new)), settings.min_replay))
    return sorted(random.Random(seed).sample(pool, count))


def _replay_kind(loop: Loop, new: set[str]) -> str:
    """What the new examples' kind replays: the objective's REPLAY_KIND for a cycle's examples; SFT for the
    few-shot fast path's corrections, whatever loop.objective."""
    kinds = {e.kind for e in loop.store.examples() if e.id in new}
    return REPLAY_KIND[kinds.pop()] if len(kinds) == 1 else "sft"


def _golden(loop: Loop) -> list:
    """The golden set: SFT examples (their DPO and KTO twins are held out with them, never expected answers)."""
    return [e for e in loop.store.examples(status="accepted", split="golden") if e.kind == "sft"]


def _learned_facts(loop: Loop, new: set[str], kind: str = "sft") -> list:
    """Earlier examples of `kind` that a promoted version trained on and that still hold: an example whose prompt
    a newer one answers is left out (a correction supersedes what it corrects; replaying the old answer would
    train both), so are golden facts (never trained on again) and the examples of rejected versions."""
    store = loop.store
    promoted = {v.id for v in store.versions() if v.status in ("champion", "retired")}
    golden = {e.id for e in store.examples(split="golden")}
    accepted = store.examples(status="accepted", split="train")
    learned = [e for e in accepted if e.kind == kind and set(e.used_in) & promoted and e.id not in new]
    current, _ = latest_per_prompt(learned + [e for e in accepted if e.id in new])
    return [e for e in current if e.id not in new and f"golden-{e.id}" not in golden]


def prompt_key(conversation: dict) -> str:
    return json.dumps([conversation.get("system"), conversation["messages"][:-1]], ensure_ascii=False)


def latest_per_prompt(examples: list) -> tuple[list, list]:
    """(current, superseded): for each prompt the last of `examples` (oldest first) answers it."""
    last = {prompt_key(e.conversation): e.id for e in examples}
    current_ids = set(last.values())
    return [e for e in examples if e.id in current_ids], [e for e in examples if e.id not in current_ids]


def _examples_by_id(loop: Loop, ids: list[str]) -> list:
    wanted = set(ids)
    return [e for e in loop.store.examples() if e.id in wanted]


def _write_cycle_data(loop: Loop, version) -> tuple[Path, Path]:
    """<run.dir>/<name>-loop/v<N>/train.jsonl (new + replay) and golden.jsonl, as `messages` records."""
    folder = Path(loop.cfg.run.dir).resolve() / f"{loop.name}-loop" / f"v{version.id}"
    folder.mkdir(parents=True, exist_ok=True)
    train = _examples_by_id(loop, version.metrics["new_examples"] + version.metrics["replay_examples"])
    golden = _golden(loop)
    write_jsonl(folder / "train.jsonl", (example_record(e) for e in train))
    write_jsonl(folder / "golden.jsonl", (example_record(e) for e in golden))
    return folder / "train.jsonl", folder / "golden.jsonl"


def gate_sets(loop: Loop, version) -> dict[str, list]:
    golden = _golden(loop)
    new = [e for e in _examples_by_id(loop, version.metrics["new_examples"]) if e.label is not False]  # KTO negatives
    replay = _forgetting_check(loop, version)
    return {"golden": prompts_from(golden), "replay": prompts_from(replay), "new": prompts_from(new)}


def _forgetting_check(loop: Loop, version) -> list:
    """Up to GATE_REPLAY_LIMIT earlier facts, first those this cycle did not replay: a replayed fact was just
    trained again, only the others show what the challenger forgot."""
    learned = _learned_facts(loop, set(version.metrics["new_examples"]))
    replayed = set(version.metrics["replay_examples"])
    not_replayed = [e for e in learned if e.id not in replayed]
    picked = random.Random(version.id).sample(not_replayed, min(len(not_replayed), GATE_REPLAY_LIMIT))
    return picked + [e for e in learned if e.id in replayed][: GATE_REPLAY_LIMIT - len(picked)]


# promotion, Ollama, smoke test ----------------------------------------------------------------


def ollama_names(loop: Loop, version_id: int) -> tuple[str, str]:
    name = loop.cfg.deploy.name or loop.name
    return f"{name}:v{version_id}", f"{name}:latest"


def promote_version(loop: Loop, version_id: int, actor: str, reason: str):
    """Move the champion alias; with the Ollama backend also create `name:v<N>` and point `name:latest` at it."""
    if loop.cfg.serve.backend == "ollama":
        _publish(loop, version_id, both=True)
    return promote(loop, version_id, actor, reason)


def restore_previous(loop: Loop, actor: str, reason: str):
    """Roll back to the previous champion (and `name:latest` with it in Ollama)."""
    restored = rollback(loop, actor, reason)
    if loop.cfg.serve.backend == "ollama":
        _publish(loop, restored.id, both=False)
    return restored


def _publish(loop: Loop, version_id: int, both: bool) -> None:
    version = loop.store.version(version_id)
    if version is None:
        raise RegistryError(f"no version {version_id}; see `tuneship loop versions`")
    tagged, latest = ollama_names(loop, version_id)
    version_cfg = publish_config(loop, version)
    lines = publish_to_ollama(version_cfg, Path(version.run_dir), [tagged, latest] if both else [latest])
    loop.store.add_event("published", "tuneship", "; ".join(lines), {"names": [tagged, latest]}, version_id)


def smoke_test(loop: Loop, version_id: int, live_url: str | None) -> list[str]:
    """Golden (else new) prompts through the live path: the running server when `live_url` is given (the answer
    must come from the new version), else what serves without it (Ollama's `name:latest`, or the champion's GGUF
    in llama.cpp). Returns the problems (empty: passed)."""
    version = loop.store.version(version_id)
    examples = _golden(loop) or _examples_by_id(loop, version.metrics.get("new_examples", []))
    problems = []
    for prompt in prompts_from(examples[: loop.cfg.loop.smoke_prompts]):
        messages = prompt.conversation.prompt_messages()
        try:
            answer = _ask_live(live_url, loop, messages) if live_url else _ask_directly(loop, version, prompt)
        except (TuneshipError, OSError, KeyError) as exc:
            problems.append(f"{prompt.question!r}: {exc}")
            continue
        if answer["version"] != version_id:
            problems.append(f"{prompt.question!r}: answered by v{answer['version']}, not v{version_id}")
        elif answer["finish_reason"] != "stop" or not answer["text"].strip():
            problems.append(f"{prompt.question!r}: finish {answer['finish_reason']!r}, answer {answer['text']!r}")
    return problems


def _ask_live(live_url: str, loop: Loop, messages: list[dict]) -> dict:
    body = json.dumps({"model": loop.name, "messages": messages, "max_tokens": loop.cfg.eval.max_new_tokens})
    request = urllib.request.Request(
        live_url.rstrip("/") + "/v1/chat/completions", body.encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=loop.cfg.serve.timeout) as response:
        reply = json.loads(response.read())
    choice = reply["choices"][0]
    return {
        "version": reply["tuneship"]["version"],
        "finish_reason": choice["finish_reason"],
        "text": choice["message"]["content"],
    }


def _ask_directly(loop: Loop, version, prompt) -> dict:
    if loop.cfg.serve.backend == "ollama":
        from tuneship.deploy.ollama import OllamaClient

        options = {"temperature": 0, "seed": 0, "num_predict": loop.cfg.eval.max_new_tokens}
        reply = OllamaClient(loop.cfg.deploy.host).chat(
            ollama_names(loop, version.id)[1], prompt.conversation.prompt_messages(), options
        )
        finish = "stop" if reply.get("done_reason") == "stop" else "length"
        return {"version": version.id, "finish_reason": finish, "text": (reply.get("message") or {}).get("content", "")}
    from tuneship.chat.format import ChatFormat
    from tuneship.evaluate.backends import gguf_answers

    chat_format = ChatFormat.load(Path(version.run_dir) / "adapter")
    [answer], _ = gguf_answers(
        Path(version.gguf), chat_format, prompts_with_shots([prompt], version.shots), loop.cfg.eval.max_new_tokens
    )
    return {"version": version.id, "finish_reason": "stop" if answer.stopped else "length", "text": answer.text}
