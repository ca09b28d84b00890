"""Storage stays bounded: old versions lose their heavy files (never the champion, the rollback target, or what
a kept version points at), old generations go, and disk use is reported. Real files, a real SQLite store."""

from datetime import timedelta
from pathlib import Path

import pytest

from tuneship.loop.prune import disk_use, prune_loop, prune_versions
from tuneship.loop.registry import Loop, RegistryError, open_loop, require_servable
from tuneship.loop.tables import Example, utcnow

HEAVY = ("checkpoints", "merged", "gguf")
KEPT = ("adapter", "chat", "reports", "config.yaml", "manifest.json")
# bytes of each file a run has: the heavy ones first
SIZES = {
    "checkpoints/checkpoint-2/model.safetensors": 1000,
    "merged/model.safetensors": 2000,
    "gguf/{name}-Q4_K_M.gguf": 3000,
    "adapter/adapter_model.safetensors": 100,
    "adapter/chat_format.json": 10,
    "chat/chat_format.json": 10,
    "reports/eval.json": 20,
    "config.yaml": 30,
    "manifest.json": 2,
}
HEAVY_BYTES = 6000
CYCLE_BYTES = 400


def write_bytes(path: Path, count: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * count)
    return path


def make_run(folder: Path) -> Path:
    """A trained and exported run's files (sizes as SIZES); returns its GGUF."""
    for name, count in SIZES.items():
        write_bytes(folder / name.format(name=folder.name), count)
    return folder / "gguf" / f"{folder.name}-Q4_K_M.gguf"


def shop_loop(tmp_path: Path, **settings) -> Loop:
    """A loop whose v1 (the base run `shop`) has every file of an exported run."""
    make_run(tmp_path / "runs" / "shop")
    loop_settings = ", ".join(f"{key}: {value}" for key, value in settings.items())
    config = tmp_path / "run.yaml"
    config.write_text(f"run: {{name: shop, dir: {tmp_path / 'runs'}}}\nloop: {{{loop_settings}}}\n")
    loop = open_loop(config)
    assert loop.store.version(1).gguf  # v1 is registered with its GGUF
    return loop


def add_version(loop: Loop, version_id: int, status: str, promoted_days_ago: int | None = None, fewshot_of=None):
    """A fine-tuned version with its own run and cycle folder, or a few-shot one on `fewshot_of`'s run."""
    cycle = loop.cycle_dir(version_id)
    if fewshot_of is None:
        run_dir = Path(loop.cfg.run.dir) / loop.version_name(version_id)
        gguf = make_run(run_dir)
        write_bytes(cycle / "train.jsonl", CYCLE_BYTES)
    else:
        parent = loop.store.version(fewshot_of)
        run_dir, gguf = Path(parent.run_dir), parent.gguf
        write_bytes(cycle / "Modelfile", CYCLE_BYTES)
    promoted_at = None if promoted_days_ago is None else utcnow() - timedelta(days=promoted_days_ago)
    return loop.store.add_version(
        id=version_id,
        name=loop.version_name(version_id),
        parent_id=fewshot_of or 1,
        run_dir=str(run_dir),
        gguf=str(gguf),
        status=status,
        kind="finetune" if fewshot_of is None else "fewshot",
        metrics={"gate": {"challenger": {"golden": {"f1": 0.75}}}},
        promoted_at=promoted_at,
    )


def heavy_left(loop: Loop, version_id: int) -> list[str]:
    run_dir = Path(loop.store.version(version_id).run_dir)
    left = [name for name in HEAVY if (run_dir / name).exists()]
    return left + (["cycle"] if loop.cycle_dir(version_id).exists() else [])


@pytest.mark.parametrize("keep", [1, 2, 3, 10])
def test_the_champion_and_the_previous_champion_keep_their_files_with_any_keep_versions(tmp_path, keep):
    loop = shop_loop(tmp_path, keep_versions=keep)
    loop.store.update_version(1, status="retired", promoted_at=utcnow() - timedelta(days=30))
    add_version(loop, 2, "rejected")
    add_version(loop, 3, "retired", promoted_days_ago=20)  # what a rollback restores
    add_version(loop, 4, "champion", promoted_days_ago=10)
    add_version(loop, 5, "rejected")
    add_version(loop, 6, "failed")

    result = prune_versions(loop)

    ended_newest_first = [6, 5, 3, 2, 1]
    pruned = set(ended_newest_first[keep:]) - {3}
    assert set(result.freed) == pruned
    for version_id in (3, 4):
        assert heavy_left(loop, version_id) == [*HEAVY, "cycle"]
        assert Path(loop.store.version(version_id).gguf).is_file()
    for version_id in set(range(1, 7)) - pruned - {3, 4}:
        assert heavy_left(loop, version_id) == [*HEAVY] + (["cycle"] if version_id != 1 else [])


def test_only_the_oldest_ended_versions_lose_their_heavy_files_and_keep_their_row(tmp_path):
    loop = shop_loop(tmp_path, keep_versions=2)
    for version_id in (2, 3, 4, 5):
        add_version(loop, version_id, "rejected")

    result = prune_versions(loop)

    assert result.freed == {2: HEAVY_BYTES + CYCLE_BYTES, 3: HEAVY_BYTES + CYCLE_BYTES}
    for version_id in (2, 3):
        version = loop.store.version(version_id)
        run_dir = Path(version.run_dir)
        assert heavy_left(loop, version_id) == []
        assert all((run_dir / name).exists() for name in KEPT)  # the row's numbers and chat format stay readable
        assert (version.status, version.gguf) == ("rejected", None)
        assert version.metrics["gate"] == {"challenger": {"golden": {"f1": 0.75}}}
        assert version.metrics["pruned"]["bytes"] == HEAVY_BYTES + CYCLE_BYTES
        assert sorted(version.metrics["pruned"]["paths"]) == sorted(
            [str(run_dir.resolve() / name) for name in HEAVY] + [str(loop.cycle_dir(version_id).resolve())]
        )
        with pytest.raises(RegistryError, match="no exported GGUF"):
            require_servable(version)
    for version_id in (1, 4, 5):
        assert Path(loop.store.version(version_id).gguf).is_file()
    [event] = loop.store.events(kind="pruned")
    assert event.data["bytes"] == 2 * (HEAVY_BYTES + CYCLE_BYTES) and event.data["versions"] == [2, 3]
    assert event.actor == "tuneship" and "freed 12,800 bytes from v2, v3" in event.reason

    assert prune_versions(loop).freed == {}  # nothing left to prune: no second event
    assert len(loop.store.events(kind="pruned")) == 1


def test_a_gguf_shared_with_a_live_fewshot_version_is_not_deleted(tmp_path):
    loop = shop_loop(tmp_path, keep_versions=1)
    loop.store.update_version(1, status="retired", promoted_at=utcnow() - timedelta(days=40))
    add_version(loop, 2, "retired", promoted_days_ago=30)
    add_version(loop, 3, "retired", promoted_days_ago=20, fewshot_of=2)  # v2's run and GGUF, plus shots
    add_version(loop, 4, "champion", promoted_days_ago=10)

    result = prune_versions(loop)

    # v2 is beyond keep_versions, but v3 (kept) serves from its run: only v2's cycle folder goes
    assert result.freed == {1: HEAVY_BYTES, 2: CYCLE_BYTES}
    assert heavy_left(loop, 2) == [*HEAVY]
    v2, v3 = loop.store.version(2), loop.store.version(3)
    assert v2.gguf == v3.gguf and Path(v3.gguf).is_file()
    assert v2.metrics["pruned"]["paths"] == [str(loop.cycle_dir(2).resolve())]
    assert loop.store.version(1).gguf is None


def test_a_fewshot_version_pruned_with_its_parent_loses_its_gguf_too(tmp_path):
    loop = shop_loop(tmp_path, keep_versions=2)
    add_version(loop, 2, "rejected")
    add_version(loop, 3, "rejected", fewshot_of=2)
    add_version(loop, 4, "rejected")
    add_version(loop, 5, "rejected")

    result = prune_versions(loop)

    assert result.freed == {2: HEAVY_BYTES + CYCLE_BYTES, 3: CYCLE_BYTES}  # v2's run is counted once, at v2
    assert loop.store.version(2).gguf is None and loop.store.version(3).gguf is None


def test_files_outside_the_runs_folder_are_never_deleted(tmp_path):
    loop = shop_loop(tmp_path, keep_versions=1)
    elsewhere = tmp_path / "elsewhere" / "shop-v2"
    gguf = make_run(elsewhere)
    loop.store.add_version(id=2, name="shop-v2", parent_id=1, run_dir=str(elsewhere), gguf=str(gguf), status="failed")
    add_version(loop, 3, "rejected")

    assert prune_versions(loop).freed == {}
    assert all((elsewhere / name).exists() for name in HEAVY) and loop.store.version(2).gguf == str(gguf)


def generation_fields(generation_id: str, days_ago: int) -> dict:
    return {
        "id": generation_id,
        "created_at": utcnow() - timedelta(days=days_ago),
        "model": "shop",
        "version_id": 1,
        "backend": "test",
        "messages": [{"role": "user", "content": f"Question {generation_id}?"}],
        "answer": "Answer.",
        "finish_reason": "stop",
        "latency_ms": 1.0,
        "prompt_tokens": None,
        "completion_tokens": None,
    }


def add_generation(loop: Loop, generation_id: str, days_ago: int, outcome: str | None = "examples: sft") -> None:
    """A served generation `days_ago` old, with a processed feedback row (`outcome`), an unprocessed one (None),
    or none ("no feedback")."""
    loop.store.add_generation(**generation_fields(generation_id, days_ago))
    if outcome != "no feedback":
        feedback, _ = loop.store.add_feedback(generation_id, "up", None, None)
        if outcome is not None:
            loop.store.set_feedback_outcome([feedback.id], outcome)


def test_old_generations_with_processed_feedback_are_deleted_and_newer_ones_stay(tmp_path):
    loop = shop_loop(tmp_path, keep_generations_days=30)
    add_generation(loop, "old-processed", 40)
    add_generation(loop, "old-silent", 40, outcome="no feedback")
    add_generation(loop, "old-unprocessed", 40, outcome=None)
    add_generation(loop, "old-waiting", 40)  # its example waits for a cycle
    add_generation(loop, "recent", 5)
    conversation = {
        "system": None,
        "messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}],
    }
    waiting = Example(
        id="ex-1",
        kind="sft",
        conversation=conversation,
        provenance={"generation": "old-waiting"},
        split="train",
        status="accepted",
    )
    loop.store.add_examples([waiting])

    result = prune_loop(loop)

    assert result.generations == 2
    assert loop.store.generation("old-processed") is None and loop.store.feedback_for("old-processed") == []
    assert loop.store.generation("old-silent") is None
    for kept in ("old-unprocessed", "old-waiting", "recent"):
        assert loop.store.generation(kept) is not None
    assert loop.store.feedback_count() == 3
    [event] = loop.store.events(kind="pruned")
    assert event.data["generations"] == 2 and event.actor == "cli"


def test_the_store_deletes_old_processed_generations_on_sqlite_and_postgresql(store):
    for generation_id, days_ago in (("old", 10), ("old-open", 10), ("old-kept", 10), ("new", 1)):
        store.add_generation(**generation_fields(generation_id, days_ago))
    done, _ = store.add_feedback("old", "up", None, None)
    store.set_feedback_outcome([done.id], "examples: sft")
    store.add_feedback("old-open", "down", None, None)

    assert store.delete_generations_before(utcnow() - timedelta(days=5), keep={"old-kept"}) == 1
    assert {g.id for g in store.recent_generations()} == {"new", "old-open", "old-kept"}
    assert store.feedback_for("old") == [] and len(store.feedback_for("old-open")) == 1
    assert store.delete_generations_before(utcnow()) == 2  # without keep: old-kept and new (no feedback)


def test_generations_are_kept_when_keep_generations_days_is_null(tmp_path):
    loop = shop_loop(tmp_path)
    add_generation(loop, "ancient", 4000)
    assert prune_loop(loop).generations == 0 and loop.store.generation("ancient") is not None
    assert loop.store.events(kind="pruned") == []


def test_disk_use_counts_a_shared_run_folder_once(tmp_path):
    from tuneship.loop.status import format_bytes, status_report
    from tuneship.serve.web.loop_views import loop_context

    loop = shop_loop(tmp_path)
    add_version(loop, 2, "retired")
    add_version(loop, 3, "rejected", fewshot_of=2)
    run_bytes = sum(SIZES.values())

    assert disk_use(loop) == {1: run_bytes, 2: run_bytes + CYCLE_BYTES, 3: CYCLE_BYTES}
    assert status_report(loop)["disk"] == disk_use(loop)
    page = loop_context(loop, None)
    assert [row[0] for row in page["disk"]] == [3, 2, 1] and page["disk"][2][2:] == (
        "champion",
        format_bytes(run_bytes),
    )


def test_prune_command_prints_what_it_freed(tmp_path, cli):
    from tuneship.loop.status import format_bytes

    loop = shop_loop(tmp_path)
    for version_id in (2, 3, 4):
        add_version(loop, version_id, "rejected")
    add_generation(loop, "old", 40)
    config = tmp_path / "run.yaml"

    run_bytes, freed = sum(SIZES.values()), HEAVY_BYTES + CYCLE_BYTES
    total = 4 * run_bytes + 3 * CYCLE_BYTES
    assert f"disk: {format_bytes(total)} in 4 versions' files" in cli("loop", "status", config).out

    result = cli("loop", "prune", config, "--set", "loop.keep_versions=1", "--set", "loop.keep_generations_days=30")

    assert result.code == 0, result.output
    each = format_bytes(freed)
    assert f"freed {format_bytes(2 * freed)}: v2 {each}, v3 {each} (loop.keep_versions=1)" in result.out
    assert "deleted 1 generations older than 30 days" in result.out
    assert f"disk: {format_bytes(total - 2 * freed)} in 4 versions' files" in cli("loop", "status", config).out
    again = cli("loop", "prune", config, "--set", "loop.keep_versions=1")
    assert "freed 0 B: no version to prune" in again.out and "kept every generation" in again.out
