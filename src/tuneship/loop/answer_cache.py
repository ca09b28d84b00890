"""What each version answered in the gate, kept beside it (`<run.dir>/<name>-loop/v<N>/gate-answers.json`).

A registered version's files never change and the gate decodes greedily, so a prompt it answered once (rendered
the same, with the same token budget) it answers the same again: the next cycle's gate asks the champion only
what it was not asked before (its golden prompts and most of the replay set were), and a challenger's answers
are there when it becomes the champion. Only the cycle under the lease writes, so one writer at a time.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

from tuneship.chat.generation import Answer
from tuneship.disk import written_atomically

FILE_NAME = "gate-answers.json"


def prompt_key(files: str, prompt_text: str, max_new_tokens: int) -> str:
    return hashlib.sha256(f"{files}\n{max_new_tokens}\n{prompt_text}".encode()).hexdigest()


def cached_answers(
    folder: Path | None,
    files: str,
    texts: list[str],
    max_new_tokens: int,
    answer: Callable[[list[int]], list[Answer]],
) -> list[Answer]:
    """The answers to `texts` (rendered prompts) in order: from `folder`'s cache when there, else from
    `answer(indexes)` (called once, with the indexes of the missing ones), which are then added to the cache.
    `files`: what the version serves from (a v1 brought into adapter form answers anew). Without a folder,
    everything comes from `answer`."""
    known = _known(folder)
    keys = [prompt_key(files, text, max_new_tokens) for text in texts]
    missing = [i for i, key in enumerate(keys) if key not in known]
    if missing:
        found = answer(missing)
        remember(folder, files, [texts[i] for i in missing], max_new_tokens, found, known)
        known.update({keys[i]: a.to_json() for i, a in zip(missing, found)})
    return [Answer(**known[key]) for key in keys]


def remember(
    folder: Path | None,
    files: str,
    texts: list[str],
    max_new_tokens: int,
    answers: list[Answer],
    known: dict | None = None,
) -> None:
    """Adds answers the version gave elsewhere (its export's check, in llama.cpp from the same files) to its
    cache. `known`: the cache as read, when the caller has it."""
    if folder is None:
        return
    known = dict(_known(folder) if known is None else known)
    known.update({prompt_key(files, t, max_new_tokens): a.to_json() for t, a in zip(texts, answers, strict=True)})
    folder.mkdir(parents=True, exist_ok=True)
    with written_atomically(folder / FILE_NAME) as partial:
        partial.write_text(json.dumps(known), encoding="utf-8")


def _known(folder: Path | None) -> dict:
    path = folder / FILE_NAME if folder is not None else None
    return json.loads(path.read_text(encoding="utf-8")) if path is not None and path.is_file() else {}
