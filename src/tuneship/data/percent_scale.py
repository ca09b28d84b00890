"""The `percent-scale` heuristic: fractions printed as percents ("0.6622%" where 66.22% was meant).

A percent value is *fraction-like* when it is below 1 and written with two or more decimals
(0.66%, 0.6622%). Such a value is flagged when one of these holds:

1. Same wording, other scale: answers are grouped by their wording with every number replaced by
   `#`; when other answers of the same wording print values of 1% or more, the fraction-like ones
   are flagged, citing one of those answers.
2. Sums to one: an answer with two or more fraction-like percents that add up to 1 (±0.02), like a
   share breakdown printed from ratios.
3. Ratio precision: a value of at least 0.01 with four or more decimals (0.6622%), the shape of
   `round(ratio, 4)` followed by a percent sign.

Genuinely small percents (0.5%, 0.025%) trigger none of these on their own. Findings are
warnings: the record is kept and the message suggests the value times 100.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PERCENT = re.compile(r"(?<![\d.])(\d+(?:\.(\d+))?)\s*%")
NUMBER = re.compile(r"\d+(?:[.,]\d+)*")


@dataclass
class PercentFlag:
    index: int
    value: str
    reason: str


def _percents(text: str) -> list[tuple[str, float, int]]:
    return [(m.group(1), float(m.group(1)), len(m.group(2) or "")) for m in PERCENT.finditer(text)]


def _fraction_like(value: float, decimals: int) -> bool:
    return 0 < value < 1 and decimals >= 2


def _wording(text: str) -> str:
    return " ".join(NUMBER.sub("#", text.lower()).split())


def _suggest(raw: str) -> str:
    return f"{float(raw) * 100:.10g}%"


def find_percent_scale(answers: list[str], locations: list[str]) -> list[PercentFlag]:
    """Flag answers (by index) whose percents look like fractions; `locations` name each answer."""
    percents = [_percents(a) for a in answers]
    large_by_wording: dict[str, int] = {}
    for index, found in enumerate(percents):
        if any(value >= 1 for _, value, _ in found):
            large_by_wording.setdefault(_wording(answers[index]), index)
    flags = []
    for index, found in enumerate(percents):
        fractions = [(raw, value, dec) for raw, value, dec in found if _fraction_like(value, dec)]
        if not fractions:
            continue
        raw = fractions[0][0]
        witness = large_by_wording.get(_wording(answers[index]))
        if witness is not None and witness != index:
            witness_value = next(r for r, v, _ in percents[witness] if v >= 1)
            reason = (
                f"{raw}% here, but an answer with the same wording at {locations[witness]} says "
                f"{witness_value}%; did you mean {_suggest(raw)}?"
            )
        elif len(fractions) >= 2 and abs(sum(v for _, v, _ in fractions) - 1) <= 0.02:
            listed = ", ".join(f"{r}%" for r, _, _ in fractions)
            reason = f"{listed} add up to 1, not 100: these look like ratios; did you mean {_suggest(raw)} ...?"
        elif any(value >= 0.01 and dec >= 4 for _, value, dec in fractions):
            raw = next(r for r, v, d in fractions if v >= 0.01 and d >= 4)
            reason = f"{raw}% has the precision of a ratio (round(x, 4)); if it is one, write {_suggest(raw)}"
        else:
            continue
        flags.append(PercentFlag(index, raw, reason))
    return flags
