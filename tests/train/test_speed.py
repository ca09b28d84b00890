"""The speed-ups keep the loss exact: packing, logits only at supervised positions, measured precision."""

import json

import pytest

from tuneship.chat.format import IGNORE_INDEX
from tuneship.data.conversation import Conversation, Message, SourceRef
from tuneship.train.batches import SHARED_PREFIX, PackCollator, PadCollator, predicting_end, shared_prefix_length
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


def test_the_models_own_loss_reads_a_packed_rows_shifted_targets(tiny_model_and_examples):
    """train.supervised_logits=false: transformers' loss takes the row's `shift_labels` as they are."""
    model, _, features = tiny_model_and_examples
    batch = PackCollator()(features)
    assert float(model(**batch).loss) == pytest.approx(_mean(model, batch), rel=1e-6)


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


def test_pack_collator_restarts_positions_and_leaves_out_what_predicts_nothing(tiny_model_and_examples):
    """Each example's segment ends at its last supervised prediction: the stop token (an input whose next token
    is not supervised) and the template's newline after it are not computed; the shifted targets keep every
    supervised token, the stop token last."""
    _, chat_format, features = tiny_model_and_examples
    batch = PackCollator()(features)
    ends = [predicting_end(f["labels"]) for f in features]
    assert [len(f["input_ids"]) - end for f, end in zip(features, ends)] == [2, 2, 2]  # <|im_end|> and "\n"
    starts = [0, ends[0], ends[0] + ends[1]]
    assert batch["cu_seq_lens_q"].tolist() == [*starts, sum(ends)]
    assert all(int(batch["position_ids"][0, s]) == 0 for s in starts)
    targets = batch["shift_labels"][0]
    assert [int(targets[s - 1]) for s in starts[1:] + [sum(ends)]] == [chat_format.spec.stop_token_ids[0]] * 3
    supervised = [label for f in features for label in f["labels"] if label != IGNORE_INDEX]
    assert targets[targets != IGNORE_INDEX].tolist() == supervised


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


def test_a_matmul_rate_can_leave_emulated_bf16_unmeasured():
    """Where bf16 is emulated one large bf16 product takes minutes: the benchmark measures fp32 alone there."""
    from tuneship.train.precision import measure_matmul_rates

    rates = measure_matmul_rates((64, 64, 64), seconds=0.01, bf16=False)
    assert rates.fp32 > 0 and rates.bf16 == 0.0 and rates.bf16_speedup == 0.0


def test_compute_threads_are_shared_among_processes_on_the_machine(monkeypatch):
    import torch

    from tuneship.train.precision import compute_threads, physical_cores, set_compute_threads

    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        assert set_compute_threads() == physical_cores() >= 1
        assert set_compute_threads(processes_per_machine=physical_cores() * 4) == 1 == torch.get_num_threads()
        monkeypatch.setenv("OMP_NUM_THREADS", "3")  # a person (or pytest-xdist's conftest) sharing the machine
        assert set_compute_threads() == 3 == torch.get_num_threads() == compute_threads()  # llama.cpp's too
    finally:
        torch.set_num_threads(before)


def _loss_and_grads(model, batch):
    model.zero_grad()
    total, count = supervised_loss_sum(model, batch)
    (total / count).backward()
    return float(total) / count, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_gradients(actual: dict, expected: dict) -> None:
    """Every parameter's gradient equal within float rounding (torch's own comparison: pytest.approx walks a
    tensor element by element in Python, half a minute for the embedding's 1.5M)."""
    import torch

    assert actual.keys() == expected.keys()
    for name, grad in actual.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-6, msg=lambda why: f"{name}: {why}")


@pytest.mark.parametrize("explicit_up_to", [0, 10_000], ids=["sdpa-per-example", "explicit-softmax"])
def test_packed_attention_gives_the_padded_loss_and_gradients(tiny_model_and_examples, monkeypatch, explicit_up_to):
    """Per-example attention (both of its kernels) computes what a padded batch computes, gradients included."""
    from tuneship.train import attention

    model, chat_format, features = tiny_model_and_examples
    monkeypatch.setattr(attention, "EXPLICIT_ATTENTION_MAX_TOKENS", explicit_up_to)
    padded_loss, padded_grads = _loss_and_grads(model, PadCollator(chat_format.spec.pad_token_id)(features))
    attention.use_packed_attention(model)
    calls, layouts, segment_slots, example_layout = [], [], attention.segment_slots, attention.example_layout
    monkeypatch.setattr(attention, "segment_slots", lambda bounds: calls.append(bounds) or segment_slots(bounds))
    monkeypatch.setattr(attention, "example_layout", lambda *args: layouts.append(args) or example_layout(*args))
    packed_loss, packed_grads = _loss_and_grads(model, PackCollator()(features))
    assert len(layouts) == model.config.num_hidden_layers  # every layer took the per-example path
    assert len(calls) == 1  # the row's layout worked out once for all of them
    assert packed_loss == pytest.approx(padded_loss, rel=1e-5)
    _assert_same_gradients(packed_grads, padded_grads)


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
        **extra,
    )
    assert output.shape == (1, 10, 4, 8)
    assert len(sdpa_calls) == 1 and sdpa_calls[0].items() >= extra.items()


@pytest.mark.parametrize("explicit_up_to", [0, 10_000], ids=["sdpa-per-example", "explicit-softmax"])
def test_a_shared_prefix_computed_once_gives_the_padded_loss_and_gradients(
    tiny_model_and_examples, monkeypatch, explicit_up_to
):
    """The examples share the template's system prompt: the row holds it once, each example sees its keys, and
    loss and every gradient are the padded batch's."""
    from tuneship.train import attention

    model, chat_format, features = tiny_model_and_examples
    monkeypatch.setattr(attention, "EXPLICIT_ATTENTION_MAX_TOKENS", explicit_up_to)
    padded_loss, padded_grads = _loss_and_grads(model, PadCollator(chat_format.spec.pad_token_id)(features))
    attention.use_packed_attention(model)
    batch = PackCollator(share_prefix=True)(features)
    shared = batch[SHARED_PREFIX]
    assert shared > 10  # SmolLM2's template writes its default system prompt into every example
    assert batch["input_ids"].shape[1] == sum(predicting_end(f["labels"]) for f in features) - 2 * shared
    calls, segment_slots = [], attention.segment_slots
    monkeypatch.setattr(attention, "segment_slots", lambda bounds: calls.append(bounds) or segment_slots(bounds))
    shared_loss, shared_grads = _loss_and_grads(model, batch)
    assert len(calls) == 1  # the examples' layout worked out once for every layer
    assert shared_loss == pytest.approx(padded_loss, rel=1e-5)
    _assert_same_gradients(shared_grads, padded_grads)


def test_a_shared_prefix_changes_the_loss_if_examples_could_not_see_it(tiny_model_and_examples):
    """The check above can fail: the same row attended per segment (the prefix hidden from the examples) differs."""
    from tuneship.train import attention

    model, chat_format, features = tiny_model_and_examples
    padded_loss = _mean(model, PadCollator(chat_format.spec.pad_token_id)(features))
    attention.use_packed_attention(model)
    batch = PackCollator(share_prefix=True)(features)
    del batch[SHARED_PREFIX]
    assert _mean(model, batch) != pytest.approx(padded_loss, rel=1e-4)


def test_the_shared_prefix_stops_before_any_supervised_prediction_and_any_difference():
    def example(ids, first_supervised):
        return {"input_ids": ids, "labels": [IGNORE_INDEX] * first_supervised + ids[first_supervised:]}

    assert shared_prefix_length([example([1, 2, 3, 4, 5, 6], 5), example([1, 2, 3, 9, 5, 6], 5)]) == 3
    # position 3 predicts token 4, supervised in the second example: the prefix ends before it
    assert shared_prefix_length([example([1, 2, 3, 4, 5, 6], 5), example([1, 2, 3, 4, 5, 7], 4)]) == 3
    assert shared_prefix_length([example([1, 2, 3], 3), example([1, 2, 3], 3)]) == 2  # never a whole example
    assert shared_prefix_length([example([1, 2, 3, 4], 0), example([1, 2, 3, 4], 0)]) == 0  # loss on everything
    assert shared_prefix_length([example([7, 2, 3, 4], 3), example([1, 2, 3, 4], 3)]) == 0
    assert shared_prefix_length([example([1, 2, 3, 4], 3)]) == 0


def test_a_shared_prefix_row_keeps_labels_positions_and_bounds():
    features = [
        {"input_ids": [1, 2, 3, 4, 5], "labels": [IGNORE_INDEX] * 4 + [5]},
        {"input_ids": [1, 2, 3, 6, 7, 8], "labels": [IGNORE_INDEX] * 4 + [7, 8]},
    ]
    batch = PackCollator(share_prefix=True)(features)
    assert batch[SHARED_PREFIX] == 3
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 6, 7]]  # each example's last token predicts nothing
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 3, 4]]
    assert batch["shift_labels"].tolist() == [[IGNORE_INDEX] * 3 + [5, 7, 8]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 4, 6]
    assert SHARED_PREFIX not in PackCollator()(features)


@pytest.mark.parametrize("window", [None, 4], ids=["per-example path", "sliding window: SDPA with the row's mask"])
def test_shared_prefix_attention_is_each_examples_own_causal_attention(monkeypatch, window):
    """Random states of a row [prefix | example 1 | example 2]: each example's output is plain causal attention
    over its own prefix + tokens (within the window), computed one example at a time."""
    import torch

    from tuneship.train import attention

    torch.manual_seed(0)
    shared, lengths = 5, [4, 7]
    row = shared + sum(lengths)
    query, key, value = torch.randn(1, 4, row, 8), torch.randn(1, 2, row, 8), torch.randn(1, 2, row, 8)
    bounds = torch.tensor([0, shared, shared + lengths[0], row], dtype=torch.int32)
    module = type("Attention", (), {"num_key_value_groups": 2, "is_causal": True})()
    output, _ = attention.packed_sdpa_forward(
        module, query, key, value, None, cu_seq_lens_q=bounds, sliding_window=window, shared_prefix_tokens=shared
    )
    expected = []
    for start, end in [(0, shared), (shared, shared + lengths[0]), (shared + lengths[0], row)]:
        keys = list(range(shared)) + list(range(start, end)) if start else list(range(end))
        queries = len(keys) - (end - start)
        position = torch.arange(len(keys))
        allowed = position[None, :] <= position[queries:, None]
        if window is not None:
            allowed &= position[queries:, None] - position[None, :] < window
        expected.append(
            torch.nn.functional.scaled_dot_product_attention(
                query[:, :, start:end],
                key[:, :, keys].repeat_interleave(2, dim=1),
                value[:, :, keys].repeat_interleave(2, dim=1),
                attn_mask=allowed,
            ).transpose(1, 2)
        )
    assert output.shape == (1, row, 4, 8)
    assert torch.allclose(output, torch.cat(expected, dim=1), atol=1e-5)


@pytest.mark.parametrize("collator", ["packed", "padded"])
def test_the_last_mlp_runs_at_the_supervised_positions_only_and_changes_no_gradient(
    tiny_model_and_examples, monkeypatch, collator
):
    from tuneship.train import loss

    model, chat_format, features = tiny_model_and_examples
    batch = PackCollator()(features) if collator == "packed" else PadCollator(chat_format.spec.pad_token_id)(features)
    rows_seen = []
    model.model.layers[-1].mlp.down_proj.register_forward_hook(lambda m, args, out: rows_seen.append(args[0].shape[1]))
    kept_loss, kept_grads = _loss_and_grads(model, batch)
    positions, _ = loss.next_token_targets(batch)
    assert rows_seen == [positions.numel()] < [batch["input_ids"].shape[1]]
    assert "forward" not in vars(model.model.layers[-1].mlp)  # the model's own MLP again afterwards
    monkeypatch.setattr(loss, "last_mlp", lambda model: None)
    full_loss, full_grads = _loss_and_grads(model, batch)
    assert rows_seen[-1] == batch["input_ids"].shape[1]
    assert kept_loss == pytest.approx(full_loss, rel=1e-6)
    _assert_same_gradients(kept_grads, full_grads)


def test_a_mixture_of_experts_keeps_its_last_mlp_on_every_position(tiny_model_dir):
    """Its routing (and the load-balancing loss) sees every token: nothing is cut there."""
    from transformers import AutoConfig, AutoModelForCausalLM, MixtralConfig

    from tuneship.train.loss import last_mlp

    dense = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_model_dir))
    assert last_mlp(dense) is dense.model.layers[-1].mlp
    config = MixtralConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_local_experts=2,
        num_experts_per_tok=1,
    )
    assert last_mlp(AutoModelForCausalLM.from_config(config)) is None
