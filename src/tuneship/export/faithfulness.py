"""How faithful each quantized GGUF is to the unquantized export, measured on llama.cpp's logits.

Which positions count: each eval prompt, rendered and tokenized by the run's ChatFormat, is followed by the
unquantized GGUF's (f16 by default) own greedy answer to it in llama.cpp, stop token included. That sequence is
scored by the unquantized GGUF and by each quant. Only the positions that predict an answer token count:
position len(prompt) - 1 predicts the first answer token, the last counted position predicts the last one (the
stop token when the answer stopped). Prompt positions are the same text for every model and not what a person
reads; the answer positions are where a quant's damage shows, including whether it still stops. The answers are
the token ids of the export's own answer check of the unquantized GGUF (`scored_sequences`), not generated again.
A LoRA export (export.merge false) is measured the other way round: on the answers of what serves (the LoRA on
the quantized base), which the f16 base with the same LoRA only scores (`measure_on_served_answers`).

Per counted position: KL(f16 || quant) of the two softmax distributions over the whole vocabulary, in float64,
and whether the two most likely tokens are the same (top-1 agreement). Both are means over all positions.

Memory: KL needs both distributions in full (a top-k cut drops most of the mass of a flat distribution, and on
small models the distributions are flat), so the reference log-probs are kept as full float64 rows, but only for
a chunk of sequences whose rows fit MEMORY_BUDGET_BYTES. Per chunk, the reference GGUF and then each quant are
loaded one at a time (llama.cpp maps the file, so a reload is cheap); a quant's rows are compared as they come
and dropped. A chunk's sequences are scored together in one llama.cpp batch (evaluate/llama_parallel.py: their
shared start once, one sequence each), the same way by every model, so the reference scored against itself
gives exactly 0 and the figures are the same on every rerun.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

MEMORY_BUDGET_BYTES = 256 * 2**20


@dataclass
class Faithfulness:
    """One quant against the reference GGUF, over `positions` answer positions."""

    kl_divergence: float
    top1_agreement: float
    positions: int

    def to_summary(self) -> dict:
        return {"kl_vs_f16": self.kl_divergence, "top1_agreement": self.top1_agreement, "kl_positions": self.positions}


@dataclass
class ScoredSequence:
    """A rendered prompt followed by the reference model's greedy answer; positions = answer tokens."""

    tokens: list[int]
    answer_start: int

    @property
    def positions(self) -> int:
        return len(self.tokens) - self.answer_start


def scored_sequences(generation) -> list[ScoredSequence]:
    """The reference GGUF's answers (a GGUFGeneration) as sequences to score: prompt tokens, then answer tokens."""
    return [ScoredSequence(prompt + answer, len(prompt)) for prompt, answer in generation.token_ids]


def greedy_sequences(reference: Path, chat_format, prompts, max_new_tokens: int) -> list[ScoredSequence]:
    """Each prompt through the ChatFormat, followed by the reference GGUF's greedy answer and its stop token."""
    from tuneship.evaluate.backends import generate_with_gguf

    return scored_sequences(generate_with_gguf(reference, chat_format, prompts, max_new_tokens))


def measure_quants(
    files: list[tuple[str, Path]], sequences: list[ScoredSequence], reference_logits: list | None = None
) -> dict[str, Faithfulness]:
    """Every file after the first (the quants) against the first (the unquantized export), on `sequences`
    (with the first's logits of them when it kept them while generating)."""
    (_, reference), *quants = files
    if not quants:
        return {}
    return measure_faithfulness(reference, dict(quants), sequences, reference_logits=reference_logits)


def measure_faithfulness(
    reference: Path,
    quants: dict[str, Path],
    sequences: list[ScoredSequence],
    memory_budget_bytes: int = MEMORY_BUDGET_BYTES,
    lora: Path | None = None,
    reference_logits: list | None = None,
) -> dict[str, Faithfulness]:
    """Each quant against `reference`; with `lora`, the same LoRA GGUF applied on every one of them (a LoRA on a
    quantized base against the same LoRA on the f16 base: what quantizing the base does to the version).
    `reference_logits`: the reference's logits of each sequence's answer positions, kept when it generated those
    answers (GGUFGeneration.answer_logits), so the reference is not run again."""
    if reference_logits is not None:
        bytes_per_position = 8 * reference_logits[0].shape[1]
    else:
        with _llama(reference) as llm:
            bytes_per_position = 8 * llm.n_vocab()
    totals = {name: _Totals() for name in quants}
    start = 0
    for chunk in _chunks(sequences, bytes_per_position, memory_budget_bytes):
        if reference_logits is not None:
            reference_rows = [_log_softmax(rows) for rows in reference_logits[start : start + len(chunk)]]
        else:
            with _llama(reference) as llm:
                reference_rows = _answer_log_probs(llm, chunk, lora)
        start += len(chunk)
        for name, path in quants.items():
            with _llama(path) as llm:
                for rows, quant_rows in zip(reference_rows, _answer_log_probs(llm, chunk, lora)):
                    totals[name].add(rows, quant_rows)
    return {name: total.result() for name, total in totals.items()}


def measure_on_served_answers(reference: Path, quant: Path, quant_generation, lora: Path) -> Faithfulness:
    """A LoRA on the quantized base (what serves) against the same LoRA on `reference` (the f16 base), on the
    served model's own answers (a GGUFGeneration with their logits kept, else scored again): the reference only
    scores them, in one batch per chunk, and generates nothing."""
    sequences = scored_sequences(quant_generation)
    kept = quant_generation.answer_logits
    if kept is None:
        return measure_faithfulness(reference, {"quant": quant}, sequences, lora=lora)["quant"]
    total, start = _Totals(), 0
    with _llama(reference) as llm:
        for chunk in _chunks(sequences, 8 * llm.n_vocab(), MEMORY_BUDGET_BYTES):
            for rows, quant_rows in zip(_answer_log_probs(llm, chunk, lora), kept[start : start + len(chunk)]):
                total.add(rows, _log_softmax(quant_rows))
            start += len(chunk)
    return total.result()


def kl_gate_failures(measured: dict[str, Faithfulness], limit: float | None) -> list[str]:
    """export.max_kl_divergence: a quant over the limit (or with a non-finite KL) fails the export."""
    if limit is None:
        return []
    return [
        f"gguf-{name}: KL vs f16 {result.kl_divergence:.4f} > export.max_kl_divergence {limit} "
        f"(top-1 agreement {result.top1_agreement:.3f}); use a larger quant (Q5_K_M, Q8_0) or raise the limit"
        for name, result in measured.items()
        if not result.kl_divergence <= limit  # NaN fails too
    ]


class _Totals:
    def __init__(self) -> None:
        self.kl = 0.0
        self.agreeing = 0
        self.positions = 0

    def add(self, reference_log_probs, quant_log_probs) -> None:
        import numpy as np

        divergence = np.sum(np.exp(reference_log_probs) * (reference_log_probs - quant_log_probs), axis=1)
        self.kl += float(divergence.sum())
        self.agreeing += int(np.sum(reference_log_probs.argmax(axis=1) == quant_log_probs.argmax(axis=1)))
        self.positions += len(divergence)

    def result(self) -> Faithfulness:
        count = max(self.positions, 1)
        return Faithfulness(self.kl / count, self.agreeing / count, self.positions)


def _answer_log_probs(llm, sequences: list[ScoredSequence], lora: Path | None = None) -> list:
    """Per sequence, float64 log-softmax rows of the positions that predict its answer tokens."""
    from tuneship.evaluate.llama_parallel import position_logits

    return [
        _log_softmax(logits)
        for logits in position_logits(llm, [(s.tokens, s.answer_start - 1) for s in sequences], lora)
    ]


def _log_softmax(logits):
    import numpy as np

    logits = logits.astype(np.float64)
    peak = logits.max(axis=1, keepdims=True)
    return logits - (peak + np.log(np.exp(logits - peak).sum(axis=1, keepdims=True)))


def _chunks(sequences: list[ScoredSequence], bytes_per_position: int, budget: int) -> Iterator[list[ScoredSequence]]:
    """Consecutive sequences whose reference rows fit the budget (a sequence alone may exceed it)."""
    from tuneship.evaluate.llama_parallel import consecutive_groups

    return consecutive_groups(sequences, lambda sequence: sequence.positions * bytes_per_position, budget)


@contextmanager
def _llama(path: Path):
    from tuneship.evaluate.backends import LOADER_CONTEXT, load_gguf

    llm = load_gguf(path, LOADER_CONTEXT)
    try:
        yield llm
    finally:
        llm.close()
