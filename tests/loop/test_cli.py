"""The loop's commands: feedback import, status/versions/history, and serve's refusal to listen unprotected."""

import pytest

from tests.conftest import write_jsonl
from tests.loop.test_store import add_generation
from tuneship.cli import main


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(f"run: {{name: shop, dir: {tmp_path / 'runs'}}}\nloop: {{min_examples: 2}}\n")
    return path


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return exit_info.value.code, capsys.readouterr()


def test_serve_refuses_a_non_loopback_host_without_a_key(config_file, capsys, monkeypatch):
    monkeypatch.delenv("TUNESHIP_API_KEY", raising=False)
    code, out = run_cli(["serve", str(config_file), "--host", "0.0.0.0"], capsys)
    assert code == 2 and "no API key is set; set serve.api_key" in out.err


def test_feedback_import_counts_a_reimport_once_and_names_bad_lines(config_file, tmp_path, capsys):
    from tuneship.loop.registry import open_loop

    loop = open_loop(config_file)
    add_generation(loop.store, "gen-1")
    add_generation(loop.store, "gen-2")
    records = write_jsonl(
        tmp_path / "feedback.jsonl",
        [
            {"generation_id": "gen-1", "rating": "up"},
            {"generation_id": "gen-2", "rating": 2, "correction": "Paris.", "comment": "city"},
            {"generation_id": "gen-9", "rating": "up"},
            {"generation_id": "gen-1", "rating": "sideways"},
            "{not json",
        ],
    )
    code, out = run_cli(["feedback", "import", str(records), "--run", str(config_file)], capsys)
    assert code == 1 and "imported 2, already there 0, invalid 3" in out.out
    assert "feedback.jsonl:3: generation_id: no generation 'gen-9'" in out.out
    assert "feedback.jsonl:4: rating: expected" in out.out
    code, out = run_cli(["feedback", "import", str(records), "--run", str(config_file)], capsys)
    assert "imported 0, already there 2, invalid 3" in out.out
    assert loop.store.feedback_count() == 2
    assert {f.source for f in loop.store.feedback_for("gen-2")} == {f"import:{records}:2"}


def test_feedback_import_reads_csv(config_file, tmp_path, capsys):
    from tuneship.loop.registry import open_loop

    add_generation(open_loop(config_file).store, "gen-1")
    path = tmp_path / "feedback.csv"
    path.write_text("generation_id,rating,correction,comment\ngen-1,4,,nice\n")
    code, out = run_cli(["feedback", "import", str(path), "--run", str(config_file)], capsys)
    assert code in (0, None) and "imported 1" in out.out
    [row] = open_loop(config_file).store.feedback_for("gen-1")
    assert (row.rating, row.correction, row.comment) == ("4", None, "nice")


def test_status_versions_and_history_show_the_registry(config_file, capsys):
    code, out = run_cli(["loop", "status", str(config_file)], capsys)
    assert "champion: v1 shop" in out.out and "examples waiting: 0 / 2" in out.out
    assert "trigger: not due (0/2 new examples)" in out.out
    code, out = run_cli(["loop", "versions", str(config_file)], capsys)
    assert "v1" in out.out and "champion" in out.out
    code, out = run_cli(["loop", "history", str(config_file)], capsys)
    assert "registered" in out.out


def test_rollback_without_an_earlier_champion_is_a_clear_error(config_file, capsys):
    code, out = run_cli(["loop", "rollback", str(config_file)], capsys)
    assert code == 1 and "nothing to roll back to" in out.err


def test_approve_releases_examples_held_for_review(config_file, capsys):
    from tuneship.loop.registry import open_loop
    from tuneship.loop.signals import harvest

    loop = open_loop(config_file, ["loop.review=required"])
    add_generation(loop.store, "gen-1")
    loop.store.add_feedback("gen-1", None, "Paris, France.", None)
    harvest(loop.store, loop.cfg)
    code, out = run_cli(["loop", "approve", str(config_file)], capsys)
    assert "approved 4 of 4 pending examples" in out.out
    assert {e.status for e in loop.store.examples()} == {"accepted"}


def test_golden_examples_that_repeat_training_data_are_kept_golden_and_not_replayed(tmp_path):
    from tests.conftest import qa
    from tuneship.loop.registry import open_loop
    from tuneship.loop.examples import replay_sample

    run_dir = tmp_path / "runs" / "shop"
    facts = [qa(f"Question {i}?", f"Answer {i}.") for i in range(4)]
    write_jsonl(
        run_dir / "data" / "train.jsonl", [{**f, "source": {"file": "f", "line": i}} for i, f in enumerate(facts)]
    )
    write_jsonl(tmp_path / "golden.jsonl", facts[:2])
    config = tmp_path / "run.yaml"
    config.write_text(f"run: {{name: shop, dir: {tmp_path / 'runs'}}}\nloop: {{golden: {tmp_path / 'golden.jsonl'}}}\n")
    loop = open_loop(config)
    assert loop.store.events(kind="registered")[0].data["golden_examples"] == 2
    assert len(loop.store.examples(split="golden")) == 2 and len(loop.store.examples(split="train")) == 4
    loop.cfg.loop.min_replay = 0
    replayed = replay_sample(loop.store, loop.cfg.loop, set(), seed=1)
    trained = {e.id: e.conversation["messages"][0]["content"] for e in loop.store.examples(split="train")}
    assert sorted(trained[i] for i in replayed) == []  # replay_ratio x 0 new examples
    loop.cfg.loop.replay_ratio = 10.0
    assert sorted(trained[i] for i in replay_sample(loop.store, loop.cfg.loop, {"x"}, seed=1)) == [
        "Question 2?",
        "Question 3?",
    ]


def shop_loop(tmp_path, facts: int):
    """A loop whose v1 learned `facts` numbered questions (no golden set, replay of everything)."""
    from tests.conftest import qa
    from tuneship.loop.registry import open_loop

    records = [{**qa(f"Question {i}?", f"Answer {i}."), "source": {"file": "f", "line": i}} for i in range(facts)]
    write_jsonl(tmp_path / "runs" / "shop" / "data" / "train.jsonl", records)
    config = tmp_path / "run.yaml"
    settings = "replay_ratio: 10, min_replay: 0"
    config.write_text(f"run: {{name: shop, dir: {tmp_path / 'runs'}}}\nloop: {{{settings}}}\n")
    return open_loop(config)


def test_a_correction_supersedes_the_answer_it_corrects_in_replay_and_in_its_own_cycle(tmp_path):
    from tests.loop_fixtures import served
    from tuneship.loop.signals import harvest
    from tuneship.loop.approval import review_examples
    from tuneship.loop.examples import current_waiting, replay_sample

    loop = shop_loop(tmp_path, 4)
    served(loop.store, "gen-1", "Question 0?", "Answer 0.")
    served(loop.store, "gen-2", "Question 0?", "Answer 0.")
    loop.store.add_feedback("gen-1", "down", "Answer zero, first try.", None)
    harvest(loop.store, loop.cfg)
    loop.store.add_feedback("gen-2", "down", "Answer zero.", None)
    harvest(loop.store, loop.cfg)
    pending = loop.store.examples(status="pending_review")  # both contradict what v1 was taught: a person decides
    assert {e.reason for e in pending} == {
        "conflicts with f:0: taught answer 'Answer 0.', this answer 'Answer zero, first try.'",
        "conflicts with f:0: taught answer 'Answer 0.', this answer 'Answer zero.'",
    }
    assert review_examples(loop, [e.id for e in pending], "approve", "test") == len(pending)

    waiting = current_waiting(loop.store, "sft")
    assert [e.conversation["messages"][-1]["content"] for e in waiting] == ["Answer zero."]
    [older] = loop.store.examples(status="superseded")
    assert older.conversation["messages"][-1]["content"] == "Answer zero, first try." and "newer" in older.reason
    replayed = {e.id: e.conversation["messages"] for e in loop.store.examples()}
    questions = sorted(
        replayed[i][0]["content"] for i in replay_sample(loop.store, loop.cfg.loop, {waiting[0].id}, seed=1)
    )
    assert questions == ["Question 1?", "Question 2?", "Question 3?"]  # not "Question 0?" with its old answer


def test_a_rejected_versions_examples_are_never_replayed_and_the_gate_checks_facts_not_replayed(tmp_path):
    from tests.loop_fixtures import served
    from tuneship.loop.signals import harvest
    from tuneship.loop.examples import forgetting_check, replay_sample

    loop = shop_loop(tmp_path, 30)
    served(loop.store, "gen-1", "Question 0?", "Answer 0.")
    loop.store.add_feedback("gen-1", "down", "A wrong answer zero.", None)
    harvest(loop.store, loop.cfg)
    [wrong] = [e.id for e in loop.store.examples() if e.kind == "sft" and e.provenance.get("generation")]
    loop.store.add_version(id=2, name="shop-v2", parent_id=1, run_dir="x", gguf=None, status="rejected")
    loop.store.mark_used([wrong], 2)
    answers = {e.id: e.conversation["messages"][-1]["content"] for e in loop.store.examples()}
    everything = replay_sample(loop.store, loop.cfg.loop, {"a", "b", "c"}, seed=3)  # 10 per new one: the whole pool
    assert sorted(answers[i] for i in everything) == sorted(f"Answer {i}." for i in range(30))  # the wrong one aside

    replay = replay_sample(loop.store, loop.cfg.loop, {"new"}, seed=3)
    metrics = {"new_examples": [], "replay_examples": replay}
    version = loop.store.add_version(id=3, name="v3", parent_id=1, run_dir="y", status="training", metrics=metrics)
    checked = {e.id for e in forgetting_check(loop.store, version)}
    assert len(replay) == 10 and len(checked) == 20 and not checked & set(replay)  # of 30 learned: not replayed
    assert wrong not in checked


def test_a_small_knowledge_base_is_replayed_whole(tmp_path):
    from tuneship.loop.examples import replay_sample

    loop = shop_loop(tmp_path, 30)
    loop.cfg.loop.replay_ratio, loop.cfg.loop.min_replay = 1.0, 100
    assert (
        len(replay_sample(loop.store, loop.cfg.loop, {"new"}, seed=1)) == 30
    )  # fewer than loop.min_replay learned: all of them
    loop.cfg.loop.min_replay = 12
    assert len(replay_sample(loop.store, loop.cfg.loop, {"new"}, seed=1)) == 12
    assert (
        len(replay_sample(loop.store, loop.cfg.loop, {f"new-{i}" for i in range(20)}, seed=1)) == 20
    )  # replay_ratio x new


def test_status_lists_each_replica_with_what_it_serves_and_why_not(config_file, capsys):
    from tuneship.loop.registry import open_loop

    store = open_loop(config_file).store
    store.report_replica("host-a:1:x", "host-a", "http://10.0.0.1:8000", 1, None)
    store.report_replica("host-b:2:y", "host-b", "http://10.0.0.2:8000", 1, "v2 not served: sha256 differs")
    code, out = run_cli(["loop", "status", str(config_file)], capsys)
    assert code == 0 and "cycles: local" in out.out
    assert "replica host-a http://10.0.0.1:8000: serves v1, reported" in out.out
    assert "replica host-b http://10.0.0.2:8000: serves v1" in out.out and "v2 not served: sha256 differs" in out.out
    store.forget_replica("host-a:1:x")
    code, out = run_cli(["loop", "status", str(config_file)], capsys)
    assert "host-a" not in out.out
