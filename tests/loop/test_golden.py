"""The golden set, maintained: add, update and retire change what the gate reads (`examples.golden`), each with its
event; through the CLI and the API; the loop.min_golden warning."""

from __future__ import annotations

import logging

import pytest

from tests.conftest import qa, write_jsonl

FACTS = [("Question 0?", "Answer 0."), ("Question 1?", "Answer 1."), ("Question 2?", "Answer 2.")]


@pytest.fixture
def config_file(tmp_path, monkeypatch):
    """A run whose eval split (three facts) is the golden set, with an API key."""
    monkeypatch.delenv("TUNESHIP_API_KEY", raising=False)
    records = [{**qa(q, a), "source": {"file": "eval", "line": i}} for i, (q, a) in enumerate(FACTS, 1)]
    write_jsonl(tmp_path / "runs" / "shop" / "data" / "eval.jsonl", records)
    path = tmp_path / "run.yaml"
    path.write_text(f"run: {{name: shop, dir: {tmp_path / 'runs'}}}\nserve: {{api_key: s3cret}}\n")
    return path


@pytest.fixture
def loop(config_file):
    from tuneship.loop.registry import open_loop

    return open_loop(config_file)


def gate_facts(loop) -> dict[str, str]:
    """question -> answer, as the gate reads the golden set."""
    from tuneship.loop.examples import golden

    return {
        e.conversation["messages"][0]["content"]: e.conversation["messages"][-1]["content"] for e in golden(loop.store)
    }


def event(loop, kind):
    [found] = loop.store.events(kind=kind)
    return found


def test_add_puts_a_fact_in_the_gate_with_its_event(loop):
    from tuneship.loop.golden import add_golden, golden_rows

    example = add_golden(loop, "Capital of Veloria?", "Quintara.", None, "cli")
    assert gate_facts(loop)["Capital of Veloria?"] == "Quintara." and len(gate_facts(loop)) == 4
    assert example.id.startswith("golden-ex-") and (example.split, example.kind, example.status) == (
        "golden",
        "sft",
        "accepted",
    )
    added = event(loop, "golden_added")
    assert added.actor == "cli" and added.data["id"] == example.id and added.data["answer"] == "Quintara."
    row = next(r for r in golden_rows(loop.store) if r.id == example.id)
    assert (row.question, row.answer, row.source) == ("Capital of Veloria?", "Quintara.", "golden add (cli)")


def test_a_system_prompt_is_part_of_the_prompt(loop):
    from tuneship.loop.golden import add_golden
    from tuneship.loop.examples import golden

    add_golden(loop, "Question 0?", "Answer zero, formally.", "Be formal.", "cli")  # another prompt: not a duplicate
    assert sum(1 for e in golden(loop.store) if e.conversation.get("system") == "Be formal.") == 1


def test_a_second_fact_with_the_same_prompt_is_refused(loop):
    from tuneship.loop.golden import GoldenConflict, add_golden

    with pytest.raises(GoldenConflict, match=r"question: golden fact golden-ex-\w+ already asks this.*golden update"):
        add_golden(loop, "Question 1?", "Another answer.", None, "cli")
    assert gate_facts(loop)["Question 1?"] == "Answer 1." and not loop.store.events(kind="golden_added")


@pytest.mark.parametrize(("question", "answer", "field"), [(" ", "A.", "question"), ("Q?", "", "answer")])
def test_an_empty_question_or_answer_is_refused(loop, question, answer, field):
    from tuneship.loop.golden import GoldenError, add_golden

    with pytest.raises(GoldenError, match=f"^{field}: empty") as info:
        add_golden(loop, question, answer, None, "cli")
    assert info.value.field == field and len(gate_facts(loop)) == 3


def test_a_fact_the_audit_drops_is_refused(loop):
    from tuneship.loop.golden import GoldenError, add_golden

    with pytest.raises(GoldenError, match="the data audit drops this golden fact"):
        add_golden(loop, "Broken?", "Answer \ufffd mangled.", None, "cli")


def test_update_adds_a_row_and_keeps_the_old_one_superseded(loop):
    from tuneship.loop.golden import golden_rows, update_golden

    [old] = [r for r in golden_rows(loop.store) if r.question == "Question 1?"]
    new = update_golden(loop, old.id, "Answer one.", "api", "the catalogue changed")
    assert gate_facts(loop)["Question 1?"] == "Answer one." and len(gate_facts(loop)) == 3
    [kept] = [e for e in loop.store.examples(split="golden") if e.id == old.id]
    assert kept.status == "superseded" and "the catalogue changed" in kept.reason and new.id in kept.reason
    assert kept.conversation["messages"][-1]["content"] == "Answer 1."  # never rewritten
    updated = event(loop, "golden_updated")
    assert updated.actor == "api" and updated.reason.startswith("the catalogue changed")
    assert (updated.data["replaces"], updated.data["old_answer"], updated.data["id"]) == (old.id, "Answer 1.", new.id)


def test_update_back_to_an_earlier_answer_brings_its_row_back(loop):
    from tuneship.loop.golden import golden_rows, update_golden

    [old] = [r for r in golden_rows(loop.store) if r.question == "Question 1?"]
    new = update_golden(loop, old.id, "Answer one.", "cli")
    back = update_golden(loop, new.id, "Answer 1.", "cli", "it was right")
    assert back.id == old.id and back.status == "accepted" and gate_facts(loop)["Question 1?"] == "Answer 1."
    assert len(loop.store.examples(split="golden")) == 4


def test_update_refuses_an_unknown_a_superseded_or_an_unchanged_fact(loop):
    from tuneship.loop.golden import GoldenConflict, GoldenError, UnknownGolden, golden_rows, update_golden

    with pytest.raises(UnknownGolden, match="id: no golden fact 'golden-nope'.*tuneship loop golden list"):
        update_golden(loop, "golden-nope", "A.", "cli")
    [old] = [r for r in golden_rows(loop.store) if r.question == "Question 2?"]
    with pytest.raises(GoldenError, match="answer: the same as the current answer"):
        update_golden(loop, old.id, "Answer 2.", "cli")
    update_golden(loop, old.id, "Answer two.", "cli")
    with pytest.raises(GoldenConflict, match="no longer in the gate"):
        update_golden(loop, old.id, "Answer II.", "cli")


def test_retire_takes_a_fact_out_of_the_gate_with_its_event(loop):
    from tuneship.loop.golden import golden_rows, retire_golden

    [old] = [r for r in golden_rows(loop.store) if r.question == "Question 0?"]
    retired = retire_golden(loop, old.id, "cli", "no longer sold")
    assert "Question 0?" not in gate_facts(loop) and len(gate_facts(loop)) == 2
    assert retired.status == "superseded" and retired.reason == "retired by cli: no longer sold"
    gone = event(loop, "golden_retired")
    assert gone.actor == "cli" and gone.reason.startswith("no longer sold") and gone.data["id"] == old.id


def test_too_few_golden_facts_is_a_status_warning(loop):
    from tuneship.loop.golden import add_golden
    from tuneship.loop.status import status_report

    [warning] = status_report(loop)["warnings"]
    assert "only 3 golden examples (loop.min_golden=5)" in warning
    assert "tuneship loop golden add" in warning and "loop.golden" in warning and "POST /v1/golden" in warning
    add_golden(loop, "Question 3?", "Answer 3.", None, "cli")
    add_golden(loop, "Question 4?", "Answer 4.", None, "cli")
    assert status_report(loop)["warnings"] == []
    loop.cfg.loop.min_golden = 0
    assert status_report(loop)["warnings"] == []


# the CLI ------------------------------------------------------------------------------------------------------------


@pytest.fixture
def wide(monkeypatch):
    from rich.console import Console

    from tuneship.loop import cli as loop_cli

    monkeypatch.setattr(loop_cli, "console", Console(width=250))


def test_the_cli_lists_adds_updates_and_retires(config_file, cli, wide):
    from tuneship.loop.registry import open_loop

    listed = cli("loop", "golden", "list", config_file)
    assert listed.code == 0 and "golden set: 3 facts" in listed.out and "Answer 2." in listed.out
    added = cli("loop", "golden", "add", config_file, "--question", "Capital of Veloria?", "--answer", "Quintara.")
    assert added.code == 0 and "added golden fact golden-ex-" in added.out
    loop = open_loop(config_file)
    new_id = next(
        r.id for r in loop.store.examples(status="accepted", split="golden") if "Veloria" in str(r.conversation)
    )
    updated = cli("loop", "golden", "update", config_file, new_id, "--answer", "Quintara City.", "--reason", "renamed")
    assert updated.code == 0 and f"golden fact {new_id} superseded by golden-ex-" in updated.out
    assert gate_facts(loop)["Capital of Veloria?"] == "Quintara City."
    newest = updated.out.split("superseded by ")[1].split()[0]
    assert cli("loop", "golden", "retire", config_file, newest, "--reason", "a test fact").code == 0
    assert "Capital of Veloria?" not in gate_facts(loop)
    assert {e.actor for e in loop.store.events() if e.kind.startswith("golden_")} == {"cli"}
    assert "golden set: 3 facts" in cli("loop", "golden", "list", config_file).out


def test_cli_errors_say_what_and_exit_1(config_file, cli, wide):
    duplicate = cli("loop", "golden", "add", config_file, "--question", "Question 0?", "--answer", "Zero.")
    assert duplicate.code == 1 and "already asks this" in duplicate.err
    unknown = cli("loop", "golden", "retire", config_file, "golden-nope")
    assert unknown.code == 1 and "no golden fact 'golden-nope'" in unknown.err
    status = cli("loop", "status", config_file)
    assert "warning: only 3 golden examples (loop.min_golden=5)" in status.out


# the API ------------------------------------------------------------------------------------------------------------

KEY = {"Authorization": "Bearer s3cret"}


@pytest.fixture
def client(loop):
    from fastapi.testclient import TestClient

    from tuneship.serve.app import create_app

    with TestClient(create_app(loop)) as client:
        yield client


def test_the_api_lists_adds_updates_and_retires(client, loop):
    listed = client.get("/v1/golden", headers=KEY).json()
    assert listed["count"] == 3 and listed["min_golden"] == 5 and "only 3 golden examples" in listed["warning"]
    added = client.post("/v1/golden", json={"question": "Capital of Veloria?", "answer": "Quintara."}, headers=KEY)
    assert added.status_code == 201 and added.json()["question"] == "Capital of Veloria?"
    first = added.json()["id"]
    updated = client.post(f"/v1/golden/{first}/update", json={"answer": "Quintara City."}, headers=KEY)
    assert updated.status_code == 200 and updated.json()["replaces"] == first
    assert gate_facts(loop)["Capital of Veloria?"] == "Quintara City."
    retired = client.post(f"/v1/golden/{updated.json()['id']}/retire", headers=KEY)
    assert retired.status_code == 200 and retired.json()["status"] == "superseded"
    assert "Capital of Veloria?" not in gate_facts(loop) and client.get("/v1/golden", headers=KEY).json()["count"] == 3
    kinds = [e.kind for e in loop.store.events() if e.actor == "api"]
    assert sorted(kinds) == ["golden_added", "golden_retired", "golden_updated"]


def test_the_api_needs_the_key_and_errors_are_4xx(client, loop):
    some_id = client.get("/v1/golden", headers=KEY).json()["data"][0]["id"]
    assert client.get("/v1/golden").status_code == 401  # the golden set is the gate's answers: admin only
    assert client.post("/v1/golden", json={"question": "Q?", "answer": "A."}).status_code == 401
    assert client.post(f"/v1/golden/{some_id}/update", json={"answer": "A."}).status_code == 401
    assert client.post(f"/v1/golden/{some_id}/retire").status_code == 401
    missing = client.post("/v1/golden/golden-nope/retire", json={"reason": "x"}, headers=KEY)
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found"
    assert client.post("/v1/golden/golden-nope/update", json={"answer": "A."}, headers=KEY).status_code == 404
    empty = client.post(f"/v1/golden/{some_id}/update", json={"answer": ""}, headers=KEY)
    assert empty.status_code == 422 and empty.json()["error"]["param"] == "answer"
    blank = client.post("/v1/golden", json={"question": "Q?", "answer": "  "}, headers=KEY)
    assert blank.status_code == 422 and blank.json()["error"]["param"] == "answer"
    extra = client.post("/v1/golden", json={"question": "Q?", "answer": "A.", "split": "train"}, headers=KEY)
    assert extra.status_code == 422
    duplicate = client.post("/v1/golden", json={"question": "Question 0?", "answer": "Zero."}, headers=KEY)
    assert duplicate.status_code == 409 and duplicate.json()["error"]["param"] == "question"
    assert len(gate_facts(loop)) == 3 and not [e for e in loop.store.events() if e.kind.startswith("golden_")]


def test_the_pages_show_the_golden_set_and_the_warning(client):
    versions = client.get("/versions", headers=KEY).text
    assert 'id="golden-count">3</span> facts' in versions and "Question 2?" in versions and "Answer 2." in versions
    assert "only 3 golden examples" in versions
    assert "only 3 golden examples (loop.min_golden=5)" in client.get("/loop", headers=KEY).text
    assert "only 3 golden examples" in client.get("/v1/loop/status", headers=KEY).json()["warnings"][0]


def test_serve_logs_the_warning_at_start(loop, caplog):
    from fastapi.testclient import TestClient

    from tuneship.serve.app import create_app

    with caplog.at_level(logging.WARNING, logger="tuneship.serve"), TestClient(create_app(loop)):
        pass
    assert any("only 3 golden examples" in r.getMessage() for r in caplog.records if r.name == "tuneship.serve")
