"""Per-client trust: a client (the name of its key; "anonymous" without keys) whose examples were blamed for a
rejected cycle or rejected in review `loop.distrust_after` times has its new feedback held for review. The admin
never is. Counted from the events that record those decisions ("blamed", "rejected"), so nothing extra is stored
and a review that approves a blamed example does not count against its client."""

from __future__ import annotations

from collections import Counter

from tuneship.loop.store import Store
from tuneship.loop.tables import Example

TRUSTED = "admin"


def example_client(example: Example) -> str:
    return (example.provenance or {}).get("client", "anonymous")


def strikes(store: Store) -> Counter:
    """client -> how many of its SFT examples were blamed or rejected in review."""
    struck: set[str] = set()
    for event in store.events(limit=100_000, kind="blamed"):
        struck |= set(event.data.get("examples", {}))
    approved: set[str] = set()
    for event in store.events(limit=100_000, kind="approved"):
        approved |= set(event.data.get("ids", []))
    for event in store.events(limit=100_000, kind="rejected"):
        struck |= set(event.data.get("ids", []))
    by_id = {e.id: e for e in store.examples() if e.kind == "sft"}
    return Counter(example_client(by_id[i]) for i in struck - approved if i in by_id)


def hold_distrusted(store: Store, new: list[Example], distrust_after: int) -> int:
    """Mark the new examples of distrusted clients as pending review, with the reason; returns how many
    generations' examples were held."""
    if not new:  # every trigger tick harvests; most find nothing
        return 0
    counts = strikes(store)
    held: set[str] = set()
    for example in new:
        client = example_client(example)
        if client != TRUSTED and counts[client] >= distrust_after and example.status == "accepted":
            example.status = "pending_review"
            example.reason = (
                f"from client {client!r}, whose examples were blamed or rejected {counts[client]} times "
                f"(loop.distrust_after={distrust_after}): its feedback waits for review"
            )
            held.add(example.provenance.get("generation", example.id))
    return len(held)
