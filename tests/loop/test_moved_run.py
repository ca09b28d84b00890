"""A run folder is self-contained: copied or moved, the loop opened on it keeps its store, its versions and its
cycle folders beside it, never where the run was made (config.yaml still names that place in run.dir)."""

import shutil
from pathlib import Path

import yaml

from tests.conftest import write_jsonl
from tests.loop_fixtures import tiny_base_run  # noqa: F401
from tuneship.loop.registry import moved_path, open_loop

GOLDEN = {"messages": [{"role": "user", "content": "Golden question?"}, {"role": "assistant", "content": "Gold."}]}


def made_in(base_run: Path, parent: Path) -> Path:
    """The base run as if made in `parent`/runs (run.dir says so), with a golden file inside its folder named by
    an absolute path, as a saved config names it."""
    original = parent / "runs" / base_run.name
    shutil.copytree(base_run, original, ignore=shutil.ignore_patterns("checkpoints"))
    golden = write_jsonl(original / "golden.jsonl", [GOLDEN])
    config = yaml.safe_load((original / "config.yaml").read_text())
    config["run"]["dir"] = str(parent / "runs")
    config["loop"]["golden"] = str(golden)
    (original / "config.yaml").write_text(yaml.safe_dump(config))
    return original


def files_in(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def test_a_moved_run_keeps_its_store_and_versions_beside_it(tiny_base_run, tmp_path):  # noqa: F811
    original = made_in(tiny_base_run, tmp_path / "old")
    copy = tmp_path / "new" / "place" / original.name
    shutil.copytree(original, copy)
    (tmp_path / "old").rename(tmp_path / "gone")  # the place the config names is no more
    before = files_in(tmp_path / "gone")

    loop = open_loop(copy)
    try:
        here = copy.parent.resolve()
        assert loop.cfg.run.dir == here and loop.base_run == copy.resolve()
        assert loop.store.url == f"sqlite:///{here / 'tuneship.db'}" and (here / "tuneship.db").is_file()
        assert (here / f"{loop.name}-loop" / "golden-audit" / "train.jsonl").is_file()
        assert loop.cycle_dir(2) == here / f"{loop.name}-loop" / "v2"
        assert loop.cfg.loop.golden == here / original.name / "golden.jsonl"
        v1 = loop.store.version(1)
        assert v1.run_dir == str(copy.resolve()) and v1.gguf and Path(v1.gguf).is_relative_to(copy.resolve())
        golden = [e.conversation["messages"][0]["content"] for e in loop.store.examples(split="golden")]
        assert "Golden question?" in golden
    finally:
        loop.store.close()
    assert not (tmp_path / "old").exists()
    assert files_in(tmp_path / "gone") == before


def test_a_store_copied_along_follows_the_runs(tiny_base_run, tmp_path):  # noqa: F811
    """The whole runs folder (store included) copied: v1's folder and GGUF are the copy's, whether the original
    is still there (a copy) or not (a move)."""
    original = made_in(tiny_base_run, tmp_path / "old")
    first = open_loop(original)
    old_gguf = first.store.version(1).gguf
    first.store.close()
    for moved in (False, True):
        runs = tmp_path / f"new-{moved}" / "runs"
        shutil.copytree(original.parent, runs)
        if moved:
            (tmp_path / "old").rename(tmp_path / "gone")
        loop = open_loop(runs / original.name)
        try:
            v1 = loop.store.version(1)
            assert v1.run_dir == str((runs / original.name).resolve())
            assert v1.gguf == str(runs.resolve() / Path(old_gguf).relative_to(original.parent))
            [event] = loop.store.events(kind="relocated")
            assert event.data["versions"] == [1] and event.data["to"] == str(runs.resolve())
            assert loop.store.url == f"sqlite:///{runs.resolve() / 'tuneship.db'}"
        finally:
            loop.store.close()


def test_a_config_file_target_keeps_its_run_dir(tiny_base_run, tmp_path):  # noqa: F811
    original = made_in(tiny_base_run, tmp_path / "old")
    config = tmp_path / "elsewhere" / "run.yaml"
    config.parent.mkdir()
    shutil.copy(original / "config.yaml", config)
    loop = open_loop(config)
    try:
        assert loop.cfg.run.dir == original.parent and loop.base_run == original.resolve()
        assert loop.store.url == f"sqlite:///{original.parent / 'tuneship.db'}"
    finally:
        loop.store.close()


def test_relative_paths_in_a_run_config_resolve_against_the_run_folder(tiny_base_run, tmp_path):  # noqa: F811
    original = made_in(tiny_base_run, tmp_path / "old")
    config = yaml.safe_load((original / "config.yaml").read_text())
    config["loop"]["golden"] = "golden.jsonl"
    (original / "config.yaml").write_text(yaml.safe_dump(config))
    copy = tmp_path / "new" / original.name
    shutil.copytree(original, copy)
    shutil.rmtree(tmp_path / "old")
    loop = open_loop(copy)
    try:
        assert loop.cfg.loop.golden == (copy / "golden.jsonl").resolve()
    finally:
        loop.store.close()


def test_moved_path_takes_the_new_place_only_when_something_is_there(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    (new / "run").mkdir(parents=True)
    assert moved_path(str(old / "run"), old, new) == str(new / "run")
    assert moved_path(str(old / "missing"), old, new) == str(old / "missing")
    assert moved_path(str(tmp_path / "outside"), old, new) == str(tmp_path / "outside")
    assert moved_path("s3://bucket/key", old, new) == "s3://bucket/key"
    assert moved_path("HuggingFaceTB/SmolLM2-135M-Instruct", old, new) == "HuggingFaceTB/SmolLM2-135M-Instruct"
