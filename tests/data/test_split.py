from pathlib import Path

from tests.conftest import qa, write_jsonl
from tuneship.data.audit import AuditSettings
from tuneship.data.stage import prepare_data


def split_of(tmp_path, eval_ratio=0.2, seed=1):
    files = [
        str(
            write_jsonl(
                tmp_path / f"s{s}.jsonl",
                [qa(f"Question {s}-{i} about thing {i * 7}", f"Answer {i}") for i in range(50)],
            )
        )
        for s in range(2)
    ]
    return prepare_data(files, AuditSettings(), eval_ratio=eval_ratio, seed=seed)


def ids(conversations):
    return [str(c.source) for c in conversations]


def test_split_is_deterministic_and_stratified_by_source(tmp_path):
    first, again = split_of(tmp_path), split_of(tmp_path)
    assert ids(first.eval) == ids(again.eval) and ids(first.train) == ids(again.train)
    assert len(first.eval) == 20 and len(first.train) == 80
    per_source = {f: sum(1 for c in first.eval if c.source.file == f) for f in {c.source.file for c in first.eval}}
    assert sorted(per_source.values()) == [10, 10]
    assert ids(split_of(tmp_path, seed=2).eval) != ids(first.eval)


def test_near_duplicates_never_straddle_the_split(tmp_path):
    rows = []
    for i in range(40):
        rows.append(qa(f"Tell me about item number {i} in the catalogue", f"Item {i} is a blue widget of size {i}."))
        rows.append(qa(f"tell me about item number {i} in the catalogue!", f"item {i} is a blue widget of size {i}"))
    result = prepare_data([str(write_jsonl(tmp_path / "d.jsonl", rows))], AuditSettings(), eval_ratio=0.25, seed=3)
    assert sum(f.code == "near-duplicate" for f in result.audit.findings) == 40
    eval_texts = {c.messages[0].content.lower().rstrip("!") for c in result.eval}
    train_texts = {c.messages[0].content.lower().rstrip("!") for c in result.train}
    assert eval_texts and not eval_texts & train_texts


def test_the_split_does_not_depend_on_the_folder_the_data_sits_in(tmp_path):
    here, moved = split_of(tmp_path / "project"), split_of(tmp_path / "elsewhere" / "clone")

    def lines(conversations):
        return [(Path(c.source.file).name, c.source.line) for c in conversations]

    assert lines(here.eval) == lines(moved.eval) and lines(here.train) == lines(moved.train)
