"""Which GGUF file of a repo to pull: by quant preference, split files kept together."""

from __future__ import annotations

import re
from dataclasses import dataclass

PREFERENCE = ["Q4_K_M", "Q4_K_S", "Q5_K_M", "Q4_0", "Q8_0"]
SPLIT = re.compile(r"^(?P<stem>.+)-(?P<part>\d{5})-of-(?P<total>\d{5})\.gguf$")
QUANT = re.compile(r"(?<![A-Za-z0-9])(I?Q\d_[A-Z0-9_]+|Q\d_\d|F16|BF16|F32)(?![A-Za-z0-9])", re.IGNORECASE)


@dataclass
class RemoteFile:
    name: str
    size: int
    sha256: str | None


@dataclass
class GGUFChoice:
    """One model file: a single .gguf, or all parts of a split one, in order."""

    quant: str
    files: list[RemoteFile]

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


def group_ggufs(files: list[RemoteFile]) -> list[GGUFChoice]:
    groups: dict[str, list[RemoteFile]] = {}
    for remote in files:
        if not remote.name.endswith(".gguf") or "mmproj" in remote.name.lower():
            continue  # vision projectors are no language model
        match = SPLIT.match(remote.name)
        groups.setdefault(match.group("stem") if match else remote.name, []).append(remote)
    choices = []
    for stem, members in groups.items():
        members.sort(key=lambda f: f.name)
        total = SPLIT.match(members[0].name)
        if total and len(members) != int(total.group("total")):
            continue  # an incomplete split set cannot be loaded
        quant = QUANT.search(stem.rsplit("/", 1)[-1])
        choices.append(GGUFChoice(quant.group(1).upper() if quant else "unknown", members))
    return sorted(choices, key=lambda c: c.size)


def choose(choices: list[GGUFChoice], quant: str | None = None) -> GGUFChoice | None:
    """The asked quant, else the first of PREFERENCE present, else the smallest file."""
    if not choices:
        return None
    for wanted in [quant.upper()] if quant else PREFERENCE:
        found = [c for c in choices if c.quant == wanted]
        if found:
            return found[0]
    return None if quant else choices[0]
