"""`tuneship loop publish`: a version as Ollama would take it (FROM the base GGUF, ADAPTER its LoRA GGUF), or merged
into GGUFs of its own; either is loaded in llama.cpp and answers like the version as it serves."""

from pathlib import Path

from tests.loop_fixtures import fresh_loop_dir, tiny_base_run  # noqa: F401


def modelfile_files(path: Path) -> dict[str, Path]:
    from tuneship.deploy.modelfile import parse_modelfile

    lines = dict((k, v) for k, v in parse_modelfile(path.read_text()) if k in ("FROM", "ADAPTER"))
    return {key: (path.parent / value).resolve() for key, value in lines.items()}


def test_publishing_an_adapter_version_writes_from_the_base_and_adapter_its_lora(fresh_loop_dir, cli):  # noqa: F811
    from tuneship.loop.adapter_form import in_adapter_form
    from tuneship.loop.registry import open_loop

    loop = open_loop(fresh_loop_dir)
    champion = in_adapter_form(loop, loop.store.champion())
    result = cli("loop", "publish", fresh_loop_dir)
    assert result.code == 0, result.output
    modelfile = loop.cycle_dir(1) / "publish" / "Modelfile"
    assert modelfile_files(modelfile) == {"FROM": Path(champion.gguf), "ADAPTER": Path(champion.adapter)}
    [line] = [e.reason for e in loop.store.events(kind="exported")]
    prompts = line.split("in llama.cpp ")[1].split(" answers")[0]
    identical, total = map(int, prompts.split("/"))
    assert identical == total > 0  # the same files the version serves from, loaded again: the same answers
    assert "TEMPLATE" in modelfile.read_text() and "ollama create" in result.out


def test_publishing_merged_exports_gguf_files_of_its_own_that_answer_and_stop(fresh_loop_dir, cli):  # noqa: F811
    from tuneship.loop.adapter_form import in_adapter_form
    from tuneship.loop.registry import open_loop

    loop = open_loop(fresh_loop_dir)
    in_adapter_form(loop, loop.store.champion())
    result = cli("loop", "publish", fresh_loop_dir, "--merged")
    assert result.code == 0, result.output
    files = modelfile_files(loop.cycle_dir(1) / "publish-merged" / "Modelfile")
    assert files == {"FROM": (fresh_loop_dir / "gguf" / "tiny-Q8_0.gguf").resolve()}
    assert "stopped" in result.out and loop.store.champion().adapter  # the registry still serves the adapter
