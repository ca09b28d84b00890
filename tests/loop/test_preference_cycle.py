"""loop.objective dpo / kto: a cycle trains the challenger with TRL's DPO / KTO trainer from the champion, through
the ordinary stages, then gates and records it like an SFT challenger."""

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from tests.loop.test_cycle import correct
from tests.loop_fixtures import fresh_loop_dir, served, tiny_base_run  # noqa: F401

QUIET = Console(file=io.StringIO())
CORRECTIONS = [("What is the code word?", "Answer number 99."), ("Who keeps it?", "Answer number 98.")]


def adapter_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def assert_trained_from_the_champion_gated_and_recorded(loop, fresh_loop_dir, objective: str) -> list[dict]:  # noqa: F811
    """The checks every objective's cycle passes; returns the challenger's training records."""
    import torch

    version = loop.store.version(2)
    run_dir = Path(version.run_dir)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert {s: manifest[s]["status"] for s in ("data", "train", "eval", "export", "template")} == dict.fromkeys(
        ("data", "train", "eval", "export", "template"), "done"
    )
    config = (run_dir / "config.yaml").read_text()
    assert f"adapter_from: {fresh_loop_dir}" in config and f"objective: {objective}" in config
    champion, challenger = adapter_tensors(fresh_loop_dir / "adapter"), adapter_tensors(run_dir / "adapter")
    assert champion.keys() == challenger.keys()  # the same adapter, trained on (no reference adapter shipped)
    assert any(not torch.equal(champion[k], challenger[k]) for k in champion)
    experiment = json.loads((run_dir / "reports" / "experiment.json").read_text())
    assert experiment["config"]["train"]["objective"] == objective and experiment["status"] == "done"
    gated = loop.store.events(kind="gated")[0]
    assert gated.version_id == 2 and set(gated.data["challenger"]) == {"golden", "replay", "new"}
    assert loop.store.version(2).status in ("champion", "rejected")
    assert loop.store.lease("cycle") is None
    return [json.loads(line) for line in (run_dir / "data" / "train.jsonl").read_text().splitlines()]


def test_a_dpo_cycle_trains_pairs_against_the_champion(fresh_loop_dir):  # noqa: F811
    from tuneship.loop.registry import open_loop
    from tuneship.loop.cycle import run_cycle

    loop = open_loop(fresh_loop_dir, ["loop.objective=dpo"])
    correct(loop, CORRECTIONS)
    run_cycle(loop, QUIET, "test", "by hand")
    trained = assert_trained_from_the_champion_gated_and_recorded(loop, fresh_loop_dir, "dpo")
    pairs = {(r["messages"][-1]["content"], r["rejected"]) for r in trained}
    assert pairs == {("Answer number 99.", "something else"), ("Answer number 98.", "something else")}
    assert len(trained) == 2  # no earlier pairs to replay yet: only the new pairs
    assert loop.store.version(2).metrics["replay_examples"] == []
    assert loop.store.events(kind="gated")[0].data["challenger"]["replay"]["prompts"] > 0  # earlier facts still checked
    gated = loop.store.events(kind="gated")[0]
    assert gated.data["challenger"]["new"]["prompts"] == 2  # expected answers: the chosen corrections
    used = [e for e in loop.store.examples() if e.kind == "dpo"]
    is_promoted = loop.store.version(2).status == "champion"  # a rejected version's pairs wait for the next cycle
    assert [e.used_in for e in used] == ([[2], [2]] if is_promoted else [[], []])
    assert all(
        e.used_in == [] for e in loop.store.examples() if e.kind in ("kto", "sft") and e.provenance.get("generation")
    )


def test_a_kto_cycle_trains_desirable_and_undesirable_answers_with_sft_replay(fresh_loop_dir):  # noqa: F811
    from tuneship.loop.registry import open_loop
    from tuneship.loop.cycle import run_cycle

    loop = open_loop(fresh_loop_dir, ["loop.objective=kto"])
    correct(loop, CORRECTIONS)
    run_cycle(loop, QUIET, "test", "by hand")
    trained = assert_trained_from_the_champion_gated_and_recorded(loop, fresh_loop_dir, "kto")
    labelled = {(r["messages"][-1]["content"], r.get("label")) for r in trained}
    assert {("Answer number 99.", True), ("Answer number 98.", True), ("something else", False)} <= labelled
    replayed = [r for r in trained if "label" not in r]  # earlier SFT examples: desirable answers to KTO
    assert len(replayed) == len(loop.store.version(2).metrics["replay_examples"]) > 0
    assert all(r["messages"][-1]["content"].startswith("Answer number") for r in replayed)
    gated = loop.store.events(kind="gated")[0]
    assert gated.data["challenger"]["new"]["prompts"] == 2  # the negatives are no expected answers
    assert gated.data["challenger"]["replay"]["prompts"] > 0


def test_an_objective_without_waiting_examples_of_its_kind_says_so(fresh_loop_dir):  # noqa: F811
    from tuneship.loop.registry import open_loop
    from tuneship.loop.cycle import NothingToTrain, run_cycle

    loop = open_loop(fresh_loop_dir, ["loop.objective=dpo"])
    served(loop.store, "gen-up", "Is it good?", "It is.", model=loop.name)
    loop.store.add_feedback("gen-up", "up", None, None)  # SFT + KTO positive, no pair
    with pytest.raises(NothingToTrain, match="no new accepted dpo examples .*loop.objective=dpo"):
        run_cycle(loop, QUIET)
    assert loop.store.lease("cycle") is None


def test_loop_objective_accepts_sft_dpo_kto_only(tmp_path):
    from tuneship.config import load_config
    from tuneship.errors import ConfigError

    assert load_config(None, ["loop.objective=kto"]).loop.objective == "kto"
    with pytest.raises(ConfigError, match="loop.objective"):
        load_config(None, ["loop.objective=ppo"])
