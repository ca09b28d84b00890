"""The gate: challenger vs champion, both in llama.cpp as they serve (the quantized GGUF that would ship, or in
adapter format the LoRA GGUF on the base's quantized GGUF), greedy, each
with its own ChatFormat (and a few-shot version's shots before every prompt), judged prompt by prompt.

- golden and replay (facts that must still hold): only the prompts the champion answers right are gated. A short
  reference (up to SHORT_ANSWER_WORDS words) the champion gives exactly must still be given exactly; a longer
  one may not fall in token F1 by more than `loop.similarity_tolerance`. The regressed prompts, as a share of the
  champion's right ones, may not pass `loop.max_regression`. Prompts neither model answers right are reported
  (`unanswered`), not gated: a fact nobody was taught says nothing about the challenger.
- new (this cycle's examples): the share the challenger answers right must reach `loop.min_learned`.
- every answer of the challenger must stop (stop rate 100%).

"Right" is the exact answer for a short reference, and F1 of at least LONG_ANSWER_MIN_F1 (0.8) with every number of
it for a longer one (evaluate/checks.py, as eval's recall gate). Every number, and every regressed prompt with both
answers, goes into the decision.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tuneship.chat.generation import Answer
from tuneship.config import Config, LoopSection
from tuneship.deploy.stage import deployed_column
from tuneship.evaluate.backends import gguf_answers
from tuneship.evaluate.checks import AnswerCheck, check_answer, is_short, summarize
from tuneship.evaluate.prompts import EvalPrompt, build_prompt_set
from tuneship.loop.answer_cache import cached_answers, remember
from tuneship.loop.registry import version_chat_format
from tuneship.loop.shots import prompts_with_shots
from tuneship.loop.tables import Version
from tuneship.run import Run

SETS = ("golden", "replay", "new")
HELD_SETS = ("golden", "replay")


@dataclass
class Measured:
    """One version's answers to one prompt set: the summary and each prompt's check."""

    summary: dict
    checks: list[AnswerCheck]


@dataclass
class GateDecision:
    is_promoted: bool
    reasons: list[str]
    metrics: dict = field(default_factory=dict)
    regressed: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def measure(
    version: Version, sets: dict[str, list[EvalPrompt]], max_new_tokens: int, cache: Path | None = None
) -> dict[str, Measured]:
    """{set: Measured} for one version as it serves (`version_answers`), every set's prompts answered together."""
    asked = [(name, prompt) for name, prompts in sets.items() for prompt in prompts]
    if not asked:
        return {}
    answers = version_answers(version, [prompt for _, prompt in asked], max_new_tokens, cache)
    markers = version_chat_format(version).special_tokens()
    checks: dict[str, list[AnswerCheck]] = {}
    for (name, prompt), found in zip(asked, answers):
        checks.setdefault(name, []).append(check_answer(found.text, found.stopped, prompt.expected, markers))
    return {name: Measured(summarize(found), found) for name, found in checks.items()}


def version_answers(
    version: Version, prompts: list[EvalPrompt], max_new_tokens: int, cache: Path | None = None
) -> list[Answer]:
    """A version's greedy answers as it serves: its GGUF (with its LoRA GGUF in adapter format), its ChatFormat, a
    few-shot version's shots before every prompt. What it answered before comes from `cache` (its folder of
    answer_cache.py); the rest is answered together (one load of the model, one batch)."""
    chat_format = version_chat_format(version)
    lora = Path(version.adapter) if version.adapter else None
    shown = prompts_with_shots(prompts, version.shots)
    texts = [chat_format.generation_prompt(p.conversation) for p in shown]

    def answer(indexes: list[int]) -> list[Answer]:
        missing = [shown[i] for i in indexes]
        return gguf_answers(Path(version.gguf), chat_format, missing, max_new_tokens, lora)[0]

    return cached_answers(cache, served_files(version), texts, max_new_tokens, answer)


def served_files(version: Version) -> str:
    """What a version's answers depend on besides the prompt: the files it serves from."""
    return f"{version.gguf}|{version.adapter}"


def remember_export_answers(version: Version, cfg: Config, cache: Path) -> None:
    """The export of a trained version checked it as it serves (in llama.cpp, greedy, eval.max_new_tokens: its
    quant, or in adapter format the base quant with its LoRA) on its prompt set: those are its gate answers to the
    same prompts (write_cycle_data puts the gate's first), kept in its `cache`."""
    run = Run.of(cfg, Path(version.run_dir))
    report = json.loads(run.eval_report.read_text(encoding="utf-8")) if run.eval_report.is_file() else {}
    served = report.get("models", {}).get(deployed_column(cfg, run))
    prompts = build_prompt_set(run.data_dir, cfg.eval)
    if served is None or [p.id for p in prompts] != [p["id"] for p in report["prompts"]]:
        return
    chat_format = version_chat_format(version)
    texts = [chat_format.generation_prompt(p.conversation) for p in prompts]
    answers = [Answer(a["answer"], a["stopped"], a["new_tokens"]) for a in served["answers"]]
    remember(cache, served_files(version), texts, cfg.eval.max_new_tokens, answers)


def has_regressed(champion: AnswerCheck, challenger: AnswerCheck, reference: str, settings: LoopSection) -> bool:
    """A short answer no longer exact; a longer one that lost more than loop.similarity_tolerance of F1."""
    if is_short(reference):
        return not challenger.exact
    return (challenger.f1 or 0.0) < (champion.f1 or 0.0) - settings.similarity_tolerance


def held_set_verdict(
    name: str, prompts: list[EvalPrompt], champion: Measured, challenger: Measured, settings: LoopSection
) -> tuple[dict, list[dict]]:
    """(numbers, regressed prompts) of one set whose facts must hold."""
    gated = regressed = unanswered = 0
    details = []
    for prompt, old, new in zip(prompts, champion.checks, challenger.checks):
        if not old.right:
            unanswered += not new.right
            continue
        gated += 1
        if has_regressed(old, new, prompt.expected, settings):
            regressed += 1
            details.append(
                {
                    "set": name,
                    "id": prompt.id,
                    "question": prompt.question,
                    "expected": prompt.expected,
                    "champion": old.answer,
                    "challenger": new.answer,
                }
            )
    share = regressed / gated if gated else 0.0
    return {"gated": gated, "regressed": regressed, "regressed_share": share, "unanswered": unanswered}, details


def learned_share(measured: Measured) -> float:
    right = [bool(check.right) for check in measured.checks]
    return sum(right) / len(right) if right else 1.0


def gate_decision(
    sets: dict[str, list[EvalPrompt]],
    champion: dict[str, Measured],
    challenger: dict[str, Measured],
    settings: LoopSection,
) -> GateDecision:
    """Promote or not, prompt by prompt, with a reason for each failed rule."""
    reasons, regressed, verdicts = [], [], {}
    for name in SETS:
        if name not in challenger:
            continue
        stop_rate = challenger[name].summary["stop_rate"]
        if stop_rate < 1.0:
            reasons.append(f"{name}: stop rate {stop_rate:.0%} < 100%")
        if name in HELD_SETS:
            verdicts[name], details = held_set_verdict(name, sets[name], champion[name], challenger[name], settings)
            regressed += details
            if verdicts[name]["regressed_share"] > settings.max_regression:
                reasons.append(_regression_reason(name, verdicts[name], details, settings))
        else:
            learned = learned_share(challenger[name])
            verdicts[name] = {"learned": learned, "champion_learned": learned_share(champion[name])}
            if learned < settings.min_learned:
                reasons.append(
                    f"new: {learned:.0%} of the new examples answered right, below loop.min_learned="
                    f"{settings.min_learned:.0%}"
                )
    is_promoted = not reasons
    if is_promoted:
        reasons.append(_promotion_reason(verdicts))
    metrics = {
        "champion": {k: v.summary for k, v in champion.items()},
        "challenger": {k: v.summary for k, v in challenger.items()},
        "verdicts": verdicts,
    }
    return GateDecision(is_promoted, reasons, metrics, regressed)


def _regression_reason(name: str, verdict: dict, details: list[dict], settings: LoopSection) -> str:
    first = details[0]
    return (
        f"{name}: {verdict['regressed']} of the {verdict['gated']} prompts the champion answers right regressed "
        f"({verdict['regressed_share']:.0%} > loop.max_regression={settings.max_regression:g}), e.g. "
        f"{first['question']!r}: expected {first['expected']!r}, got {first['challenger']!r}"
    )


def _promotion_reason(verdicts: dict) -> str:
    parts = ["stops on every prompt"]
    for name in HELD_SETS:
        if name in verdicts:
            verdict = verdicts[name]
            parts.append(
                f"{name}: {verdict['gated'] - verdict['regressed']}/{verdict['gated']} right answers kept"
                + (f" ({verdict['unanswered']} answered right by neither, not gated)" if verdict["unanswered"] else "")
            )
    if "new" in verdicts:
        parts.append(
            f"new: {verdicts['new']['learned']:.0%} learned (champion {verdicts['new']['champion_learned']:.0%})"
        )
    return "; ".join(parts)


def run_gate(
    champion: Version,
    challenger: Version,
    sets: dict[str, list[EvalPrompt]],
    cfg: Config,
    cache: Callable[[Version], Path] | None = None,
) -> GateDecision:
    """Both registry versions (their GGUF, ChatFormat, and shots when few-shot) on the same sets; `cache`: each
    version's folder of remembered answers (answer_cache.py)."""
    started = time.monotonic()
    tokens = cfg.eval.max_new_tokens
    old = measure(champion, sets, tokens, cache(champion) if cache else None)
    new = measure(challenger, sets, tokens, cache(challenger) if cache else None)
    decision = gate_decision(sets, old, new, cfg.loop)
    decision.metrics["seconds"] = round(time.monotonic() - started, 2)
    return decision
