"""A rejected batch is not consumed: when the gate rejects a fine-tuned challenger, its new examples return to
waiting, except those the cycle can blame for the rejection, which wait for review with the gate's numbers.

How an example is blamed:
- its answer leaked into a regressed answer: the challenger now answers a fact it used to get right with words
  closer to this example's answer (token F1 >= LEAK_MIN_F1) than to the fact's own answer;
- or it was in `loop.max_blame_cycles` rejected cycles with nothing else to blame.

The examples a blamed one was made with (the DPO pair and KTO answers of the same generation) wait with it, so no
objective trains it behind the reviewer's back. The next cycle retries the rest (trigger.py).
"""

from __future__ import annotations

from collections import Counter

from tuneship.evaluate.checks import token_f1
from tuneship.loop.examples import examples_by_id
from tuneship.loop.gate import GateDecision
from tuneship.loop.registry import Loop
from tuneship.loop.store import Store
from tuneship.loop.tables import Example, Version

LEAK_MIN_F1 = 0.5


def rejected_cycles(store: Store) -> Counter:
    """example id -> how many rejected fine-tuned versions trained on it as a new example."""
    rejected = [v for v in store.versions() if v.kind == "finetune" and v.status == "rejected"]
    return Counter(example_id for v in rejected for example_id in set(v.metrics.get("new_examples", [])))


def leaked_into(example: Example, regressed: list[dict]) -> dict | None:
    """The first regressed answer this example's answer leaked into, if any."""
    answer = example.conversation["messages"][-1]["content"]
    for prompt in regressed:
        closeness = token_f1(prompt["challenger"], answer)
        if closeness >= LEAK_MIN_F1 and closeness > token_f1(prompt["challenger"], prompt["expected"]):
            return prompt
    return None


def blame_reasons(loop: Loop, version: Version, regressed: list[dict], gate_reasons: list[str]) -> dict[str, str]:
    """{example id: why it is blamed} for the new examples of a rejected version."""
    gate = "; ".join(gate_reasons)
    limit = loop.cfg.loop.max_blame_cycles
    cycles = rejected_cycles(loop.store)
    reasons = {}
    for example in examples_by_id(loop.store, version.metrics["new_examples"]):
        leak = leaked_into(example, regressed)
        if leak:
            reasons[example.id] = (
                f"blamed for the rejection of v{version.id}: the challenger answered {leak['question']!r} with "
                f"{leak['challenger']!r}, closer to this answer than to the expected {leak['expected']!r} "
                f"(gate: {gate})"
            )
        elif cycles[example.id] >= limit:
            reasons[example.id] = (
                f"in {cycles[example.id]} rejected cycles (loop.max_blame_cycles={limit}) with nothing else to "
                f"blame; last gate of v{version.id}: {gate}"
            )
    return reasons


def hold_blamed(loop: Loop, version: Version, decision: GateDecision) -> dict[str, str]:
    """After a rejection (the version already "rejected"): the blamed examples, and those made with them, wait for
    review; the rest return to waiting. Records the blame on the version and as a "blamed" event."""
    store = loop.store
    reasons = blame_reasons(loop, version, decision.regressed, decision.reasons)
    for example_id, reason in _with_siblings(store, reasons).items():
        store.set_example_status([example_id], "pending_review", reason)
    store.update_version(version.id, metrics={**store.version(version.id).metrics, "blamed": reasons})
    if reasons:
        store.add_event(
            "blamed",
            "tuneship",
            f"{len(reasons)} of v{version.id}'s {len(version.metrics['new_examples'])} new examples wait for review",
            {"examples": reasons, "regressed": decision.regressed, "gate": decision.metrics.get("verdicts", {})},
            version.id,
        )
    return reasons


def _with_siblings(store: Store, reasons: dict[str, str]) -> dict[str, str]:
    """The blamed examples and the accepted ones made from the same generation, each with the blame's reason."""
    by_generation = {}
    for example in examples_by_id(store, list(reasons)):
        generation = (example.provenance or {}).get("generation")
        if generation:
            by_generation[generation] = reasons[example.id]
    siblings = {
        e.id: by_generation[e.provenance["generation"]]
        for e in store.examples(status="accepted")
        if (e.provenance or {}).get("generation") in by_generation
    }
    return {**siblings, **reasons}
