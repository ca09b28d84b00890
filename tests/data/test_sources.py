import json

import pytest

from tests.conftest import qa, write_jsonl
from tuneship.data.audit import AuditSettings
from tuneship.data.sources import expand_sources, read_file
from tuneship.data.stage import prepare_data
from tuneship.errors import SourceError


def test_json_array_keeps_line_numbers(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[\n  {"prompt": "a", "completion": "b"},\n\n  {"prompt": "c",\n   "completion": "d"}\n]\n')
    assert [(r.line, r.data["prompt"]) for r in read_file(path)] == [(2, "a"), (4, "c")]


def test_json_array_broken_midway_reports_where(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[\n {"prompt": "a", "completion": "b"},\n {"prompt": oops}\n]')
    records = list(read_file(path))
    assert records[0].data == {"prompt": "a", "completion": "b"}
    assert records[1].error.code == "malformed-json" and records[1].line == 3


def test_csv_rows_with_column_mapping(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text('question,answer\n"What, exactly?",This\nSecond,"multi\nline"\nThird,Last\n', encoding="utf-8")
    result = prepare_data([str(path)], AuditSettings(columns={"prompt": "question", "response": "answer"}))
    assert [(c.source.line, c.messages[1].content) for c in result.audit.kept] == [
        (2, "This"),
        (3, "multi\nline"),
        (5, "Last"),
    ]


def test_csv_row_with_extra_fields_is_invalid(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text("prompt,completion\na,b,c\n")
    [record] = read_file(path)
    assert record.error.code == "invalid-record" and record.line == 2


def test_parquet_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"instruction": ["i1", "i2"], "input": ["", "x"], "output": ["o1", "o2"]}), path)
    result = prepare_data([str(path)], AuditSettings())
    assert [c.messages[0].content for c in result.audit.kept] == ["i1", "i2\n\nx"]
    assert [c.source.line for c in result.audit.kept] == [1, 2]


def test_folders_and_globs_merge_sources_each_remembering_its_file(tmp_path):
    write_jsonl(tmp_path / "a" / "one.jsonl", [qa("Q1", "A1")])
    write_jsonl(tmp_path / "a" / "two.jsonl", [qa("Q2", "A2")])
    (tmp_path / "a" / "notes.txt").write_text("ignored")
    files = expand_sources([str(tmp_path / "a"), str(tmp_path / "a" / "*.jsonl")])
    assert [f.rsplit("/", 1)[1] for f in files] == ["one.jsonl", "two.jsonl", "one.jsonl", "two.jsonl"]
    result = prepare_data([str(tmp_path / "a")], AuditSettings())
    assert {c.source.file.rsplit("/", 1)[1] for c in result.audit.kept} == {"one.jsonl", "two.jsonl"}


def test_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(SourceError, match="no such file or folder"):
        expand_sources([str(tmp_path / "nope.jsonl")])
    with pytest.raises(SourceError, match="matches no"):
        expand_sources([str(tmp_path / "*.jsonl")])


def test_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(qa("Q", "A")).encode() + b"\n")
    assert list(read_file(path))[0].data == qa("Q", "A")


TRANSCRIPT = """### Human: What is the capital of France?
### Assistant: Paris.

### Human: Two paragraphs, please.
### Assistant: First paragraph.

Second paragraph, still the answer.
### Human: And a follow-up?
### Assistant: Same conversation.

User: Plain markers work too.
Assistant: Yes.
---
### Instruction:
Add the numbers.

### Input:
2 and 3

### Response:
5
"""


def test_transcript_file_is_read_as_conversations_with_their_lines(tmp_path):
    path = tmp_path / "seed.txt"
    path.write_text(TRANSCRIPT, encoding="utf-8")
    result = prepare_data([str(path)], AuditSettings())
    [split_note] = result.audit.findings  # auto: one conversation has several turns, the file could be pairs
    assert (split_note.code, split_note.severity, split_note.file) == ("transcript-split", "warning", str(path))
    assert split_note.message.startswith("read as 4 conversations (1 of several turns")
    assert "set data.transcripts: pairs" in split_note.message
    assert result.audit.records_read == 4
    kept = result.audit.kept
    assert [c.source.line for c in kept] == [1, 4, 11, 14]
    assert [[(m.role, m.content) for m in c.messages] for c in kept] == [
        [("user", "What is the capital of France?"), ("assistant", "Paris.")],
        [
            ("user", "Two paragraphs, please."),
            ("assistant", "First paragraph.\n\nSecond paragraph, still the answer."),
            ("user", "And a follow-up?"),
            ("assistant", "Same conversation."),
        ],
        [("user", "Plain markers work too."), ("assistant", "Yes.")],
        [("user", "Add the numbers.\n\n2 and 3"), ("assistant", "5")],
    ]


def test_malformed_transcript_blocks_are_dropped_with_file_and_line(tmp_path):
    path = tmp_path / "seed.md"
    path.write_text(
        "# Seed conversations\n\n"
        "### Human: Fine?\n### Assistant: Fine.\n\n"
        "### Human: Twice?\n### Assistant: Once.\n### Assistant: Twice.\n\n"
        "### Human: Last one?\n### Assistant: Kept.\n",
        encoding="utf-8",
    )
    result = prepare_data([str(path)], AuditSettings())
    assert result.audit.records_read == 4
    assert [c.source.line for c in result.audit.kept] == [3, 10]
    assert [(f.code, f.line) for f in result.audit.findings] == [("role-order", 1), ("role-order", 6)]
    assert "no speaker" in result.audit.findings[0].message
    assert result.audit.findings[1].field == "turn 3"
    assert [d["source"]["line"] for d in result.audit.dropped] == [1, 6]


def test_folders_pick_up_transcripts_but_not_other_text_files(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "README.md").write_text("# About this data set\nNothing to train on.\n")
    (tmp_path / "d" / "chat.txt").write_text("### Human: Hi\n### Assistant: Hello\n")
    assert [f.rsplit("/", 1)[1] for f in expand_sources([str(tmp_path / "d")])] == ["chat.txt"]


DUMP = "".join(f"### Human: Question {i}?\n### Assistant: Answer {i}.\n" for i in range(3))


def test_a_dump_of_pairs_without_blank_lines_gives_one_example_per_pair_with_a_finding(tmp_path):
    path = tmp_path / "training_data_ollama.txt"
    path.write_text(DUMP, encoding="utf-8")
    result = prepare_data([str(path)], AuditSettings())
    assert [[(m.role, m.content) for m in c.messages] for c in result.audit.kept] == [
        [("user", f"Question {i}?"), ("assistant", f"Answer {i}.")] for i in range(3)
    ]
    assert [c.source.line for c in result.audit.kept] == [1, 3, 5]
    [note] = result.audit.findings
    assert note.code == "transcript-split" and note.message.startswith(
        "no blank line or separator ends a conversation: read as 3 examples, one per Human/Assistant pair"
    )
    assert "set data.transcripts: conversations" in note.message


def test_the_setting_chooses_the_rule_without_a_finding(tmp_path):
    dump, conversations = tmp_path / "dump.txt", tmp_path / "seed.txt"
    dump.write_text(DUMP, encoding="utf-8")
    conversations.write_text(TRANSCRIPT, encoding="utf-8")
    whole = prepare_data([str(dump)], AuditSettings(transcripts="conversations"))
    assert len(whole.audit.kept) == 1 and len(whole.audit.kept[0].messages) == 6 and not whole.audit.findings
    split = prepare_data([str(conversations)], AuditSettings(transcripts="pairs"))
    assert len(split.audit.kept) == 5 and not split.audit.findings
