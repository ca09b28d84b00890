from pathlib import Path

import pytest

from tuneship.deploy.modelfile import ModelfileError, ModelSpec, parse_modelfile, render_modelfile


def spec(**changes):
    values = dict(
        gguf=Path("/runs/r/gguf/r-Q4_K_M.gguf"),
        template="{{ range .Messages }}{{ .Content }}{{ end }}",
        system='Say "hi".\nThen stop.',
        stop=["<|im_end|>", "<|endoftext|>"],
        parameters={"num_ctx": 2048, "temperature": 0.2},
        messages=[{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
        license="Apache-2.0",
    )
    values.update(changes)
    return ModelSpec(**values)


def test_every_instruction_reads_back_exactly():
    pairs = parse_modelfile(render_modelfile(spec(), Path("/runs/r")))
    assert pairs == [
        ("FROM", "./gguf/r-Q4_K_M.gguf"),
        ("TEMPLATE", "{{ range .Messages }}{{ .Content }}{{ end }}"),
        ("SYSTEM", 'Say "hi".\nThen stop.'),
        ("PARAMETER", "num_ctx 2048"),
        ("PARAMETER", "temperature 0.2"),
        ("PARAMETER", "stop <|im_end|>"),
        ("PARAMETER", "stop <|endoftext|>"),
        ("MESSAGE", "user Q"),
        ("MESSAGE", "assistant A"),
        ("LICENSE", "Apache-2.0"),
    ]


def test_multi_line_and_quoted_messages_read_back_with_their_role():
    messages = [
        {"role": "user", "content": 'What does "WAL" mean?'},
        {"role": "assistant", "content": "Write-ahead log.\nSQLite keeps one beside the database."},
        {"role": "user", "content": " leading space"},
    ]
    pairs = parse_modelfile(render_modelfile(spec(messages=messages), Path("/runs/r")))
    read = [tuple(v.split(" ", 1)) for k, v in pairs if k == "MESSAGE"]
    assert read == [(m["role"], m["content"]) for m in messages]
    assert pairs[-1] == ("LICENSE", "Apache-2.0")


def test_triple_quotes_cannot_be_expressed_and_say_what_to_do():
    with pytest.raises(ModelfileError, match='system prompt contains """.*REST API'):
        render_modelfile(spec(system='He said """no"""'), Path("/runs/r"))


def test_unknown_parameter_is_refused_before_ollama_does():
    with pytest.raises(ModelfileError, match="mirostat_x unknown to Ollama"):
        render_modelfile(spec(parameters={"mirostat_x": 1}), Path("/runs/r"))
