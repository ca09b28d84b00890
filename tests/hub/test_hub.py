"""Hub search and pull against a local server with real GGUF files; push staging and model card."""

import pytest

from tests.conftest import copy_run
from tests.hub.fake_hub import FakeHub, use_fake_hub
from tuneship.hub.client import HubError, pull, search
from tuneship.hub.push import stage_push_folder
from tuneship.hub.gguf_files import RemoteFile, choose, group_ggufs


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    """A copy of the exported tiny run (push stages its upload inside the run)."""
    cfg, run = copy_run(tiny_run, tmp_path_factory.mktemp("hub-run"))
    return cfg, run.path


@pytest.fixture
def hub(monkeypatch, exported, tmp_path):
    _, run_dir = exported
    q8 = (run_dir / "gguf" / "tiny-Q8_0.gguf").read_bytes()
    f16 = (run_dir / "gguf" / "tiny-f16.gguf").read_bytes()
    with FakeHub() as server:
        server.add("acme/Tiny-GGUF", {"Tiny-Q8_0.gguf": q8, "Tiny-F16.gguf": f16, "README.md": b"# tiny"}, 50)
        server.add(
            "acme/Split-GGUF",
            {
                "Split-Q4_K_M-00001-of-00002.gguf": q8[:1000],
                "Split-Q4_K_M-00002-of-00002.gguf": q8[1000:],
                "Split-Q8_0.gguf": q8,
            },
            5,
        )
        use_fake_hub(monkeypatch, server, tmp_path / "hub-cache")
        yield server


def test_preference_order_and_split_files_kept_together():
    files = [
        RemoteFile(n, s, None)
        for n, s in [
            ("m-Q8_0.gguf", 8),
            ("m-Q5_K_M.gguf", 5),
            ("m-Q2_K.gguf", 2),
            ("m-Q4_K_M-00001-of-00002.gguf", 2),
            ("m-Q4_K_M-00002-of-00002.gguf", 2),
            ("mmproj-f16.gguf", 1),
            ("README.md", 1),
        ]
    ]
    choices = group_ggufs(files)
    assert sorted(c.quant for c in choices) == ["Q2_K", "Q4_K_M", "Q5_K_M", "Q8_0"]
    best = choose(choices)
    assert best.quant == "Q4_K_M" and [f.name for f in best.files] == [
        "m-Q4_K_M-00001-of-00002.gguf",
        "m-Q4_K_M-00002-of-00002.gguf",
    ]
    no_preferred = group_ggufs([RemoteFile("m-Q3_K_L.gguf", 3, None), RemoteFile("m-Q2_K.gguf", 2, None)])
    assert choose(no_preferred).quant == "Q2_K"  # else the smallest
    incomplete = group_ggufs([RemoteFile("m-Q4_K_M-00001-of-00003.gguf", 1, None)])
    assert incomplete == []


def test_search_lists_repos_with_quant_files_and_sizes(hub):
    hits = search("gguf", limit=5)
    assert [h.repo_id for h in hits] == ["acme/Tiny-GGUF", "acme/Split-GGUF"]
    assert {c.quant for c in hits[0].choices} == {"Q8_0", "F16"}


def test_pull_verifies_sha256_and_validates(hub, tmp_path):
    from tuneship.hub.pull import pull_and_validate

    lines = pull_and_validate("acme/Tiny-GGUF", tmp_path, None, False, None)
    assert (tmp_path / "Tiny-Q8_0.gguf").is_file() and "sha256 verified" in lines[0]
    assert lines[1].startswith("validated: llama") and "a chat template" in lines[1]


def test_pull_downloads_every_part_of_a_split_file(hub, tmp_path):
    files = pull("acme/Split-GGUF", tmp_path)
    assert [p.name for p in files] == ["Split-Q4_K_M-00001-of-00002.gguf", "Split-Q4_K_M-00002-of-00002.gguf"]


def test_corrupt_download_is_deleted_and_reported(hub, tmp_path):
    hub.tamper.add("Tiny-Q8_0.gguf")
    with pytest.raises(HubError, match="differs from the hub's"):
        pull("acme/Tiny-GGUF", tmp_path, "Q8_0")
    assert not list(tmp_path.iterdir())


def test_missing_repo_and_missing_quant_are_clear(hub, tmp_path):
    with pytest.raises(HubError, match="no such repository"):
        pull("acme/Nope", tmp_path)
    with pytest.raises(HubError, match=r"no Q6_K file \(offered: F16, Q8_0\)"):
        pull("acme/Tiny-GGUF", tmp_path, "Q6_K")


def test_offline_mode_is_a_clear_error_not_a_traceback(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError, match="HF_HUB_OFFLINE is set"):
        pull("acme/Tiny-GGUF", tmp_path)


def test_push_stages_model_ggufs_modelfile_and_card(exported, tmp_path):
    from tuneship.run import Run

    cfg, run_dir = exported
    staging = stage_push_folder(Run.of(cfg, run_dir), cfg, tmp_path / "upload")
    names = {p.name for p in staging.iterdir()}
    assert {"model.safetensors", "tokenizer.json", "tiny-Q8_0.gguf", "tiny-f16.gguf", "Modelfile", "README.md"} <= names
    assert (staging / "Modelfile").read_text().startswith("FROM ./tiny-Q8_0.gguf")
    card = (staging / "README.md").read_text()
    assert "base_model:" in card and "| metric | base | adapter | merged | gguf-f16 | gguf-Q8_0 |" in card
    assert "| stop_rate |" in card and "records read" in card


def test_push_uploads_the_run_and_it_pulls_back(exported, hub, tmp_path, monkeypatch):
    from tuneship.hub.push import push

    monkeypatch.setenv("HF_TOKEN", "hf_test")
    from tuneship.run import Run

    cfg, run_dir = exported
    url = push(Run.of(cfg, run_dir), cfg, "me/tiny-facts")
    assert url.endswith("/me/tiny-facts/commit/1")
    stored = hub.repos["me/tiny-facts"]
    assert {"README.md", "tiny-Q8_0.gguf", "model.safetensors", "tokenizer.json"} <= set(stored)
    assert stored["tiny-Q8_0.gguf"] == (run_dir / "gguf" / "tiny-Q8_0.gguf").read_bytes()
    assert [p.name for p in pull("me/tiny-facts", tmp_path)] == ["tiny-Q8_0.gguf"]
