"""`make setup` compiles llama-cpp-python in the background while everything else installs: what it installs first
(scripts/requirements.py ... --without NEEDS_LLAMA) must not need llama-cpp-python, or pip would compile it a
second time in the foreground."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import subprocess
import sys

from tests.conftest import REPO

SCRIPT = REPO / "scripts" / "requirements.py"
spec = importlib.util.spec_from_file_location("setup_requirements", SCRIPT)
setup_requirements = importlib.util.module_from_spec(spec)
spec.loader.exec_module(setup_requirements)
requirement_name = setup_requirements.requirement_name


def makefile_variable(name: str) -> str:
    return re.search(rf"^{name} \??:?= *(.+)$", (REPO / "Makefile").read_text(), re.MULTILINE).group(1).strip()


def requirements(*args: str) -> list[str]:
    """What `make setup` gets from the script, run as the Makefile runs it."""
    listed = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, check=True)
    return listed.stdout.splitlines()


def installed_requirements(name: str) -> set[str]:
    """Names of what the installed distribution `name` requires (markers of extras left out)."""
    requires = importlib.metadata.requires(name) or []
    return {requirement_name(r) for r in requires if "extra ==" not in r.partition(";")[2]}


def needs(name: str, target: str, seen: set[str]) -> bool:
    """Whether the installed `name` requires `target`, directly or through what it requires."""
    if name == target:
        return True
    if name in seen:
        return False
    seen.add(name)
    try:
        direct = installed_requirements(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return any(needs(dependency, target, seen) for dependency in direct)


def test_what_setup_installs_while_llama_cpp_python_compiles_does_not_need_it():
    extras = makefile_variable("EXTRAS")
    first = requirements(extras, "--without", makefile_variable("NEEDS_LLAMA"))
    assert first and "torch>=2.4" in first
    seen: set[str] = set()
    needing = [r for r in first if needs(requirement_name(r), "llama-cpp-python", seen)]
    assert not needing, f"{needing} require llama-cpp-python: add them to NEEDS_LLAMA in the Makefile"
    assert requirements(extras, "--only", "llama-cpp-python") == ["llama-cpp-python>=0.3.16,<0.4"]
    everything = requirements(extras)
    for name in makefile_variable("NEEDS_LLAMA").split(","):
        assert name == "llama-cpp-python" or needs(name, "llama-cpp-python", set()), f"{name} does not need it"
    assert len(everything) == len(first) + 2


def test_an_unknown_extra_is_refused_with_the_extras_there_are():
    listed = subprocess.run([sys.executable, str(SCRIPT), "train,gpu"], capture_output=True, text=True)
    assert listed.returncode == 1
    assert "no extra gpu; its extras are train, export" in listed.stderr
