"""The Ollama TEMPLATE (a Go text/template) equivalent to the run's Jinja chat template.

Ollama's chat endpoint renders `.Messages` (each `.Role`, `.Content`) and prepends the Modelfile's
SYSTEM as a system message when a request has none. So the Go template only wraps messages, and a
default system prompt the Jinja template injects (SmolLM2's "You are a helpful AI assistant named
SmolLM...", or the run's `chat.system_prompt`) becomes the Modelfile's SYSTEM.

Most templates wrap each message in a role-specific prefix and suffix. That shape is derived from the
Jinja itself by rendering placeholder messages and diffing the results; mistral and gemma fold the
system prompt into the first user turn, so their Go templates are written out in chat/templates.py. A leading BOS
string is left to the tokenizer (llama.cpp adds it when the GGUF says `add_bos_token`). A derived
template is only trusted after `tuneship template check` renders it with Go's own text/template and
finds it equal to the Jinja on a set of conversations.
"""

from __future__ import annotations

from dataclasses import dataclass

from tuneship.chat.templates import OLLAMA_TEMPLATES
from tuneship.errors import ChatFormatError

U1, A1, U2, SYS = "TSPLACEUSERONE", "TSPLACEASSISTANTONE", "TSPLACEUSERTWO", "TSPLACESYSTEM"


class TemplateNotProven(ChatFormatError):
    """No Go template could be derived, or it renders differently from the Jinja."""


@dataclass
class OllamaTemplate:
    template: str
    system: str | None
    bos: str


def to_ollama(chat_format) -> OllamaTemplate:
    """The Go template; a BOS the Jinja writes is left to the tokenizer when it adds BOS itself, else written."""
    render = chat_format.render_text
    system = default_system_prompt(render)
    bos = _template_bos(chat_format)
    family = chat_format.spec.family
    body = OLLAMA_TEMPLATES[family] if family in OLLAMA_TEMPLATES else _derive_wrapper(render, bos)
    if bos and _tokenizer_adds_bos(chat_format.tokenizer):
        return OllamaTemplate(body, system, bos)
    return OllamaTemplate(_literal(bos) + body, system, "")


def default_system_prompt(render) -> str | None:
    """The system prompt the template writes when a conversation has none (None when it writes none)."""
    without = render([{"role": "user", "content": U1}], add_generation_prompt=True)
    with_system = render(
        [{"role": "system", "content": SYS}, {"role": "user", "content": U1}], add_generation_prompt=True
    )
    before, _, after = with_system.partition(SYS)
    if without.startswith(before) and without.endswith(after) and len(without) > len(before) + len(after):
        candidate = without[len(before) : len(without) - len(after)]
        messages = [{"role": "system", "content": candidate}, {"role": "user", "content": U1}]
        if render(messages, add_generation_prompt=True) == without:
            return candidate
    return None


def _tokenizer_adds_bos(tokenizer) -> bool:
    """Whether encoding adds BOS by itself; the GGUF's add_bos_token follows it, and so llama.cpp and Ollama."""
    return tokenizer.bos_token_id is not None and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]


def _template_bos(chat_format) -> str:
    """The BOS text the Jinja writes once, before all messages, or "" (SmolLM2's bos_token <|im_start|>
    opens every message instead, so it is no separate BOS there)."""
    bos = chat_format.tokenizer.bos_token or ""
    probe = chat_format.render_text(
        [
            {"role": "system", "content": SYS},
            {"role": "user", "content": U1},
            {"role": "assistant", "content": A1},
            {"role": "user", "content": U2},
        ],
        add_generation_prompt=True,
    )
    return bos if bos and probe.startswith(bos) and probe.count(bos) == 1 else ""


def _between(text: str, start: str, end: str | None) -> str:
    head = text.index(start) + len(start) if start else 0
    return text[head : text.index(end, head)] if end else text[head:]


def _derive_wrapper(render, bos: str) -> str:
    """Per-role prefix/suffix from placeholder renderings; raises TemplateNotProven when the shape differs."""

    def messages(*pairs):
        return [{"role": role, "content": content} for role, content in pairs]

    try:
        user_only = render(messages(("system", SYS), ("user", U1)), add_generation_prompt=False)
        user_gen = render(messages(("system", SYS), ("user", U1)), add_generation_prompt=True)
        turn = render(messages(("system", SYS), ("user", U1), ("assistant", A1)), add_generation_prompt=False)
        two = render(
            messages(("system", SYS), ("user", U1), ("assistant", A1), ("user", U2)), add_generation_prompt=True
        )
        user_suffix = _between(user_only, U1, None)
        assistant_suffix = _between(turn, A1, None)
        generation = _between(user_gen, U1, None)[len(user_suffix) :]
        user_prefix = _between(two, A1, U2)[len(assistant_suffix) :]
        assistant_prefix = _between(two, U1, A1)[len(user_suffix) :]
        head = _between(two, None, SYS)
        system_prefix = head[len(bos) :]
        system_suffix = _between(two, SYS, U1)[: -len(user_prefix)] if user_prefix else _between(two, SYS, U1)
    except ValueError:
        raise TemplateNotProven(
            "the chat template does not render messages as role-wrapped blocks; "
            "no Ollama TEMPLATE can be derived: set chat.template to a registry family"
        ) from None
    parts = [
        ("system", system_prefix, system_suffix),
        ("user", user_prefix, user_suffix),
        ("assistant", assistant_prefix, assistant_suffix),
    ]
    branches = "".join(
        f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{role}" }}}}{_literal(prefix)}'
        f"{{{{ .Content }}}}{_literal(suffix)}"
        for i, (role, prefix, suffix) in enumerate(parts)
    )
    return f"{{{{ range .Messages }}}}{branches}{{{{ end }}}}{{{{ end }}}}{_literal(generation)}"


def _literal(text: str) -> str:
    """Template text that Go prints as is ("{{" would open an action)."""
    return text.replace("{{", '{{ "{{" }}')
