import pytest

from tuneship.data.conversation import SourceRef
from tuneship.data.findings import RecordError
from tuneship.data.formats import to_conversation

SRC = SourceRef("f.jsonl", 1)


def roles_and_contents(conversation):
    return [(m.role, m.content) for m in conversation.messages]


def test_alpaca_joins_instruction_and_input():
    c = to_conversation({"instruction": "Translate", "input": "cat", "output": "chat"}, SRC)
    assert roles_and_contents(c) == [("user", "Translate\n\ncat"), ("assistant", "chat")]


def test_messages_takes_leading_system_aside():
    record = {
        "messages": [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "Q"},
            {"role": "assistant", "content": "A"},
        ]
    }
    c = to_conversation(record, SRC)
    assert c.system == "S" and roles_and_contents(c) == [("user", "Q"), ("assistant", "A")]


def test_sharegpt_maps_human_and_gpt():
    record = {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}
    c = to_conversation(record, SRC)
    assert roles_and_contents(c) == [("user", "Q"), ("assistant", "A")]
    assert c.raw_roles == ["human", "gpt"]


def test_prompt_completion_and_column_mapping():
    assert roles_and_contents(to_conversation({"prompt": "Q", "completion": "A"}, SRC)) == [
        ("user", "Q"),
        ("assistant", "A"),
    ]
    c = to_conversation(
        {"question": "Q", "answer": "A", "ctx": "S"},
        SRC,
        columns={"prompt": "question", "response": "answer", "system": "ctx"},
    )
    assert c.system == "S" and roles_and_contents(c) == [("user", "Q"), ("assistant", "A")]


def test_plain_text_human_assistant():
    c = to_conversation({"text": "### Human: Hi there ### Assistant: Hello! ### Human: Bye ### Assistant: Bye!"}, SRC)
    assert roles_and_contents(c) == [
        ("user", "Hi there"),
        ("assistant", "Hello!"),
        ("user", "Bye"),
        ("assistant", "Bye!"),
    ]


def test_forced_format_reports_missing_field_by_name():
    with pytest.raises(RecordError) as err:
        to_conversation({"instruction": "x"}, SRC, fmt="alpaca")
    assert err.value.code == "invalid-record" and err.value.field == "output"


def test_unknown_format_lists_keys():
    with pytest.raises(RecordError, match="keys: foo"):
        to_conversation({"foo": 1}, SRC)
