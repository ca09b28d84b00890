"""Which examples a cycle trains and checks: those waiting, the replay sample, the golden set, the gate's sets.

Examples are keyed by prompt (`prompt_key`): of two answers to one prompt, the newer supersedes the older.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from tuneship.config import LoopSection
from tuneship.data.conversation import Conversation, write_jsonl
from tuneship.evaluate.prompts import EvalPrompt
from tuneship.loop.store import Store
from tuneship.loop.tables import Example, ExampleKind, Version

GATE_REPLAY_LIMIT = 20
# What a cycle replays per loop.objective: dpo earlier pairs; sft and kto earlier SFT examples (to KTO, a record
# without a label is a desirable answer).
REPLAY_KIND: dict[str, ExampleKind] = {"sft": "sft", "dpo": "dpo", "kto": "sft"}


def prompt_key(conversation: dict) -> str:
    return json.dumps([conversation.get("system"), conversation["messages"][:-1]], ensure_ascii=False)


def latest_per_prompt(examples: list[Example]) -> tuple[list[Example], list[Example]]:
    """(current, superseded): for each prompt the last of `examples` (oldest first) answers it."""
    last = {prompt_key(e.conversation): e.id for e in examples}
    current_ids = set(last.values())
    return [e for e in examples if e.id in current_ids], [e for e in examples if e.id not in current_ids]


def waiting_examples(store: Store, objective: ExampleKind = "sft") -> list[Example]:
    """New accepted training examples no version has trained on yet (selected by the database)."""
    return store.examples(status="accepted", split="train", unused=True, kind=objective)


def waiting_count(store: Store, objective: ExampleKind = "sft") -> int:
    """How many examples `waiting_examples` returns, counted by the database."""
    return store.count_examples(status="accepted", split="train", unused=True, kind=objective)


def current_waiting(store: Store, objective: str) -> list[Example]:
    """The waiting examples; of two SFT answers to one prompt (two corrections) only the newer is trained, the
    older is marked "superseded" with the reason (counted, not lost)."""
    waiting = waiting_examples(store, objective)
    if objective != "sft":
        return waiting
    current, superseded = latest_per_prompt(waiting)
    if superseded:
        store.set_example_status([e.id for e in superseded], "superseded", "a newer example answers the same prompt")
    return current


def examples_by_id(store: Store, ids: list[str]) -> list[Example]:
    wanted = set(ids)
    return [e for e in store.examples() if e.id in wanted]


def golden(store: Store) -> list[Example]:
    """The golden set: SFT examples (their DPO and KTO twins are held out with them, never expected answers)."""
    return store.examples(status="accepted", split="golden", kind="sft")


def golden_count(store: Store) -> int:
    return store.count_examples(status="accepted", split="golden", kind="sft")


def learned_facts(store: Store, new: set[str], kind: ExampleKind = "sft") -> list[Example]:
    """Earlier examples of `kind` that a promoted version trained on and that still hold: an example whose prompt
    a newer one (trained, or waiting to be) answers is left out (a correction supersedes what it corrects;
    replaying the old answer would train both), so are golden facts and the examples of rejected versions."""
    promoted = {v.id for v in store.versions() if v.status in ("champion", "retired")}
    golden_ids = {e.id for e in golden(store)}  # a retired golden fact's training twin is replayed again
    accepted = store.examples(status="accepted", split="train")
    learned = [e for e in accepted if e.kind == kind and set(e.used_in) & promoted and e.id not in new]
    waiting = [e for e in accepted if e.id in new or (e.kind == kind and not e.used_in)]  # trained next
    current, _ = latest_per_prompt(learned + waiting)
    return [e for e in current if e.id not in new and f"golden-{e.id}" not in golden_ids]


def replay_kind(store: Store, new: set[str]) -> ExampleKind:
    """What the new examples' kind replays: the objective's REPLAY_KIND for a cycle's examples; SFT for the
    few-shot fast path's corrections, whatever loop.objective."""
    kinds = {e.kind for e in store.examples() if e.id in new}
    return REPLAY_KIND[kinds.pop()] if len(kinds) == 1 else "sft"


def replay_sample(store: Store, settings: LoopSection, new: set[str], seed: int) -> list[str]:
    """Earlier examples to train on again, from what the champion learned (of the new examples' REPLAY_KIND):
    `loop.replay_ratio` per new one but at least `loop.min_replay` (a small knowledge base is replayed whole: a
    few new facts trained alone for many epochs bleed into the old answers)."""
    pool = sorted(e.id for e in learned_facts(store, new, replay_kind(store, new)))
    count = min(len(pool), max(round(settings.replay_ratio * len(new)), settings.min_replay))
    return sorted(random.Random(seed).sample(pool, count))


def forgetting_check(store: Store, version: Version) -> list[Example]:
    """Up to GATE_REPLAY_LIMIT earlier facts, first those this cycle did not replay: a replayed fact was just
    trained again, only the others show what the challenger forgot."""
    learned = learned_facts(store, set(version.metrics["new_examples"]))
    replayed = set(version.metrics["replay_examples"])
    not_replayed = [e for e in learned if e.id not in replayed]
    picked = random.Random(version.id).sample(not_replayed, min(len(not_replayed), GATE_REPLAY_LIMIT))
    return picked + [e for e in learned if e.id in replayed][: GATE_REPLAY_LIMIT - len(picked)]


def gate_examples_known_ahead(store: Store, settings: LoopSection) -> list[Example]:
    """What the next fine-tune cycle's gate asks the champion whatever its new examples turn out to be: the golden
    set and, where the earlier facts are few enough to be replayed whole (`loop.min_replay`), the ones its
    forgetting check takes (the first GATE_REPLAY_LIMIT: with every fact replayed, none is left to draw from)."""
    learned = learned_facts(store, set())
    return golden(store) + (learned[:GATE_REPLAY_LIMIT] if len(learned) <= settings.min_replay else [])


def prompts_from(examples: list[Example]) -> list[EvalPrompt]:
    """Examples as eval prompts, their last answer the expected one."""
    prompts = []
    for example in examples:
        conversation = Conversation.from_json(example.conversation)
        prompts.append(EvalPrompt(example.id, "loop", conversation, conversation.messages[-1].content))
    return prompts


def gate_examples(store: Store, version: Version) -> dict[str, list[Example]]:
    """What the gate asks: golden, replay (earlier facts) and new (this cycle's, KTO negatives left out)."""
    new = [e for e in examples_by_id(store, version.metrics["new_examples"]) if e.label is not False]
    return {"golden": golden(store), "replay": forgetting_check(store, version), "new": new}


def gate_sets(store: Store, version: Version) -> dict[str, list[EvalPrompt]]:
    return {name: prompts_from(examples) for name, examples in gate_examples(store, version).items()}


@dataclass
class CycleData:
    """A fine-tune cycle's files. train.jsonl starts with the `gate_asked` training examples the gate will ask
    about (new, then the replayed facts it checks), so the export answers them as the version serves (its first
    eval.train_prompts examples) and the gate reuses those answers (cycle.py)."""

    train: Path
    golden: Path
    gate_asked: int


def write_cycle_data(store: Store, version: Version, folder: Path) -> CycleData:
    """<folder>/train.jsonl (new + replay) and golden.jsonl, as `messages` records."""
    folder.mkdir(parents=True, exist_ok=True)
    train = examples_by_id(store, version.metrics["new_examples"] + version.metrics["replay_examples"])
    sets = gate_examples(store, version)
    asked = {e.id for e in sets["new"] + sets["replay"]}
    train.sort(key=lambda e: e.id not in asked)  # stable: otherwise in their order
    write_jsonl(folder / "train.jsonl", (e.to_record() for e in train))
    write_jsonl(folder / "golden.jsonl", (e.to_record() for e in sets["golden"]))
    return CycleData(folder / "train.jsonl", folder / "golden.jsonl", sum(e.id in asked for e in train))
