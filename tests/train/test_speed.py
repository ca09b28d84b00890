"""The speed-ups keep the loss exact: packing, logits only at supervised positions, measured precision."""

import json

import pytest

from tuneship.chat.format import IGNORE_INDEX
from tuneship.data.conversation import Conversation, Message, SourceRef
from tuneship.train.batches import PackCollator, PadCollator
from tuneship.train.loss import supervised_loss_sum

QUESTIONS = ["What is 2 + 2?", "Name a colour of the sky on a clear day, please.", "Hi"]
ANSWERS = ["Four.", "Blue, mostly, with some white clouds.", "Hello! How can I help?"]


@pytest.fixture
def tiny_model_and_examples(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from tuneship.chat.format import ChatFormat

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.config.use_cache = False
    chat_format = ChatFormat.from_model_dir(tiny_model_dir, _chat_cfg())
    rendered = [
        chat_format.render(Conversation([Message("user", q), Message("assistant", a)], SourceRef("t.jsonl", i)))
        for i, (q, a) in enumerate(zip(QUESTIONS, ANSWERS))
    ]
    features = [{"input_ids": r.input_ids, "labels": r.labels} for r in rendered]
    return model, chat_format, features


def _chat_cfg():
    from tuneship.config import ChatSection

    return ChatSection()


def _mean(model, batch) -> float:
    total, count = supervised_loss_sum(model, batch)
    return float(total) / count


def test_supervised_logits_loss_equals_the_models_own_loss(tiny_model_and_examples):
    model, chat_format, features = tiny_model_and_examples
    batch = PadCollator(chat_format.spec.pad_token_id)(features)
    assert _mean(model, batch) == pytest.approx(float(model(**batch).loss), rel=1e-6)


def test_packed_loss_equals_padded_loss_and_each_example_alone(tiny_model_and_examples):
    model, chat_format, features = tiny_model_and_examples
    padded = _mean(model, PadCollator(chat_format.spec.pad_token_id)(features))
    packed_batch = PackCollator()(features)
    assert packed_batch["input_ids"].shape[0] == 1 and "attention_mask" not in packed_batch
    assert _mean(model, packed_batch) == pytest.approx(padded, rel=1e-6)
    # no cross-example attention: each example's summed loss is the same alone as inside the pack
    alone = [supervised_loss_sum(model, PackCollator()([f])) for f in features]
    packed_total, packed_count = supervised_loss_sum(model, packed_batch)
    assert float(packed_total) == pytest.approx(sum(float(t) for t, _ in alone), rel=1e-6)
    assert packed_count == sum(c for _, c in alone)


def test_packing_changes_the_loss_if_examples_could_attend_to_each_other(tiny_model_and_examples):
    """The check above can fail: the same pack with one running position sequence mixes the examples."""
    model, _, features = tiny_model_and_examples
    batch = PackCollator()(features)
    batch["position_ids"] = batch["position_ids"].new_tensor([list(range(batch["input_ids"].shape[1]))])
    alone = sum(float(supervised_loss_sum(model, PackCollator()([f]))[0]) for f in features)
    assert float(supervised_loss_sum(model, batch)[0]) != pytest.approx(alone, rel=1e-5)


def test_pack_collator_ignores_each_examples_first_token_and_restarts_positions(tiny_model_and_examples):
    _, _, features = tiny_model_and_examples
    batch = PackCollator()(features)
    starts = [0, len(features[0]["input_ids"]), len(features[0]["input_ids"]) + len(features[1]["input_ids"])]
    assert all(int(batch["position_ids"][0, s]) == 0 for s in starts)
    assert all(int(batch["labels"][0, s]) == IGNORE_INDEX for s in starts)
    supervised = sum(1 for f in features for label in f["labels"] if label != IGNORE_INDEX)
    assert int((batch["labels"] != IGNORE_INDEX).sum()) == supervised


def test_auto_precision_is_measured_once_and_cached(tmp_path, monkeypatch):
    from tuneship.train import precision

    monkeypatch.setenv("TUNESHIP_CACHE", str(tmp_path))
    chosen, why = precision.cpu_auto_precision()
    cache = json.loads((tmp_path / "cpu_precision.json").read_text())
    (rates,) = cache.values()
    assert rates["fp32"] > 0 and rates["bf16"] > 0 and "GFLOP/s" in why
    assert chosen == ("bf16" if rates["bf16"] / rates["fp32"] >= precision.BF16_MIN_SPEEDUP else "fp32")
    # the cached verdict is what later runs use: a CPU that measured bf16 slow trains in fp32
    key = next(iter(cache))
    (tmp_path / "cpu_precision.json").write_text(json.dumps({key: {"fp32": 200.0, "bf16": 100.0}}))
    assert precision.cpu_auto_precision()[0] == "fp32"
    (tmp_path / "cpu_precision.json").write_text(json.dumps({key: {"fp32": 200.0, "bf16": 800.0}}))
    assert precision.cpu_auto_precision()[0] == "bf16"


def test_compute_threads_are_shared_among_processes_on_the_machine(monkeypatch):
    import torch

    from tuneship.train.precision import physical_cores, set_compute_threads

    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        assert set_compute_threads() == physical_cores() >= 1
        assert set_compute_threads(processes_per_machine=physical_cores() * 4) == 1 == torch.get_num_threads()
        monkeypatch.setenv("OMP_NUM_THREADS", "3")  # a person sharing the machine among jobs decides
        assert set_compute_threads() == 3 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def _loss_and_grads(model, batch):
    model.zero_grad()
    total, count = supervised_loss_sum(model, batch)
    (total / count).backward()
    return float(total) / count, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("explicit_up_to", [0, 10_000], ids=["sdpa-per-example", "explicit-softmax"])
def test_packed_attention_gives_the_padded_loss_and_gradients(tiny_model_and_examples, monkeypatch, explicit_up_to):
    """Per-example attention (both of its kernels) computes what a padded batch computes, gradients included."""
    from tuneship.train import attention

    model, chat_format, features = tiny_model_and_examples
    monkeypatch.setattr(attention, "EXPLICIT_ATTENTION_MAX_TOKENS", explicit_up_to)
    padded_loss, padded_grads = _loss_and_grads(model, PadCollator(chat_format.spec.pad_token_id)(features))
    attention.use_packed_attention(model)
    calls, segment_slots = [], attention.segment_slots
    monkeypatch.setattr(attention, "segment_slots", lambda bounds: calls.append(bounds) or segment_slots(bounds))
    packed_loss, packed_grads = _loss_and_grads(model, PackCollator()(features))
    assert len(calls) == model.config.num_hidden_layers  # every layer took the per-example path
    assert packed_loss == pytest.approx(padded_loss, rel=1e-5)
    assert packed_grads.keys() == padded_grads.keys()
    for name, grad in packed_grads.items():
        assert grad == pytest.approx(padded_grads[name], rel=1e-4, abs=1e-6), name


def test_segment_slots_read_each_example_and_mark_its_padding():
    import torch

    from tuneship.train.attention import segment_slots

    index, is_real = segment_slots(torch.tensor([0, 3, 4, 6]))
    assert index.tolist() == [[0, 1, 2], [3, 3, 3], [4, 5, 5]]
    assert is_real.tolist() == [[True, True, True], [True, False, False], [True, True, False]]


@pytest.mark.parametrize("extra", [{"sliding_window": 3}, {"softcap": 50.0}, {"s_aux": 0.5}])
def test_packed_attention_falls_back_to_sdpa_for_attention_that_is_more_than_causal(
    tiny_model_and_examples, monkeypatch, extra
):
    """A window shorter than an example, soft-capping, sinks: what the per-example kernels do not apply goes to
    transformers' SDPA function, with transformers' own mask."""
    from tuneship.train import attention

    model, _, features = tiny_model_and_examples
    attention.use_packed_attention(model)
    monkeypatch.setattr(attention, "segment_slots", lambda bounds: pytest.fail("per-example path taken"))
    sdpa_calls = []
    monkeypatch.setattr(
        "transformers.integrations.sdpa_attention.sdpa_attention_forward",
        lambda module, query, *args, **kwargs: sdpa_calls.append(kwargs) or (query.transpose(1, 2), None),
    )
    import torch

    query = torch.randn(1, 4, 10, 8)
    key = value = torch.randn(1, 2, 10, 8)
    bounds = PackCollator()([{"input_ids": [1] * 6, "labels": [1] * 6}, {"input_ids": [1] * 4, "labels": [1] * 4}])
    output, _ = attention.packed_sdpa_forward(
        model.model.layers[0].self_attn,
        query,
        key,
        value,
        None,
        cu_seq_lens_q=bounds["cu_seq_lens_q"],
        sliding_window=3,
    )
    assert output.shape == (1, 10, 4, 8)
