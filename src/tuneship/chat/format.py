"""The ChatFormat: one per run; the only thing that turns conversations into prompts and labels.

Supervised spans come from the template's own rendering: for each assistant turn the template is
rendered up to that turn with the generation prompt, and up to the end of that turn; the text in
between, cut right after the stop token, is what the model learns to write. The text is then
tokenized segment by segment at those boundaries, so the prompt tokens of training are exactly the
prompt tokens of inference and no label depends on searching token ids for a marker.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from tuneship.chat.templates import detect_family, template_for, with_default_system
from tuneship.data.audit import TokenCount
from tuneship.data.conversation import Conversation, Message, SourceRef
from tuneship.errors import ChatFormatError

IGNORE_INDEX = -100
PAD_FALLBACK = "<|tuneship_pad|>"
PROBE = [Message("user", "tuneship-probe-question"), Message("assistant", "tuneship-probe-answer")]


@dataclass
class ChatFormatSpec:
    """What a run's chat format is, saved as chat_format.json beside every artifact."""

    family: str
    template: str
    stop_token: str
    stop_token_ids: list[int]
    pad_token: str
    pad_token_id: int
    is_pad_added: bool
    system_prompt: str | None
    loss_on: str


@dataclass
class Rendered:
    input_ids: list[int]
    labels: list[int]
    text: str
    spans: list[tuple[int, int]]

    @property
    def supervised_count(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


class ChatFormat:
    def __init__(self, tokenizer, spec: ChatFormatSpec):
        self.tokenizer = tokenizer
        self.spec = spec

    # construction --------------------------------------------------------------------------

    @classmethod
    def from_model_dir(cls, model_dir: str, chat_cfg) -> ChatFormat:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
        except OSError as exc:
            raise ChatFormatError(f"cannot load a tokenizer from {model_dir}: {exc}") from None
        return cls.from_tokenizer(tokenizer, chat_cfg.template, chat_cfg.system_prompt, chat_cfg.loss_on)

    @classmethod
    def from_tokenizer(
        cls, tokenizer, template: str = "auto", system_prompt: str | None = None, loss_on: str = "all_assistant"
    ) -> ChatFormat:
        if not getattr(tokenizer, "is_fast", False):
            raise ChatFormatError("tuneship needs a fast (Rust) tokenizer with tokenizer.json")
        family, jinja = _resolve_template(tokenizer, template)
        if system_prompt is not None:
            jinja = with_default_system(jinja, system_prompt)
        tokenizer.chat_template = jinja
        stop_token = _detect_stop_token(tokenizer)
        stop_ids = [tokenizer.convert_tokens_to_ids(stop_token)]
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in stop_ids:
            stop_ids.append(tokenizer.eos_token_id)
        pad_token, is_pad_added = _choose_pad(tokenizer, stop_ids)
        tokenizer.eos_token = stop_token
        tokenizer.pad_token = pad_token
        spec = ChatFormatSpec(
            family,
            jinja,
            stop_token,
            stop_ids,
            pad_token,
            tokenizer.convert_tokens_to_ids(pad_token),
            is_pad_added,
            system_prompt,
            loss_on,
        )
        return cls(tokenizer, spec)

    @classmethod
    def load(cls, folder: Path) -> ChatFormat:
        """A saved format: chat_format.json plus the tokenizer saved beside it."""
        from transformers import AutoTokenizer

        spec = ChatFormatSpec(**json.loads((folder / "chat_format.json").read_text(encoding="utf-8")))
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        tokenizer.chat_template = spec.template
        return cls(tokenizer, spec)

    def save(self, folder: Path) -> None:
        """Tokenizer files (chat_template, eos = stop token, pad) and chat_format.json."""
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(str(folder))
        (folder / "chat_format.json").write_text(json.dumps(asdict(self.spec), indent=2), encoding="utf-8")

    # rendering -----------------------------------------------------------------------------

    def render_text(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def generation_prompt(self, conversation: Conversation) -> str:
        """The inference prompt: everything before the last assistant turn (or all, when a user turn ends
        the conversation), plus the generation prompt."""
        return self.render_text(conversation.prompt_messages(), add_generation_prompt=True)

    def prompt_for(self, question: str, system: str | None = None) -> str:
        messages = ([{"role": "system", "content": system}] if system is not None else []) + [
            {"role": "user", "content": question}
        ]
        return self.render_text(messages, add_generation_prompt=True)

    def special_tokens(self) -> list[str]:
        """Every special token string; none of them may appear in a generated answer."""
        return sorted(_special_tokens(self.tokenizer))

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def render(self, conversation: Conversation) -> Rendered:
        messages = conversation.chat_messages()
        text = self.render_text(messages, add_generation_prompt=False)
        spans = self._supervised_spans(messages, text, conversation.source)
        input_ids: list[int] = []
        labels: list[int] = []
        cursor = 0
        for start, end in spans:
            prompt_ids = self.encode(text[cursor:start]) if start > cursor else []
            answer_ids = self.encode(text[start:end])
            input_ids += prompt_ids + answer_ids
            labels += [IGNORE_INDEX] * len(prompt_ids) + answer_ids
            cursor = end
        if cursor < len(text):
            tail = self.encode(text[cursor:])
            input_ids += tail
            labels += tail if self.spec.loss_on == "everything" else [IGNORE_INDEX] * len(tail)
        return Rendered(input_ids, labels, text, spans)

    def _supervised_spans(self, messages, text: str, source: SourceRef) -> list[tuple[int, int]]:
        if self.spec.loss_on == "everything":
            return [(0, len(text))]
        spans = [
            self._answer_span(messages, i, text, source) for i, m in enumerate(messages) if m["role"] == "assistant"
        ]
        return spans[-1:] if self.spec.loss_on == "last_assistant" else spans

    def _answer_span(self, messages, index: int, text: str, source: SourceRef) -> tuple[int, int]:
        """Where the answer of assistant turn `index` is in `text`: after its generation prompt, through the stop
        token."""
        prompt = self.render_text(messages[:index], add_generation_prompt=True)
        through = self.render_text(messages[: index + 1], add_generation_prompt=False)
        if not (text.startswith(prompt) and text.startswith(through)):
            raise ChatFormatError(
                f"{source}: the chat template renders a conversation differently from its own prefix "
                "(it rewrites earlier turns), so training and inference prompts would differ; "
                "set chat.template to a registry family"
            )
        stop = through.rfind(self.spec.stop_token, len(prompt))
        if stop < 0:
            raise ChatFormatError(
                f"{source}: the template does not end this assistant turn with the stop token {self.spec.stop_token!r}"
            )
        return len(prompt), stop + len(self.spec.stop_token)

    def prompt_answer_ids(self, conversation: Conversation) -> tuple[list[int], list[int]]:
        """(prompt ids, answer ids) of the last answer, for preference training: the prompt is the inference
        prompt (`generation_prompt`, tokenized whole as llama.cpp and Ollama do), the answer runs through the stop
        token."""
        messages = conversation.chat_messages()
        text = self.render_text(messages, add_generation_prompt=False)
        start, end = self._answer_span(messages, len(messages) - 1, text, conversation.source)
        return self.encode(text[:start]), self.encode(text[start:end])

    def measure(self, conversation: Conversation) -> TokenCount:
        """Token length of the rendered conversation and where its last answer starts (the audit's input)."""
        rendered = self.render(conversation)
        prompt_len = len(self.encode(rendered.text[: rendered.spans[-1][0]])) if rendered.spans else 0
        return TokenCount(len(rendered.input_ids), prompt_len)


def _resolve_template(tokenizer, requested: str) -> tuple[str, str]:
    own = getattr(tokenizer, "chat_template", None)
    if requested != "auto":
        return requested, template_for(requested)
    if isinstance(own, str) and own.strip():
        return "own", own
    family = detect_family(set(tokenizer.get_vocab()))
    if family is None:
        raise ChatFormatError(
            "the tokenizer has no chat template and its special tokens match no known family; set "
            "chat.template to one of chatml, llama-3, mistral, zephyr, gemma, phi-3, qwen (the one the base "
            "model was trained with), or use an instruct model that ships a template"
        )
    return family, template_for(family)


def _special_tokens(tokenizer) -> set[str]:
    added = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    return added | set(tokenizer.all_special_tokens)


def _detect_stop_token(tokenizer) -> str:
    """The first special token the template writes after an assistant answer: what generation stops on."""
    probe = [{"role": m.role, "content": m.content} for m in PROBE]
    try:
        rendered = tokenizer.apply_chat_template(probe, tokenize=False)
    except Exception as exc:  # a broken template raises jinja errors of many kinds
        raise ChatFormatError(f"the chat template cannot render a simple conversation: {exc}") from None
    answer_at = rendered.rfind(PROBE[1].content)
    tail = rendered[answer_at + len(PROBE[1].content) :]
    specials = _special_tokens(tokenizer)
    for token_id in tokenizer(tail, add_special_tokens=False)["input_ids"]:
        token = tokenizer.convert_ids_to_tokens(token_id)
        if token in specials:
            return token
    raise ChatFormatError(
        f"the chat template ends an assistant turn with {tail!r}, which holds no special token to stop on; "
        "the model would never learn to stop. Use a template that ends turns with an end-of-turn/eos token"
    )


def _choose_pad(tokenizer, stop_ids: list[int]) -> tuple[str, bool]:
    """A pad token that is no stop token: the tokenizer's own, an unused special token, or a new one.

    Pads are masked by the attention mask, never by id, so this only keeps the saved tokenizer and
    generation_config honest (pad == eos confuses other tools that mask by id).
    """
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id not in stop_ids:
        return tokenizer.pad_token, False
    probe = tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in PROBE], tokenize=False, add_generation_prompt=False
    )
    reserved = set(stop_ids) | {tokenizer.bos_token_id, tokenizer.unk_token_id}
    for token_id, added in sorted(tokenizer.added_tokens_decoder.items()):
        if added.special and token_id not in reserved and added.content not in probe:
            return added.content, False
    tokenizer.add_special_tokens({"pad_token": PAD_FALLBACK})
    return PAD_FALLBACK, True
