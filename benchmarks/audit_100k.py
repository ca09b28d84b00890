"""Audit 100k synthetic records: wall time, records/s and peak RSS.

Usage: python benchmarks/audit_100k.py [N]
The data mixes templated Q/A (the shape that stresses near-duplicate detection), multi-turn chats,
exact and near duplicates, empty answers, malformed lines and percent values.
"""

from __future__ import annotations

import json
import platform
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

from tuneship.data.audit import AuditSettings
from tuneship.data.stage import prepare_data, write_data_outputs

WORDS = "alpha beta gamma delta river mountain orange violet quiet rapid silver ancient bright hollow".split()


def synthetic_line(index: int, rng: random.Random) -> str:
    kind = index % 20
    words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 30)))
    if kind == 0:
        return '{"prompt": "broken'
    if kind in (1, 6):  # 6 repeats 1 exactly
        return json.dumps({"prompt": f"Question {index // 20}?", "completion": f"Answer {index // 20}."})
    if kind == 2:  # near-duplicate of 1
        return json.dumps({"prompt": f"question {index // 20}", "completion": f"answer {index // 20}"})
    if kind == 7:  # a fraction printed as a percent, same wording as 4
        return json.dumps(
            {
                "instruction": f"Share in year {index}?",
                "input": "",
                "output": f"The share was {rng.uniform(0.01, 0.99):.4f}% of the total.",
            }
        )
    if kind == 3:
        return json.dumps({"prompt": f"Empty {index}", "completion": ""})
    if kind == 4:
        return json.dumps(
            {
                "instruction": f"Share in year {index}?",
                "input": "",
                "output": f"The share was {rng.uniform(1, 99):.2f}% of the total.",
            }
        )
    if kind == 5:
        return json.dumps(
            {
                "messages": [
                    {"role": "user", "content": f"Hi {index}, {words}"},
                    {"role": "assistant", "content": words},
                    {"role": "user", "content": "And then?"},
                    {"role": "assistant", "content": f"Then {index}."},
                ]
            }
        )
    return json.dumps(
        {
            "messages": [
                {"role": "user", "content": f"What is item {index}? {words}"},
                {"role": "assistant", "content": f"Item {index} is {words}."},
            ]
        }
    )


def main(count: int = 100_000) -> None:
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "synthetic.jsonl"
        path.write_text("\n".join(synthetic_line(i, rng) for i in range(count)) + "\n", encoding="utf-8")
        started = time.perf_counter()
        result = prepare_data([str(path)], AuditSettings(), eval_ratio=0.1, seed=0)
        audited = time.perf_counter() - started
        write_data_outputs(result, Path(tmp) / "out")
        total = time.perf_counter() - started
    report = result.audit
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"machine: {platform.machine()}, {platform.processor() or 'cpu'}, python {platform.python_version()}")
    print(f"records read: {report.records_read}  kept: {len(report.kept)}  dropped: {len(report.dropped)}")
    print(f"findings: {dict((code, sum(c.values())) for code, c in report.counts.items())}")
    print(f"audit + split: {audited:.1f} s ({report.records_read / audited:,.0f} records/s)")
    print(f"with writing outputs: {total:.1f} s")
    print(f"peak RSS: {peak_mb:.0f} MB")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000)
