"""The gate: challenger vs champion, both in llama.cpp on the quantized GGUF that would ship, greedy, each
with its own ChatFormat (and a few-shot version's shots before every prompt), on three sets:

- golden: never trained on; exact match and F1 may not drop more than `loop.max_regression`;
- replay: earlier examples; the same rule (old facts must still hold);
- new: this cycle's new examples; the challenger's F1 must be strictly better than the champion's.

And the challenger must stop on every prompt (stop rate 100%). Every number goes into the decision.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from tuneship.chat.format import ChatFormat
from tuneship.config import Config
from tuneship.evaluate.backends import gguf_answers
from tuneship.evaluate.checks import check_answer, summarize
from tuneship.evaluate.prompts import EvalPrompt
from tuneship.loop.registry import version_chat_format
from tuneship.loop.shots import prompts_with_shots
from tuneship.loop.tables import Version

SETS = ("golden", "replay", "new")


@dataclass
class GateDecision:
    is_promoted: bool
    reasons: list[str]
    metrics: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


def measure(
    gguf: Path, chat_format: ChatFormat, sets: dict[str, list[EvalPrompt]], max_new_tokens: int, shots: list[dict]
) -> dict:
    """{set: summary (stop_rate, exact_match, f1, ...)} for one GGUF, with a few-shot version's shots before
    every prompt."""
    markers = chat_format.special_tokens()
    results = {}
    for name, prompts in sets.items():
        if not prompts:
            continue
        answers, _ = gguf_answers(gguf, chat_format, prompts_with_shots(prompts, shots), max_new_tokens)
        checks = [check_answer(a.text, a.stopped, p.expected, markers) for a, p in zip(answers, prompts)]
        results[name] = {**summarize(checks), "answers": [c.answer for c in checks]}
    return results


def gate_decision(champion: dict, challenger: dict, max_regression: float) -> GateDecision:
    """Promote or not, from both versions' measurements, with a reason for each failed rule."""
    reasons, passed = [], True
    for name in SETS:
        if name not in challenger:
            continue
        ours, theirs = challenger[name], champion.get(name, {})
        if ours["stop_rate"] < 1.0:
            passed = False
            reasons.append(f"{name}: stop rate {ours['stop_rate']:.0%} < 100%")
        for metric in ("exact_match", "f1"):
            if metric not in ours or metric not in theirs:
                continue
            delta = ours[metric] - theirs[metric]
            if name == "new" and metric == "f1" and delta <= 0:
                passed = False
                reasons.append(f"new: F1 {ours['f1']:.3f} is not better than the champion's {theirs['f1']:.3f}")
            elif name != "new" and delta < -max_regression:
                passed = False
                reasons.append(
                    f"{name}: {metric} {ours[metric]:.3f} fell {-delta:.3f} below the champion's {theirs[metric]:.3f} "
                    f"(loop.max_regression={max_regression:g})"
                )
    if passed:
        reasons.append("stops on every prompt, no regression on golden/replay, better on the new examples")
    metrics = {
        "champion": {k: _numbers(v) for k, v in champion.items()},
        "challenger": {k: _numbers(v) for k, v in challenger.items()},
    }
    return GateDecision(passed, reasons, metrics)


def _numbers(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k != "answers"}


def run_gate(champion: Version, challenger: Version, sets: dict[str, list[EvalPrompt]], cfg: Config) -> GateDecision:
    """Both registry versions (their GGUF, ChatFormat, and shots when few-shot) on the same sets."""
    tokens = cfg.eval.max_new_tokens
    old = measure(Path(champion.gguf), version_chat_format(champion), sets, tokens, champion.shots)
    new = measure(Path(challenger.gguf), version_chat_format(challenger), sets, tokens, challenger.shots)
    return gate_decision(old, new, cfg.loop.max_regression)
