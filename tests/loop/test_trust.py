"""Per-client trust: a client whose examples were blamed or rejected `loop.distrust_after` times has its new
feedback held for review; the others' and the admin's go straight in."""

from tests.loop.test_cli import shop_loop
from tests.loop.test_store import add_generation
from tuneship.loop.approval import review_examples
from tuneship.loop.signals import harvest


def send(loop, client: str, index: int) -> None:
    generation_id = f"gen-{client}-{index}"
    add_generation(loop.store, generation_id, answer="I do not know.", question=f"New question {client} {index}?")
    loop.store.add_feedback(generation_id, "down", f"Answer {client} {index}.", None, client=client)


def sft_of(loop, client: str) -> list:
    return [e for e in loop.store.examples() if e.kind == "sft" and e.provenance.get("client") == client]


def test_a_client_whose_corrections_keep_being_rejected_is_held_for_review(tmp_path):
    loop = shop_loop(tmp_path, 3)
    loop.cfg.loop.distrust_after = 2
    for index in range(2):
        send(loop, "spammer", index)
        send(loop, "shop", index)
    harvest(loop.store, loop.cfg)
    assert {e.status for e in sft_of(loop, "spammer")} == {"accepted"}
    rejected = [e.id for e in sft_of(loop, "spammer")]
    loop.store.set_example_status(rejected, "pending_review", "sent to review")
    assert review_examples(loop, rejected, "reject", "reviewer") == 2

    for client in ("spammer", "shop", "admin"):
        send(loop, client, 9)
    assert harvest(loop.store, loop.cfg).held_for_review == 1
    [held] = [e for e in sft_of(loop, "spammer") if e.status == "pending_review"]
    assert held.reason.startswith("from client 'spammer', whose examples were blamed or rejected 2 times")
    assert {e.status for e in sft_of(loop, "shop") + sft_of(loop, "admin")} == {"accepted"}


def test_an_approved_example_does_not_count_against_its_client(tmp_path):
    loop = shop_loop(tmp_path, 3)
    loop.cfg.loop.distrust_after = 1
    send(loop, "shop", 0)
    harvest(loop.store, loop.cfg)
    [example] = sft_of(loop, "shop")
    loop.store.add_event("blamed", "tuneship", "blamed", {"examples": {example.id: "leaked"}})
    loop.store.set_example_status([example.id], "pending_review", "blamed")
    review_examples(loop, [example.id], "approve", "reviewer")
    send(loop, "shop", 1)
    assert harvest(loop.store, loop.cfg).held_for_review == 0
