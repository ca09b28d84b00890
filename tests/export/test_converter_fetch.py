"""The converter's files taken out of a llama-cpp-python sdist: only what converting needs, nothing outside the
target folder, on a Python with tarfile's extraction filters and on one without (Debian 12's 3.11.2)."""

import io
import shutil
import tarfile

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

    def llama_sdist(folder, of_version: str, marker: str):
        folder.mkdir()
        inner = f"llama_cpp_python-{of_version}/vendor/llama.cpp/convert_hf_to_gguf.py"
        return sdist(folder / f"llama_cpp_python-{of_version}.tar.gz", {inner: marker.encode()})

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
