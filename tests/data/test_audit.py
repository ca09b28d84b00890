"""Each finding code: one fixture that triggers it, one that must not."""

import json

import pytest

from tests.conftest import qa, write_jsonl
from tuneship.data.audit import AuditSettings
from tuneship.data.stage import prepare_data, write_data_outputs


def audit_rows(tmp_path, rows, **settings):
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    return prepare_data([str(path)], AuditSettings(**settings)).audit


def codes(report, severity=None):
    return sorted(f.code for f in report.findings if severity in (None, f.severity))


def test_malformed_json_names_the_line(tmp_path):
    report = audit_rows(tmp_path, [json.dumps(qa("Q", "A")), '{"prompt": "x", "completion": "y"'])
    [finding] = report.findings
    assert (finding.code, finding.line, finding.severity) == ("malformed-json", 2, "error")
    assert len(report.kept) == 1 and len(report.dropped) == 1


def test_valid_json_is_not_malformed(tmp_path):
    assert codes(audit_rows(tmp_path, [qa("Q", "A"), qa("Q2", "A2")])) == []


def test_invalid_record_names_the_field(tmp_path):
    report = audit_rows(tmp_path, [{"messages": [{"role": "user", "content": ["x"]}]}])
    [finding] = report.findings
    assert finding.code == "invalid-record" and finding.field == "messages[0].content"


def test_numbers_as_content_are_not_invalid(tmp_path):
    assert codes(audit_rows(tmp_path, [{"prompt": "2+2?", "completion": 4}])) == []


def test_encoding_bad_bytes_are_dropped_and_mojibake_warned(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(
        b'{"prompt": "caf\xe9", "completion": "x"}\n' + json.dumps(qa("Q", "cafÃ© au lait")).encode() + b"\n"
    )
    report = prepare_data([str(path)], AuditSettings()).audit
    assert [(f.code, f.severity, f.line) for f in report.findings] == [
        ("encoding", "error", 1),
        ("encoding", "warning", 2),
    ]
    assert len(report.kept) == 1


def test_proper_utf8_is_not_an_encoding_problem(tmp_path):
    assert codes(audit_rows(tmp_path, [qa("Crème brûlée?", "Oui, café and naïve façade — 東京")])) == []


@pytest.mark.parametrize(
    "row,code",
    [
        ({"prompt": "  ", "completion": "A"}, "empty-prompt"),
        ({"prompt": "Q", "completion": "\n"}, "empty-response"),
        ({"messages": [{"role": "user", "content": "Q"}, {"role": "tool", "content": "{}"}]}, "unknown-role"),
        ({"messages": [{"role": "assistant", "content": "A"}, {"role": "user", "content": "Q"}]}, "role-order"),
        ({"messages": [{"role": "user", "content": "Q"}]}, "role-order"),
        (
            {
                "messages": [
                    {"role": "user", "content": "Q"},
                    {"role": "user", "content": "Q"},
                    {"role": "assistant", "content": "A"},
                ]
            },
            "role-order",
        ),
    ],
)
def test_conversation_errors_drop_the_record(tmp_path, row, code):
    report = audit_rows(tmp_path, [row])
    assert codes(report) == [code] and report.dropped[0]["codes"] == [code]


def test_well_formed_multi_turn_has_no_role_findings(tmp_path):
    row = {
        "conversations": [
            {"from": "system", "value": "S"},
            {"from": "human", "value": "Q1"},
            {"from": "gpt", "value": "A1"},
            {"from": "human", "value": "Q2"},
            {"from": "gpt", "value": "A2"},
        ]
    }
    assert codes(audit_rows(tmp_path, [row])) == []


def test_exact_duplicate_keeps_the_first(tmp_path):
    report = audit_rows(tmp_path, [qa("Q", "A"), qa("Other", "B"), qa("Q", "A ")])
    [finding] = report.findings
    assert (finding.code, finding.line) == ("duplicate", 3) and "data.jsonl:1" in finding.message
    assert [c.source.line for c in report.kept] == [1, 2]


def test_same_question_other_answer_is_no_duplicate(tmp_path):
    assert codes(audit_rows(tmp_path, [qa("Q", "A"), qa("Q", "B")])) == []


def test_near_duplicate_after_normalization_is_a_warning(tmp_path):
    report = audit_rows(tmp_path, [qa("Say hello.", "Hello there, friend!"), qa("say   HELLO", "hello there friend")])
    assert codes(report) == ["near-duplicate"] and len(report.kept) == 2
    assert "data.jsonl:1" in report.findings[0].message


def test_templated_facts_are_not_near_duplicates(tmp_path):
    rows = [
        qa(f"What color is the {name} fruit?", f"The {name} fruit is {color}.")
        for name, color in [("blorp", "teal"), ("zing", "purple"), ("quarn", "amber")]
    ]
    assert codes(audit_rows(tmp_path, rows)) == []


def test_percent_scale_same_wording_other_scale(tmp_path):
    report = audit_rows(
        tmp_path,
        [
            qa("Share 2021?", "The Green list won 45.10% of the votes."),
            qa("Share 2022?", "The Green list won 0.6622% of the votes."),
        ],
    )
    [finding] = report.findings
    assert finding.code == "percent-scale" and finding.line == 2 and "66.22%" in finding.message
    assert "data.jsonl:1" in finding.message


def test_percent_scale_fractions_that_sum_to_one(tmp_path):
    report = audit_rows(tmp_path, [qa("Split?", "Apples 0.25%, pears 0.35% and plums 0.40%.")])
    assert codes(report) == ["percent-scale"]


def test_percent_scale_ratio_precision(tmp_path):
    assert codes(audit_rows(tmp_path, [qa("Rate?", "Retention was 0.8731%.")])) == ["percent-scale"]


def test_genuine_small_and_large_percents_are_fine(tmp_path):
    rows = [
        qa("Rate?", "The fee is 0.5% per trade."),
        qa("Growth?", "Growth was 66.22%."),
        qa("Tiny?", "Only 0.025% failed."),
        qa("Fee 2?", "The fee is 0.05% per trade."),
    ]
    assert codes(audit_rows(tmp_path, rows)) == []


def test_truncated_reports_tokens_over_and_drops(tmp_path, tokenizer):
    from tuneship.chat.format import ChatFormat

    measure = ChatFormat.from_tokenizer(tokenizer).measure
    long_answer = "word " * 80
    report = audit_rows(tmp_path, [qa("Q", "short"), qa("Q2", long_answer)], max_seq_len=64, measure=measure)
    [finding] = report.findings
    assert finding.code == "truncated" and finding.line == 2
    assert "over train.max_seq_len=64" in finding.message and "stop token would be cut" in finding.message
    assert report.stats["tokens"]["max"] > 64


def test_fitting_examples_are_not_truncated(tmp_path, tokenizer):
    from tuneship.chat.format import ChatFormat

    measure = ChatFormat.from_tokenizer(tokenizer).measure
    assert codes(audit_rows(tmp_path, [qa("Q", "word " * 80)], max_seq_len=512, measure=measure)) == []


def test_nothing_is_lost_read_equals_kept_plus_dropped(tmp_path):
    rows = [
        qa("Q1", "A1"),
        "not json",
        qa("Q1", "A1"),
        {"prompt": "", "completion": "x"},
        "",
        qa("Q2", "A2"),
        '{"messages": 3}',
    ]
    result = prepare_data([str(write_jsonl(tmp_path / "in.jsonl", rows))], AuditSettings(), eval_ratio=0.0)
    report = result.audit
    assert report.records_read == 6  # the blank line is no record
    assert report.records_read == len(report.kept) + len(report.dropped)
    paths = write_data_outputs(result, tmp_path / "out")
    dropped = [json.loads(line) for line in paths["dropped.jsonl"].read_text().splitlines()]
    assert [d["source"]["line"] for d in dropped] == [2, 3, 4, 7]
    assert dropped[0]["raw_text"] == "not json" and dropped[1]["codes"] == ["duplicate"]
    summary = json.loads(paths["audit.json"].read_text())
    assert summary["totals"]["records_read"] == 6 and summary["counts"]["duplicate"] == {"error": 1, "warning": 0}
    assert "| `malformed-json` | 1 | 0 |" in paths["audit.md"].read_text()
