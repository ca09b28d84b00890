"""Feedback to live: how long from a user's last correction to the first answer from the version that learned it.

On a copy of a run (default: runs/quickstart, what `make demo` makes), for each version format: `tuneship serve`
in its own process with the settings a user gets and `loop.min_examples=N`; N questions the run was never taught
(examples/data/corrections.jsonl) are asked through the real `openai` client and each answer corrected (POST
/v1/feedback). From the last correction the clock runs until a chat answer comes from a promoted fine-tuned
version. Then every stage of its cycle, from the loop's events and the version's run manifest:

  trigger   last correction -> the cycle's start (harvest, waiting for a running few-shot cycle, process start)
  data, train, eval, export, template, deploy   the challenger's pipeline stages (its manifest)
  other     the rest of the pipeline's time (imports, loading the model, the stages' bookkeeping)
  gate      challenger and champion on the golden, replay and new prompts in llama.cpp
  promote   the registry's move (and Ollama's, with serve.backend ollama)
  smoke     the promoted version through the live endpoint (runs alongside "live": not in the total)
  live      the promotion -> the first answer from the new version to the benchmark's client

and whether the new facts were learned and the facts it was taught before kept (exact answers).

Usage: python benchmarks/loop_latency.py [--run runs/quickstart] [--corrections 10] [--formats adapter merged]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.feedback_load import ADMIN, free_port, start_serve  # noqa: E402

PIPELINE_STAGES = ("data", "train", "eval", "export", "template", "deploy")


@dataclass
class Latency:
    version_format: str
    stages: dict[str, float] = field(default_factory=dict)
    total: float = 0.0
    learned: int = 0
    corrections: int = 0
    kept: int = 0
    taught_before: int = 0
    version: int | None = None
    missed: dict[str, str] = field(default_factory=dict)  # a correction not learned -> the answer given


def facts(path: Path) -> dict[str, str]:
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["messages"][0]["content"]: r["messages"][1]["content"] for r in records}


def copy_run(run: Path, into: Path) -> Path:
    target = into / "runs" / run.name
    shutil.copytree(run, target, ignore=shutil.ignore_patterns("checkpoints"))
    return target


def get(url: str) -> dict:
    request = urllib.request.Request(url, headers=ADMIN)
    return json.loads(urllib.request.urlopen(request, timeout=30).read())


def ask(client, model: str, question: str):
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], max_tokens=48, temperature=0
    )
    return reply, reply.choices[0].message.content.strip()


def exact(client, model: str, known: dict[str, str]) -> set[str]:
    return {q for q, a in known.items() if ask(client, model, q)[1] == a}


def finetuned_version(url: str, statuses: tuple[str, ...]) -> dict | None:
    versions = get(url + "/v1/versions")["data"]
    return next((v for v in versions if v["kind"] == "finetune" and v["parent"] and v["status"] in statuses), None)


def why_not_promoted(url: str, version: dict) -> str:
    """A version's cycle ended without a promotion: the reasons its events give (the gate's, or the failure)."""
    events = [e for e in get(url + "/v1/loop/events?limit=1000")["data"] if e["version"] == version["id"]]
    reasons = [e["reason"] for e in events if e["kind"] in ("gated", "cycle_failed", "cycle_finished")]
    return f"v{version['id']} was {version['status']}, not promoted: " + ("; ".join(reasons) or "no reason recorded")


def measure(
    run: Path,
    version_format: str,
    corrections: dict[str, str],
    taught: dict[str, str],
    keep: Path | None = None,
    settings: list[str] = (),
) -> Latency:
    from openai import OpenAI

    result = Latency(version_format, corrections=len(corrections))
    with tempfile.TemporaryDirectory() as folder:
        copy = copy_run(run, keep / version_format if keep else Path(folder))
        port = free_port()
        overrides = [f"loop.min_examples={len(corrections)}", f"loop.version_format={version_format}", *settings]
        server = start_serve(copy, port, overrides, seconds=600)
        url = f"http://127.0.0.1:{port}"
        client = OpenAI(base_url=url + "/v1", api_key=ADMIN["Authorization"].split()[1], max_retries=0)
        try:
            model = get(url + "/v1/models")["data"][0]["id"]
            before = exact(client, model, taught)
            for question, correction in corrections.items():
                reply, _ = ask(client, model, question)
                client.post(
                    "/feedback",
                    body={"generation_id": reply.id, "rating": "down", "correction": correction},
                    cast_to=object,
                )
            last_correction = time.time()
            live = wait_for_live(client, url, model, next(reversed(corrections)))
            result.total = live["at"] - last_correction
            result.version = live["version"]
            result.stages = stage_times(url, copy.parent, live, last_correction)
            answers = {question: ask(client, model, question)[1] for question in corrections}
            result.missed = {q: answers[q] for q, correction in corrections.items() if answers[q] != correction}
            result.learned = len(corrections) - len(result.missed)
            result.taught_before, result.kept = len(before), len(before & exact(client, model, taught))
        finally:
            server.terminate()
            server.wait(timeout=60)
    return result


def wait_for_live(client, url: str, model: str, question: str, limit: float = 1800) -> dict:
    """The first chat answer that comes from a promoted fine-tuned version: {"version", "at"}."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        champion = finetuned_version(url, ("champion",))
        ended = finetuned_version(url, ("rejected", "failed"))
        if champion is None and ended is not None:
            raise RuntimeError(why_not_promoted(url, ended))
        if champion is not None:
            reply, _ = ask(client, model, question)
            if reply.tuneship["version"] == champion["id"]:
                return {"version": champion["id"], "at": time.time()}
        time.sleep(0.2)
    raise RuntimeError(f"no fine-tuned version promoted within {limit:g} s: {get(url + '/v1/loop/status')}")


def version_events(url: str, version_id: int, limit: float = 300) -> list[dict]:
    """The version's events once its cycle finished (the live answer can come before: the smoke test asks the
    live endpoint too)."""
    deadline = time.monotonic() + limit
    while True:
        events = [e for e in get(url + "/v1/loop/events?limit=1000")["data"] if e["version"] == version_id]
        if any(e["kind"] == "cycle_finished" for e in events) or time.monotonic() > deadline:
            return events
        time.sleep(0.5)


def stage_times(url: str, runs_dir: Path, live: dict, last_correction: float) -> dict[str, float]:
    events = version_events(url, live["version"])
    at = {e["kind"]: epoch(e["at"]) for e in reversed(events)}  # the first of each kind
    version = next(v for v in get(url + "/v1/versions")["data"] if v["id"] == live["version"])
    manifest = json.loads((runs_dir / version["name"] / "manifest.json").read_text())
    pipeline = {name: manifest[name]["seconds"] for name in PIPELINE_STAGES if name in manifest}
    gate_start = at["gated"] - gate_seconds(events)
    stages = {"trigger": at["cycle_started"] - last_correction, **pipeline}
    stages["other"] = gate_start - at["cycle_started"] - sum(pipeline.values())
    stages["gate"] = at["gated"] - gate_start
    stages["promote"] = at["promoted"] - at["gated"]
    stages["smoke"] = at["cycle_finished"] - at["promoted"]
    stages["live"] = live["at"] - at["promoted"]  # the first live answer: often before the smoke test's end
    return stages


def gate_seconds(events: list[dict]) -> float:
    gated = next(e for e in events if e["kind"] == "gated")
    return float(gated["data"].get("seconds", 0.0))


def epoch(stamp: str) -> float:
    moment = datetime.fromisoformat(stamp)
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()


def print_table(results: list[Latency]) -> None:
    names = list(dict.fromkeys(name for r in results for name in r.stages))
    print(f"{'stage':<10}" + "".join(f"{r.version_format:>12}" for r in results))
    for name in names:
        print(f"{name:<10}" + "".join(f"{r.stages.get(name, 0.0):>11.1f}s" for r in results))
    print(f"{'total':<10}" + "".join(f"{r.total:>11.1f}s" for r in results))
    print(f"{'learned':<10}" + "".join(f"{f'{r.learned}/{r.corrections}':>12}" for r in results))
    print(f"{'kept':<10}" + "".join(f"{f'{r.kept}/{r.taught_before}':>12}" for r in results))
    for result in results:
        for question, answer in result.missed.items():
            print(f"not learned ({result.version_format}): {question!r} -> {answer!r}")


def require_exported(run: Path) -> None:
    """The loop serves the run's exported GGUF: a run that `make demo` (or `tuneship run`) did not finish stops
    here with the fix, not later with a server that cannot answer."""
    manifest = run / "manifest.json"
    status = json.loads(manifest.read_text()).get("export", {}).get("status") if manifest.is_file() else None
    if status != "done":
        raise SystemExit(
            f"{run}: not exported yet (export stage: {status or 'not run'}); run `make demo` (or `tuneship run "
            "CONFIG`) first, or pass --run RUN_DIR"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, default=REPO / "runs" / "quickstart")
    parser.add_argument("--corrections", type=int, default=10)
    parser.add_argument("--formats", nargs="+", default=["adapter", "merged"], choices=["adapter", "merged"])
    parser.add_argument("--keep", type=Path, help="make the run's copies (and their cycles) under this folder, kept")
    parser.add_argument("--set", action="append", default=[], metavar="K=V", help="another setting (repeatable)")
    args = parser.parse_args()
    require_exported(args.run)
    corrections = dict(list(facts(REPO / "examples" / "data" / "corrections.jsonl").items())[: args.corrections])
    taught = facts(REPO / "examples" / "data" / "facts.jsonl")
    print(f"{platform.processor() or platform.machine()}, {platform.system()}; run {args.run}")
    results = [measure(args.run, fmt, corrections, taught, args.keep, args.set) for fmt in args.formats]
    print_table(results)


if __name__ == "__main__":
    main()
