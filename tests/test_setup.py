"""`make setup` compiles llama-cpp-python in the background while everything else installs: what it installs first
(scripts/requirements.py ... --without LLAMA,NEEDS_LLAMA) must not need llama-cpp-python, or pip would compile it a
second time in the foreground."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.conftest import REPO
from tests.test_dependencies import closure, requirement_names

SCRIPT = REPO / "scripts" / "requirements.py"


def makefile_variable(name: str) -> str:
    return re.search(rf"^{name} \??:?= *(.+)$", (REPO / "Makefile").read_text(), re.MULTILINE).group(1).strip()


def requirements(*args: str) -> list[str]:
    """What `make setup` gets from the script, run as the Makefile runs it."""
    listed = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, check=True)
    return listed.stdout.splitlines()


def needs_llama(requirement: str) -> bool:
    """Whether the installed distribution of `requirement` requires llama-cpp-python, directly or not."""
    return "llama-cpp-python" in closure(requirement_names([requirement]))


def test_what_setup_installs_while_llama_cpp_python_compiles_does_not_need_it():
    extras, llama = makefile_variable("EXTRAS"), makefile_variable("LLAMA")
    held_back = [llama, *makefile_variable("NEEDS_LLAMA").split(",")]
    first = requirements(extras, "--without", ",".join(held_back))
    assert first and "torch>=2.4" in first
    needing = [r for r in first if needs_llama(r)]
    assert not needing, f"{needing} require llama-cpp-python: add them to NEEDS_LLAMA in the Makefile"
    everything = requirements(extras)
    built = requirements(extras, "--only", llama)
    assert built == [r for r in everything if requirement_names([r]) == {llama}] and len(built) == 1
    assert all(needs_llama(name) for name in held_back)
    assert len(everything) == len(first) + len(held_back)


def test_an_unknown_extra_is_refused_with_the_extras_there_are():
    listed = subprocess.run([sys.executable, str(SCRIPT), "train,gpu"], capture_output=True, text=True)
    assert listed.returncode == 1
    assert "no extra gpu; its extras are train, export" in listed.stderr
