"""Deterministic train/eval split: by seed and ratio, stratified by source, near-duplicates together.

Near-duplicate groups (from the audit) are assigned whole, so no almost-identical pair can sit on
both sides and make the eval loss look better than it is.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from pathlib import PurePosixPath

from tuneship.data.conversation import Conversation


def split(
    kept: list[Conversation], groups: list[int], eval_ratio: float, seed: int
) -> tuple[list[Conversation], list[Conversation]]:
    members: dict[int, list[int]] = defaultdict(list)
    for index, group in enumerate(groups):
        members[group].append(index)
    strata: dict[str, list[int]] = defaultdict(list)
    for group in members:
        strata[kept[group].source.file].append(group)
    in_eval: set[int] = set()
    for file, stratum_groups in sorted(strata.items()):
        size = sum(len(members[g]) for g in stratum_groups)
        target = round(size * eval_ratio)
        taken = 0
        for group in sorted(stratum_groups, key=lambda g: _rank(seed, kept[g])):
            if taken >= target:
                break
            in_eval.update(members[group])
            taken += len(members[group])
    train = [c for i, c in enumerate(kept) if i not in in_eval]
    evaluation = [c for i, c in enumerate(kept) if i in in_eval]
    return train, evaluation


def _rank(seed: int, conversation: Conversation) -> str:
    """The order records are drawn for eval within their source: by seed, the file's name and the line, not the
    folder it sits in (a project moved or cloned elsewhere splits the same)."""
    source = conversation.source
    name = PurePosixPath(source.file.replace("\\", "/")).name
    return hashlib.sha1(f"{seed}|{name}|{source.line}".encode()).hexdigest()
