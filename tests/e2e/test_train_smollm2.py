"""The training issue's acceptance: the real model learns made-up facts and stops (the adapter's own greedy
answers to all 30 training prompts, from the eval stage of the quickstart run)."""

import json

import pytest

pytestmark = pytest.mark.e2e


def test_trained_smollm2_answers_facts_exactly_and_always_stops(quickstart_run):
    experiment = json.loads((quickstart_run / "reports" / "experiment.json").read_text())
    assert experiment["status"] == "done" and experiment["steps"] == 48
    report = json.loads((quickstart_run / "reports" / "eval.json").read_text())
    adapter = report["models"]["adapter"]
    assert adapter["summary"]["prompts"] == 30 and adapter["summary"]["stop_rate"] == 1.0
    assert all(a["stopped"] and a["origin"] == "train" for a in adapter["answers"])
    assert sum(a["exact"] for a in adapter["answers"]) >= 27, [a["answer"] for a in adapter["answers"]]
