"""Checks on one generated answer, and the summary over a prompt set.

- non_empty: the answer has visible text.
- stopped: generation ended on the stop token, not on the token budget.
- no_loop: no word 4-gram occurs 3 or more times, and answers of 20+ words keep at least half of
  their 4-grams distinct. Either failing means the model is repeating itself.
- no_leak: no special token or template text (`<|im_start|>`, `<|im_end|>`, a role header) appears
  in the answer.
- exact: the answer equals the expected one after trimming white space.
- f1: token-level F1 (lower-cased words, punctuation stripped), as in SQuAD.
- right: the expected answer given: exactly when it is short (up to SHORT_ANSWER_WORDS words: a fact, a name,
  a number), with F1 of at least LONG_ANSWER_MIN_F1 and every number of it when it is longer (a paragraph is
  rarely word for word, but F1 forgives a wrong number in 13 words: "... is ochre, and it has 72 stripes" for
  "... 77 stripes" has F1 0.92).

The summary of a prompt set has the rates the gates read, and on the prompts taken from the training data
(origin "train") `recall`, the share answered right, and `recall_f1`, the mean F1: how much of what was taught
comes back.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass

LOOP_NGRAM = 4
LOOP_MAX_REPEATS = 3
LOOP_MIN_WORDS = 20
LOOP_MIN_DISTINCT = 0.5
SHORT_ANSWER_WORDS = 12
LONG_ANSWER_MIN_F1 = 0.8
_WORD = re.compile(r"\w+")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")  # 1642, 66.22, 1,000: as written


@dataclass
class AnswerCheck:
    answer: str
    stopped: bool
    non_empty: bool
    no_loop: bool
    no_leak: bool
    exact: bool | None
    f1: float | None
    origin: str | None = None
    right: bool | None = None
    new_tokens: int | None = None  # what the answer took (a reader sees which answers ran to the token budget)

    @property
    def passed(self) -> bool:
        return self.stopped and self.non_empty and self.no_loop and self.no_leak

    def to_json(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def is_loop(text: str) -> bool:
    words = text.lower().split()
    grams = [tuple(words[i : i + LOOP_NGRAM]) for i in range(len(words) - LOOP_NGRAM + 1)]
    if not grams:
        return False
    if Counter(grams).most_common(1)[0][1] >= LOOP_MAX_REPEATS:
        return True
    return len(words) >= LOOP_MIN_WORDS and len(set(grams)) / len(grams) < LOOP_MIN_DISTINCT


def leaked(text: str, markers: list[str]) -> list[str]:
    return [marker for marker in markers if marker and marker in text]


def token_f1(answer: str, expected: str) -> float:
    got, want = _WORD.findall(answer.lower()), _WORD.findall(expected.lower())
    if not got or not want:
        return float(got == want)
    common = sum((Counter(got) & Counter(want)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(got), common / len(want)
    return 2 * precision * recall / (precision + recall)


def is_short(expected: str) -> bool:
    return len(expected.split()) <= SHORT_ANSWER_WORDS


def is_right(text: str, expected: str) -> bool:
    """The exact answer for a short expected one; for a longer one F1 >= LONG_ANSWER_MIN_F1 and its numbers."""
    if is_short(expected):
        return text.strip() == expected.strip()
    return token_f1(text, expected) >= LONG_ANSWER_MIN_F1 and _numbers(expected) <= _numbers(text)


def _numbers(text: str) -> set[str]:
    return set(_NUMBER.findall(text))


def check_answer(
    text: str,
    stopped: bool,
    expected: str | None,
    leak_markers: list[str],
    origin: str | None = None,
    new_tokens: int | None = None,
) -> AnswerCheck:
    return AnswerCheck(
        answer=text,
        stopped=stopped,
        non_empty=bool(text.strip()),
        no_loop=not is_loop(text),
        no_leak=not leaked(text, leak_markers),
        exact=None if expected is None else text.strip() == expected.strip(),
        f1=None if expected is None else round(token_f1(text, expected), 4),
        origin=origin,
        right=None if expected is None else is_right(text, expected),
        new_tokens=new_tokens,
    )


def summarize(checks: list[AnswerCheck]) -> dict:
    count = max(len(checks), 1)
    with_expected = [c for c in checks if c.exact is not None]
    summary = {
        "prompts": len(checks),
        "stop_rate": sum(c.stopped for c in checks) / count,
        "non_empty_rate": sum(c.non_empty for c in checks) / count,
        "loops": sum(not c.no_loop for c in checks),
        "leaks": sum(not c.no_leak for c in checks),
        "loop_rate": sum(not c.no_loop for c in checks) / count,
        "leak_rate": sum(not c.no_leak for c in checks) / count,
        "passed": sum(c.passed for c in checks),
    }
    if with_expected:
        summary["exact_match"] = sum(bool(c.exact) for c in with_expected) / len(with_expected)
        summary["f1"] = _mean_f1(with_expected)
    taught = [c for c in with_expected if c.origin == "train"]
    if taught:
        summary["recall"] = sum(bool(c.right) for c in taught) / len(taught)
        summary["recall_f1"] = _mean_f1(taught)
    return summary


def _mean_f1(checks: list[AnswerCheck]) -> float:
    return sum(c.f1 or 0.0 for c in checks) / len(checks)
