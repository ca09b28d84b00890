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
