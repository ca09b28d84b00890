"""The converter's files taken out of a llama-cpp-python sdist: only what converting needs, nothing outside the
target folder, on a Python with tarfile's extraction filters and on one without (Debian 12's 3.11.2)."""

import io
import os
import shutil
import sys
import tarfile
from pathlib import Path

import pytest

from tuneship.export.converter import _extract


def sdist(path, members: dict[str, bytes]):
    with tarfile.open(path, "w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("has_filters", [True, False])
def test_only_the_converters_files_are_extracted_and_nothing_outside_the_folder(tmp_path, monkeypatch, has_filters):
    if not has_filters:
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    prefix = "llama_cpp_python-0.3.36/vendor/llama.cpp/"
    archive = sdist(
        tmp_path / "llama_cpp_python-0.3.36.tar.gz",
        {
            prefix + "convert_hf_to_gguf.py": b"print('hf')\n",
            prefix + "gguf-py/gguf/__init__.py": b"",
            prefix + "src/llama.cpp": b"// not needed\n",
            prefix + "gguf-py/../../../escaped.py": b"bad\n",
            "llama_cpp_python-0.3.36/setup.py": b"",
        },
    )
    target = tmp_path / "converter"
    _extract(archive, target)
    found = sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file())
    assert found == ["convert_hf_to_gguf.py", "gguf-py/gguf/__init__.py"]
    assert not (tmp_path / "escaped.py").exists() and not list(tmp_path.rglob("escaped.py"))


def test_the_sdist_setup_built_from_gives_the_converter_and_another_version_s_is_not_used(tmp_path, monkeypatch):
    """`make setup` passes the sdist it built llama-cpp-python from: the converter comes out of it, no second
    download. An sdist of another version is not the installed runtime's: that version's is downloaded."""
    from tuneship.export import converter

    version = converter.llama_cpp_version()
    monkeypatch.setenv("TUNESHIP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "env"))

    downloads = []

    def download(of_version, folder):
        downloads.append(of_version)
        return llama_sdist(folder / "downloaded", of_version, "# downloaded\n")

    monkeypatch.setattr(converter, "download_sdist", download)
    other = converter.fetch_converter(llama_sdist(tmp_path / "other", "0.0.1", "# another version\n"))
    assert downloads == [version] and (other / "convert_hf_to_gguf.py").read_text() == "# downloaded\n"

    shutil.rmtree(other)
    setup = converter.fetch_converter(llama_sdist(tmp_path / "setup", version, "# setup's sdist\n"))
    assert downloads == [version] and (setup / "convert_hf_to_gguf.py").read_text() == "# setup's sdist\n"
    assert setup == converter.converter_dir(version) and not setup.with_name(setup.name + ".partial").exists()


def llama_sdist(folder, of_version: str, marker: str):
    folder.mkdir()
    inner = f"llama_cpp_python-{of_version}/vendor/llama.cpp/convert_hf_to_gguf.py"
    return sdist(folder / f"llama_cpp_python-{of_version}.tar.gz", {inner: marker.encode()})


def test_it_is_kept_with_the_environment_so_a_process_with_another_cache_finds_it(tmp_path, monkeypatch):
    """`make demo` and `make test` use the checkout's cache, a person's `tuneship serve` afterwards their own: the
    converter belongs to the environment's llama-cpp-python, so both find it. One kept in a cache by an earlier
    setup is still found; where the environment cannot be written, it is kept in the cache."""
    from tuneship.export import converter

    version = converter.llama_cpp_version()
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "env"))
    monkeypatch.setenv("TUNESHIP_CACHE", str(tmp_path / "setup-cache"))
    kept = converter.fetch_converter(llama_sdist(tmp_path / "sdist", version, "# setup's\n"))
    assert kept == tmp_path / "env" / "share" / "tuneship" / f"llama.cpp-{version}"
    monkeypatch.setenv("TUNESHIP_CACHE", str(tmp_path / "own-cache"))
    assert converter.ensure_converter() == kept

    shutil.rmtree(kept)
    assert converter.converter_dir(version) == kept  # where none is: the first place that can be written
    in_cache = tmp_path / "own-cache" / f"llama.cpp-{version}"
    (in_cache / "gguf-py").mkdir(parents=True)
    (in_cache / "convert_hf_to_gguf.py").write_text("# an earlier setup's\n")
    assert converter.ensure_converter() == in_cache

    shutil.rmtree(in_cache)
    writable = os.access
    monkeypatch.setattr(
        os,
        "access",
        lambda path, mode: writable(path, mode) and tmp_path / "env" not in (Path(path), *Path(path).parents),
    )  # a root-owned environment (root itself may write anywhere)
    assert converter.fetch_converter(llama_sdist(tmp_path / "sdist2", version, "# downloaded\n")) == in_cache
