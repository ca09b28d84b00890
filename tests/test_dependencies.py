"""Every module the code imports is declared, `pip install tuneship` (no extras) runs `tuneship data check` and
`tuneship doctor`, and a command that needs an extra names it."""

import ast
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import venv

import pytest

from tests.conftest import REPO
from tuneship.extras import EXTRA_OF_MODULE

tomllib = pytest.importorskip("tomllib")
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_names(requirements: list[str]) -> set[str]:
    return {normalized(re.match(r"[A-Za-z0-9_.-]+", r).group()) for r in requirements}


def core_closure() -> set[str]:
    """The core dependencies and everything they require (their own extras left out)."""
    return closure(requirement_names(PYPROJECT["dependencies"]))


def closure(names: set[str]) -> set[str]:
    """The installed distributions `names` and everything they require (their own extras left out)."""
    seen, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            needs = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:  # only for other platforms (colorama on Windows)
            continue
        todo += requirement_names([r for r in needs if "extra ==" not in r])
    return seen


def distributions_of(module: str) -> set[str]:
    return {normalized(d) for d in importlib.metadata.packages_distributions().get(module, [])}


def parse_source(path) -> ast.Module:
    """ast.parse, once more where CPython 3.11 raises its AST "recursion depth mismatch" SystemError (CPython
    gh-106905): the counter is shared by threads, and a thread another test left running (a local server answering
    a late request) can race it while this one parses. The source itself is fine; any other error is raised."""
    source = path.read_text(encoding="utf-8")
    try:
        return ast.parse(source)
    except SystemError as exc:
        if "recursion depth mismatch" not in str(exc):
            raise
        return ast.parse(source)


def third_party_imports() -> dict[str, list[str]]:
    """Top-level module -> the files of src/tuneship that import it (at any depth, in any function)."""
    found: dict[str, list[str]] = {}
    for path in sorted((REPO / "src" / "tuneship").rglob("*.py")):
        for node in ast.walk(parse_source(path)):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "tuneship":
                    found.setdefault(top, []).append(str(path.relative_to(REPO)))
    return found


def test_every_imported_module_is_declared_in_core_or_its_extra():
    core = requirement_names(PYPROJECT["dependencies"])
    extras = {name: requirement_names(reqs) for name, reqs in PYPROJECT["optional-dependencies"].items()}
    undeclared = []
    for module, files in third_party_imports().items():
        providers = distributions_of(module) or {normalized(module)}  # not installed here: named as imported
        extra = EXTRA_OF_MODULE.get(module)
        declared_in = core | (extras.get(extra, set()) if extra else set())
        if not providers & declared_in:
            undeclared.append(f"{module} ({', '.join(sorted(providers))}) imported in {files[0]}, extra {extra}")
    assert not undeclared


def modules_after(args: list[str]) -> tuple[int, list[str], str]:
    """Exit code, third-party modules imported, and output of `tuneship ARGS` in a fresh interpreter."""
    code = (
        "import sys\nfrom tuneship.cli import main\n"
        f"try:\n    main({args!r})\nexcept SystemExit as exc:\n    status = exc.code or 0\nelse:\n    status = 0\n"
        "files = {n.split('.')[0] for n, m in list(sys.modules.items()) if getattr(m, '__file__', None)}\n"
        "names = sorted(files - set(sys.stdlib_module_names))\n"
        "print('MODULES', status, ' '.join(names))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ, cwd=REPO)
    line = next(line for line in out.stdout.splitlines() if line.startswith("MODULES"))
    _, status, *names = line.split()
    startup = {"tuneship", "sitecustomize", "usercustomize"}  # the interpreter's own site hooks (Debian's python3)
    return int(status), [n for n in names if not n.startswith("_") and n not in startup], out.stdout + out.stderr


def test_data_check_imports_only_what_a_plain_install_brings():
    status, modules, output = modules_after(["data", "check", "examples/data"])
    assert status == 0, output
    closure = core_closure()
    outside = [m for m in modules if not distributions_of(m) & closure]
    assert not outside, f"imported by `tuneship data check` but not brought by `pip install tuneship`: {outside}"


def test_a_command_that_needs_an_extra_names_it(tmp_path, cli, monkeypatch, tiny_model_dir):
    from tests.conftest import tiny_config_file

    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # as if the parquet extra were not installed
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    result = cli("data", "check", tmp_path / "d.parquet")
    assert result.code == 1 and "reading Parquet needs pyarrow" in result.output
    assert "pip install 'tuneship[parquet]'" in result.output
    monkeypatch.setitem(sys.modules, "transformers", None)  # a module imported deep inside a command
    result = cli("train", tiny_config_file(tmp_path, tiny_model_dir), "--dry-run")
    assert (
        result.code == 1
        and "needs transformers, which is not installed: pip install 'tuneship[train]'" in result.output
    )
    assert "Traceback" not in result.output


def pypi_reachable() -> bool:
    import socket

    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
    except OSError:
        return False
    return True


@pytest.mark.install
def test_plain_install_runs_data_check_and_doctor(tmp_path):
    """A real `pip install tuneship` into a fresh venv (pip's cache makes it ~1 min)."""
    if not pypi_reachable():
        pytest.skip("PyPI is not reachable: cannot install into a fresh virtualenv")
    venv.create(tmp_path / "bare", with_pip=True)
    bin_dir = tmp_path / "bare" / "bin"
    install = subprocess.run(
        [str(bin_dir / "python"), "-m", "pip", "install", "-q", str(REPO)], capture_output=True, text=True
    )
    assert install.returncode == 0, install.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    tuneship = str(bin_dir / "tuneship")
    check = subprocess.run(
        [tuneship, "data", "check", "examples/data", "--json"], capture_output=True, text=True, cwd=REPO, env=env
    )
    assert check.returncode == 0, check.stderr
    assert json.loads(check.stdout)["totals"]["kept"] > 0
    doctor = subprocess.run([tuneship, "doctor"], capture_output=True, text=True, cwd=REPO, env=env)
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert "tuneship[train]" in doctor.stdout and "tuneship[export]" in doctor.stdout  # the extras to install
    train = subprocess.run(
        [tuneship, "train", "examples/quickstart.yaml"], capture_output=True, text=True, cwd=REPO, env=env
    )
    assert train.returncode == 1 and "pip install 'tuneship[train]'" in train.stderr and "Traceback" not in train.stderr
