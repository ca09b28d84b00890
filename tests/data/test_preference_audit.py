"""Preference records (train.objective dpo / kto) in the data audit: bad or degenerate pairs are dropped with a
reason, counted, and written out."""

import json

from tests.conftest import qa, write_jsonl
from tuneship.data.audit import AuditSettings
from tuneship.data.stage import prepare_data, write_data_outputs


def pair(question: str, chosen: str, rejected) -> dict:
    return {**qa(question, chosen), "rejected": rejected}


def audited(tmp_path, rows, **settings):
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    return prepare_data([str(path)], AuditSettings(**settings))


def dropped_codes(result) -> list[tuple[int, list[str]]]:
    return [(d["source"]["line"], d["codes"]) for d in result.audit.dropped]


def test_bad_and_degenerate_pairs_are_dropped_counted_and_written_out(tmp_path):
    rows = [
        pair("Colour of box 1?", "Red.", "Blue."),  # kept
        pair("Colour of box 2?", "Red.", "   "),  # empty rejected
        pair("Colour of box 3?", "Red.", " Red. "),  # chosen == rejected
        pair("Colour of box 1?", "Red.", "Blue."),  # duplicate of line 1
        pair("Colour of box 1?", "Red.", "Green."),  # another pair for the same prompt: kept
        qa("Colour of box 4?", "Red."),  # no rejected answer: nothing for DPO to compare
        pair("Colour of box 5?", "Red.", 5.0),  # not a string
        {**pair("Colour of box 6?", "Red.", "Blue."), "label": True},  # a pair and a label
    ]
    result = audited(tmp_path, rows, objective="dpo")
    assert [c.messages[-1].content + "/" + c.rejected for c in result.train] == ["Red./Blue.", "Red./Green."]
    assert dropped_codes(result) == [
        (2, ["empty-response"]),
        (3, ["same-answers"]),
        (4, ["duplicate"]),
        (6, ["objective-mismatch"]),
        (7, ["invalid-record"]),
        (8, ["invalid-record"]),
    ]
    assert result.audit.records_read == len(result.audit.kept) + len(result.audit.dropped) == 8
    fields = {f.line: f.field for f in result.audit.findings}
    assert fields[2] == fields[3] == fields[6] == fields[7] == "rejected" and fields[8] == "label"
    files = write_data_outputs(result, tmp_path / "data")
    assert len(files["dropped.jsonl"].read_text().splitlines()) == 6
    totals = json.loads(files["audit.json"].read_text())["totals"]
    assert (totals["kept"], totals["dropped"]) == (2, 6)
    kept = [json.loads(line) for line in files["train.jsonl"].read_text().splitlines()]
    assert [r["rejected"] for r in kept] == ["Blue.", "Green."]


def test_a_pair_is_truncated_when_its_rejected_answer_would_be_cut(tmp_path, tokenizer):
    from tuneship.chat.format import ChatFormat

    chat_format = ChatFormat.from_tokenizer(tokenizer)
    rows = [pair("Q?", "Short.", "Long " * 80), pair("Q2?", "Short.", "Also short.")]
    result = audited(tmp_path, rows, objective="dpo", max_seq_len=64, measure=chat_format.measure)
    assert dropped_codes(result) == [(1, ["truncated"])]
    assert "the last" in result.audit.findings[0].message


def test_kto_labels_are_checked_and_an_unlabelled_answer_is_desirable(tmp_path):
    rows = [
        {**qa("Is it red?", "Yes."), "label": True},
        {**qa("Is it red?", "Yes."), "label": False},  # the same answer judged the other way: another record
        qa("Is it blue?", "No."),
        {**qa("Is it green?", "No."), "label": "no"},
    ]
    result = audited(tmp_path, rows, objective="kto")
    assert [c.label for c in result.train] == [True, False, None]
    assert [c.is_desirable for c in result.train] == [True, False, True]
    assert dropped_codes(result) == [(4, ["invalid-record"])]


def test_sft_never_learns_an_answer_labelled_undesirable(tmp_path):
    rows = [{**qa("Is it red?", "Yes."), "label": False}, pair("Is it blue?", "No.", "Yes.")]
    result = audited(tmp_path, rows)
    assert dropped_codes(result) == [(1, ["objective-mismatch"])]
    assert [c.messages[-1].content for c in result.train] == ["No."]  # SFT learns a pair's chosen answer
