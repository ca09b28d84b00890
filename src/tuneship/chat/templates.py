"""Known chat templates by model family, for tokenizers that ship none.

Each is the family's published Jinja template (compacted, same output), used only when the
tokenizer has no `chat_template` of its own: chosen by `chat.template`, or detected from the
special tokens in the vocabulary. Never a made-up format.
"""

from __future__ import annotations

from tuneship.errors import ChatFormatError

TEMPLATES: dict[str, str] = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
        "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "qwen": (
        "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
        "{% endif %}{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
        "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "llama-3": (
        "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
        "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    "mistral": (
        "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] + '\n\n' %}"
        "{% set messages = messages[1:] %}{% else %}{% set system = '' %}{% endif %}{{ bos_token }}"
        "{% for message in messages %}{% if message['role'] == 'user' %}"
        "{{ '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
    ),
    "zephyr": (
        "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    ),
    "gemma": (
        "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] + '\n\n' %}"
        "{% set messages = messages[1:] %}{% else %}{% set system = '' %}{% endif %}{{ bos_token }}"
        "{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
        "{{ '<start_of_turn>' + role + '\n' + (system if loop.first else '') + message['content'] | trim + "
        "'<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
    ),
    "phi-3": (
        "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    ),
}

# Ollama (Go text/template) versions for the families that fold the system prompt into the first user
# turn; the other families' Go templates are derived from the Jinja (deploy/ollama_template.py).
OLLAMA_TEMPLATES = {
    "mistral": (
        '{{ $system := "" }}{{ range .Messages }}{{ if eq .Role "system" }}{{ $system = .Content }}{{ end }}{{ end }}'
        '{{ $first := true }}{{ range .Messages }}{{ if eq .Role "user" }}[INST] {{ if $first }}{{ if $system }}'
        "{{ $system }}\n\n{{ end }}{{ end }}{{ .Content }} [/INST]{{ $first = false }}"
        '{{ else if eq .Role "assistant" }}{{ .Content }}</s>{{ end }}{{ end }}'
    ),
    "gemma": (
        '{{ $system := "" }}{{ range .Messages }}{{ if eq .Role "system" }}{{ $system = .Content }}{{ end }}{{ end }}'
        '{{ $first := true }}{{ range .Messages }}{{ if eq .Role "user" }}<start_of_turn>user\n'
        "{{ if $first }}{{ if $system }}{{ $system }}\n\n{{ end }}{{ end }}{{ .Content }}<end_of_turn>\n"
        '{{ $first = false }}{{ else if eq .Role "assistant" }}<start_of_turn>model\n{{ .Content }}<end_of_turn>\n'
        "{{ end }}{{ end }}<start_of_turn>model\n"
    ),
}

# Special tokens that identify a family, most specific first.
FAMILY_MARKERS: list[tuple[str, tuple[str, ...]]] = [
    ("llama-3", ("<|start_header_id|>", "<|eot_id|>")),
    ("gemma", ("<start_of_turn>", "<end_of_turn>")),
    ("phi-3", ("<|assistant|>", "<|end|>")),
    ("chatml", ("<|im_start|>", "<|im_end|>")),
    ("zephyr", ("<|assistant|>", "<|user|>")),
    ("mistral", ("[INST]", "[/INST]")),
]


def detect_family(vocabulary: set[str]) -> str | None:
    for family, markers in FAMILY_MARKERS:
        if all(marker in vocabulary for marker in markers):
            return family
    return None


def template_for(family: str) -> str:
    if family not in TEMPLATES:
        raise ChatFormatError(f"chat.template={family!r} is unknown; choose one of {', '.join(TEMPLATES)}")
    return TEMPLATES[family]


def with_default_system(template: str, system_prompt: str) -> str:
    """The template, preceded by a statement that inserts `system_prompt` when a conversation has none.

    Baking the default into the template itself means training, HF `apply_chat_template`, the
    GGUF's embedded template and llama.cpp all render the same system prompt.
    """
    literal = system_prompt.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")
    prefix = (
        "{% if not messages or messages[0]['role'] != 'system' %}"
        f"{{% set messages = [{{'role': 'system', 'content': '{literal}'}}] + messages %}}{{% endif %}}"
    )
    return prefix + template
