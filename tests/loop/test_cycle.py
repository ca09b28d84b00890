"""A cycle on the tiny model: challenger run through the ordinary pipeline, gate in llama.cpp, registry."""

import io
import json
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from tests.loop_fixtures import fresh_loop_dir, served, tiny_base_run  # noqa: F401
from tuneship.loop.examples import waiting_examples

QUIET = Console(file=io.StringIO())


def correct(loop, pairs):
    """A served generation per question, each corrected (as POST /v1/feedback would store them)."""
    for index, (question, correction) in enumerate(pairs):
        generation_id = f"gen-{index}"
        served(loop.store, generation_id, question, "something else", model=loop.name, backend="llamacpp:tiny")
        loop.store.add_feedback(generation_id, "down", correction, None)


@pytest.mark.parametrize("version_format", ["adapter", "merged"])
def test_a_cycle_is_an_ordinary_run_from_the_champion_gated_and_recorded(
    fresh_loop_dir,  # noqa: F811
    version_format,
    monkeypatch,
):
    import tuneship.loop.gate as gate
    from tuneship.loop.cycle import run_cycle
    from tuneship.loop.examples import gate_sets
    from tuneship.loop.registry import open_loop

    merged = version_format == "merged"
    more_quants = ["export.quants=[Q8_0,Q4_K_M]"] if merged else []  # Q4_K_M: for `loop publish --merged`
    loop = open_loop(fresh_loop_dir, [f"loop.version_format={version_format}", *more_quants])
    correct(loop, [("What is the code word?", "Answer number 99."), ("Who keeps it?", "Answer number 98.")])
    result = run_cycle(loop, QUIET, "test", "by hand")

    version = loop.store.version(2)
    run_dir = Path(version.run_dir)
    assert version.name == "tiny-v2" and version.parent_id == 1 and run_dir.name == "tiny-v2"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert {s: manifest[s]["status"] for s in ("data", "train", "eval", "export", "template")} == dict.fromkeys(
        ("data", "train", "eval", "export", "template"), "done"
    )
    config = (run_dir / "config.yaml").read_text()
    assert f"adapter_from: {fresh_loop_dir}" in config
    assert f"train_layers: {1.0 if merged else 0.5}" in config  # loop.train_layers unset: by the format
    train_on_quant = yaml.safe_load(config)["model"]["train_on_quant"]
    if merged:  # the quant that serves and the f16 it is made from, answering in llama.cpp, not in PyTorch
        assert train_on_quant is None  # its delta is merged into the base's own weights
        assert Path(version.gguf) == run_dir / "gguf" / "tiny-v2-Q8_0.gguf" and Path(version.gguf).is_file()
        assert version.adapter is None and (run_dir / "merged").is_dir()
        assert sorted(p.name for p in (run_dir / "gguf").glob("*.gguf")) == ["tiny-v2-Q8_0.gguf", "tiny-v2-f16.gguf"]
        report = json.loads((run_dir / "reports" / "eval.json").read_text())
        assert list(report["models"]) == ["gguf-f16", "gguf-Q8_0"]
    else:  # the LoRA GGUF on the base's quantized GGUF, which v1 now serves from too; no merge, no checkpoints
        assert version.gguf == loop.store.version(1).gguf and Path(version.gguf).name == "base-Q8_0.gguf"
        # trained on the base as it serves: that quant's weights, which its adapter names as its base
        assert train_on_quant == "Q8_0"
        adapter_config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
        trained_on = Path(adapter_config["base_model_name_or_path"])
        assert trained_on == Path(version.gguf).parent / "hf-Q8_0" and (trained_on / "served-base.json").is_file()
        assert Path(version.adapter).parent == run_dir / "gguf" and Path(version.adapter).is_file()
        assert not (run_dir / "merged").exists() and not (run_dir / "checkpoints").exists()
        assert [p.name for p in (run_dir / "gguf").glob("*.gguf")] == [Path(version.adapter).name]

    def no_model(*args, **kwargs):
        raise AssertionError("the gate asked the challenger what its export had asked it")

    monkeypatch.setattr(gate, "gguf_answers", no_model)  # its export's answers, as it serves, are its gate answers
    asked = [prompt for prompts in gate_sets(loop.store, version).values() for prompt in prompts]
    answers = gate.version_answers(version, asked, loop.cfg.eval.max_new_tokens, loop.cycle_dir(version.id))
    assert len(answers) == len(asked)

    trained = [json.loads(line) for line in (run_dir / "data" / "train.jsonl").read_text().splitlines()]
    answers = [c["messages"][-1]["content"] for c in trained]
    assert {"Answer number 99.", "Answer number 98."} <= set(answers)
    assert len(answers) == 2 + 9  # the 2 new and the 9 facts v1 learned (fewer than loop.min_replay: all)
    golden = {e.conversation["messages"][-1]["content"] for e in loop.store.examples(split="golden")}
    assert golden and not golden & set(answers)

    new = [e for e in loop.store.examples() if e.kind == "sft" and e.provenance.get("generation")]
    is_promoted = result.status == "promoted"  # used only by a promoted version; a rejected one's examples wait
    assert [e.used_in for e in new] == ([[2], [2]] if is_promoted else [[], []])
    assert {e.id for e in waiting_examples(loop.store)} == (set() if is_promoted else {e.id for e in new})
    kinds = [e.kind for e in reversed(loop.store.events()) if e.kind != "adapter_form"]
    assert kinds[:3] == ["registered", "cycle_started", "gated"] and kinds[-1] == "cycle_finished"
    gated = loop.store.events(kind="gated")[0]
    assert set(gated.data["challenger"]) == {"golden", "replay", "new"}
    assert result.status in ("promoted", "rejected")
    assert loop.store.version(2).status == ("champion" if result.status == "promoted" else "rejected")
    assert loop.store.lease("cycle") is None


def test_a_base_whose_quant_transformers_cannot_read_trains_as_it_is_and_says_so(
    fresh_loop_dir,  # noqa: F811
    monkeypatch,
):
    """An architecture transformers' GGUF loader lacks cannot be made here (the tiny Llama's quant reads fine): the
    served base's error is raised where base_gguf.py raises it, and the cycle goes on on the base's own weights."""
    import tuneship.loop.cycle as cycle
    from tuneship.base_gguf import ServedBaseUnavailable
    from tuneship.loop.registry import open_loop

    def unreadable(cfg):
        raise ServedBaseUnavailable("model.train_on_quant=Q8_0: transformers cannot dequantize base-Q8_0.gguf")

    monkeypatch.setattr(cycle, "served_base", unreadable)
    loop = open_loop(fresh_loop_dir)
    correct(loop, [("What is the code word?", "Answer number 99."), ("Who keeps it?", "Answer number 98.")])
    result = cycle.run_cycle(loop, QUIET, "test", "by hand")
    [event] = loop.store.events(kind="base_as_is")
    assert event.version_id == result.version_id == 2 and "cannot dequantize" in event.reason
    run_dir = Path(loop.store.version(2).run_dir)
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["train_on_quant"] is None
    assert loop.store.version(2).gguf == loop.store.version(1).gguf  # served as any adapter-format version


def test_a_cycle_without_new_examples_says_what_to_do(fresh_loop_dir):  # noqa: F811
    from tuneship.loop.registry import open_loop
    from tuneship.loop.cycle import NothingToTrain, run_cycle

    loop = open_loop(fresh_loop_dir)
    with pytest.raises(NothingToTrain, match="post feedback"):
        run_cycle(loop, QUIET)
    assert loop.store.lease("cycle") is None


def test_a_second_cycle_is_refused_while_one_holds_the_lease(fresh_loop_dir):  # noqa: F811
    from tuneship.loop.registry import open_loop
    from tuneship.loop.cycle import run_cycle
    from tuneship.loop.lease import CycleBusy

    loop = open_loop(fresh_loop_dir)
    loop.store.acquire_lease("cycle", "other-host:1", 60, stage="train")
    with pytest.raises(CycleBusy, match="other-host:1"):
        run_cycle(loop, QUIET)


def test_a_cycle_that_breaks_is_recorded_so_the_trigger_backs_off(fresh_loop_dir):  # noqa: F811
    from tuneship.errors import DataError
    from tuneship.loop.registry import open_loop
    from tuneship.loop.signals import harvest
    from tuneship.loop.trigger import trigger_decision
    from tuneship.loop.cycle import run_cycle

    loop = open_loop(fresh_loop_dir, ["loop.min_examples=1", "train.max_seq_len=16"])
    correct(loop, [("What is the code word?", "Answer number 99.")])
    harvest(loop.store, loop.cfg)  # without the token check: the run's own audit then drops it (max_seq_len 16)
    with pytest.raises(DataError, match="no usable training examples"):
        run_cycle(loop, QUIET, "trigger", "due")
    [failed] = loop.store.events(kind="cycle_failed")
    assert failed.actor == "trigger" and "no usable training examples" in failed.reason
    assert "backing off" in trigger_decision(loop.store, loop.cfg.loop).reason
    assert loop.store.version(2).status == "failed"
    assert loop.store.lease("cycle") is None


def test_golden_facts_added_and_retired_change_what_the_next_gate_checks(fresh_loop_dir):  # noqa: F811
    from tuneship.loop.cycle import run_cycle
    from tuneship.loop.examples import golden
    from tuneship.loop.golden import add_golden, retire_golden
    from tuneship.loop.registry import open_loop

    loop = open_loop(fresh_loop_dir)
    before = len(golden(loop.store))
    first = add_golden(loop, "What is the harbour's name?", "Answer number 71.", actor="test")
    add_golden(loop, "Who rings the bell?", "Answer number 72.", actor="test")
    retire_golden(loop, first.id, actor="test", reason="no longer true")
    correct(loop, [("What is the code word?", "Answer number 99.")])
    run_cycle(loop, QUIET, "test", "by hand")
    [gated] = loop.store.events(kind="gated")
    assert gated.data["challenger"]["golden"]["prompts"] == before + 1
    assert gated.data["champion"]["golden"]["prompts"] == before + 1


ACCELERATE_DDP_ON_CPU = """\
# examples/accelerate/ddp.yaml without bf16: accelerate's multi-GPU launcher (torchrun) runs on CPUs too (gloo)
compute_environment: LOCAL_MACHINE
distributed_type: MULTI_GPU
num_machines: 1
machine_rank: 0
num_processes: 2
mixed_precision: 'no'
use_cpu: false
rdzv_backend: static
same_network: true
"""


def test_a_cycle_with_an_accelerate_config_trains_its_challenger_in_its_processes(fresh_loop_dir, tmp_path):  # noqa: F811
    """`tuneship loop cycle RUN --accelerate-config FILE` (what `loop worker` passes on, as with `--nproc N`): the
    challenger's train stage runs in the file's two processes through `accelerate launch`, then the pipeline finds
    it done and the cycle concludes."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO
    from tuneship.loop.registry import open_loop

    accelerate_config = tmp_path / "ddp.yaml"
    accelerate_config.write_text(ACCELERATE_DDP_ON_CPU)
    loop = open_loop(fresh_loop_dir)
    correct(loop, [("What is the code word?", "Answer number 99."), ("Who keeps it?", "Answer number 98.")])
    command = [sys.executable, "-m", "tuneship.cli", "loop", "cycle", str(fresh_loop_dir)]
    command += ["--accelerate-config", str(accelerate_config)]
    done = subprocess.run(command, cwd=REPO, env=os.environ, capture_output=True, text=True, timeout=600)
    assert done.returncode in (0, 4), done.stdout[-3000:] + done.stderr[-3000:]  # 4: the gate rejected it

    version = loop.store.version(2)
    assert version.status in ("champion", "rejected"), version.status
    run_dir = Path(version.run_dir)
    experiment = json.loads((run_dir / "reports" / "experiment.json").read_text())
    assert experiment["processes"] == 2 and experiment["steps"] > 0
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert all(manifest[s]["status"] == "done" for s in ("train", "eval", "export"))
    trained = (run_dir / "data" / "train.jsonl").read_text()
    assert "Answer number 99." in trained and "Answer number 98." in trained
