"""The ChatFormat contract: exactly the assistant answers and their stop token are supervised."""

import pytest

from tuneship.chat.format import IGNORE_INDEX, ChatFormat
from tuneship.data.conversation import Conversation, Message, SourceRef
from tuneship.errors import ChatFormatError

TWO_TURNS = Conversation(
    [
        Message("user", "What is 2+2?"),
        Message("assistant", "It is 4."),
        Message("user", "And 3+3?"),
        Message("assistant", "It is 6."),
    ],
    SourceRef("t.jsonl", 1),
)


REGISTRY_TOKENS = [
    "[INST]",
    "[/INST]",
    "</s>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<|end|>",
    "<|assistant|>",
    "<|user|>",
    "<|system|>",
]


def add_family_tokens(tokenizer):
    """The special tokens of every registry family, with </s> as eos (mistral, zephyr)."""
    tokenizer.add_special_tokens({"additional_special_tokens": REGISTRY_TOKENS})
    tokenizer.eos_token = "</s>"
    return tokenizer


def supervised_runs(chat_format, conversation):
    """The decoded runs of consecutive supervised tokens."""
    rendered = chat_format.render(conversation)
    runs, current = [], []
    for token, label in zip(rendered.input_ids, rendered.labels):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    if current:
        runs.append(current)
    return [chat_format.tokenizer.decode(run) for run in runs]


def llama3_tokenizer(tokenizer):
    tokenizer.add_special_tokens(
        {"additional_special_tokens": ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]}
    )
    tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token = "<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>"
    tokenizer.chat_template = None
    return tokenizer


def zephyr_tokenizer(tokenizer):
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>", "<|system|>", "</s>"]})
    tokenizer.eos_token, tokenizer.pad_token = "</s>", "</s>"
    tokenizer.chat_template = None
    return tokenizer


def test_smollm2_chatml_supervises_answers_and_im_end_with_pad_equal_eos(tokenizer):
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # SmolLM2 ships pad == eos == <|im_end|>
    chat_format = ChatFormat.from_tokenizer(tokenizer)
    assert chat_format.spec.stop_token == "<|im_end|>"
    assert supervised_runs(chat_format, TWO_TURNS) == ["It is 4.<|im_end|>", "It is 6.<|im_end|>"]
    assert chat_format.spec.pad_token_id not in chat_format.spec.stop_token_ids


def test_llama3_detected_from_special_tokens_and_supervises_eot(tokenizer):
    chat_format = ChatFormat.from_tokenizer(llama3_tokenizer(tokenizer))
    assert chat_format.spec.family == "llama-3" and chat_format.spec.stop_token == "<|eot_id|>"
    assert supervised_runs(chat_format, TWO_TURNS) == ["It is 4.<|eot_id|>", "It is 6.<|eot_id|>"]
    assert chat_format.render(TWO_TURNS).text.startswith("<|begin_of_text|><|start_header_id|>user")


def test_zephyr_pad_equal_eos_still_supervises_eos(tokenizer):
    chat_format = ChatFormat.from_tokenizer(zephyr_tokenizer(tokenizer), template="zephyr")
    assert chat_format.spec.stop_token == "</s>"
    assert supervised_runs(chat_format, TWO_TURNS) == ["It is 4.</s>", "It is 6.</s>"]
    assert chat_format.spec.pad_token != "</s>"


@pytest.mark.parametrize(
    "family,stop",
    [
        ("mistral", "</s>"),
        ("gemma", "<end_of_turn>"),
        ("phi-3", "<|end|>"),
        ("qwen", "<|im_end|>"),
        ("chatml", "<|im_end|>"),
    ],
)
def test_every_registry_family_supervises_answer_and_stop(tokenizer, family, stop):
    add_family_tokens(tokenizer)
    chat_format = ChatFormat.from_tokenizer(tokenizer, template=family)
    assert chat_format.spec.stop_token == stop
    assert supervised_runs(chat_format, TWO_TURNS) == [f"It is 4.{stop}", f"It is 6.{stop}"]


def test_training_prompt_tokens_equal_inference_prompt_tokens(tokenizer):
    chat_format = ChatFormat.from_tokenizer(tokenizer, system_prompt="Be brief.")
    single = Conversation([Message("user", "Name a colour?"), Message("assistant", "Teal.")], SourceRef("t", 1))
    rendered = chat_format.render(single)
    first_supervised = next(i for i, label in enumerate(rendered.labels) if label != IGNORE_INDEX)
    assert rendered.input_ids[:first_supervised] == chat_format.encode(chat_format.generation_prompt(single))


def test_loss_on_last_assistant_and_everything(tokenizer):
    last = ChatFormat.from_tokenizer(tokenizer, loss_on="last_assistant")
    assert supervised_runs(last, TWO_TURNS) == ["It is 6.<|im_end|>"]
    everything = ChatFormat.from_tokenizer(tokenizer, loss_on="everything")
    rendered = everything.render(TWO_TURNS)
    assert rendered.labels == rendered.input_ids


def test_default_system_prompt_is_baked_into_the_saved_template(tokenizer, tmp_path):
    chat_format = ChatFormat.from_tokenizer(tokenizer, system_prompt="You answer from facts.")
    text = chat_format.render(TWO_TURNS).text
    assert text.startswith("<|im_start|>system\nYou answer from facts.<|im_end|>")
    assert "SmolLM" not in text  # the template's own default system prompt is replaced
    chat_format.save(tmp_path)
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    messages = TWO_TURNS.chat_messages()
    assert reloaded.apply_chat_template(messages, tokenize=False) == text
    assert reloaded.eos_token == "<|im_end|>" and reloaded.pad_token == chat_format.spec.pad_token
    assert ChatFormat.load(tmp_path).render(TWO_TURNS).input_ids == chat_format.render(TWO_TURNS).input_ids


def test_own_system_message_wins_over_the_default(tokenizer):
    chat_format = ChatFormat.from_tokenizer(tokenizer, system_prompt="Default.")
    with_own = Conversation(TWO_TURNS.messages, SourceRef("t", 1), system="Own.")
    text = chat_format.render(with_own).text
    assert "Own." in text and "Default." not in text


def test_tokenizer_without_template_uses_the_family_of_its_special_tokens(tokenizer):
    tokenizer.chat_template = None
    assert ChatFormat.from_tokenizer(tokenizer).spec.family == "chatml"


def test_no_template_and_no_known_tokens_names_the_options():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1, "hello": 2}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    bare = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")
    with pytest.raises(ChatFormatError, match="chatml, llama-3, mistral, zephyr, gemma, phi-3, qwen"):
        ChatFormat.from_tokenizer(bare)


def test_template_that_never_ends_a_turn_with_a_special_token_is_refused(tokenizer):
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    with pytest.raises(ChatFormatError, match="never learn to stop"):
        ChatFormat.from_tokenizer(tokenizer)
