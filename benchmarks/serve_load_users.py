"""The locust users of benchmarks/serve_load.py (run by locust in its own process; not imported otherwise).

ChatUser: chats with the served model (one in four streamed), then rates or corrects the answer with an
Idempotency-Key, and sends that feedback a second time as a client retrying would; a chat refused with 429 waits
its Retry-After before the user goes on, as the openai client's retries do (with TUNESHIP_BENCH_RETRY_AT_ONCE=1
it goes on at once). AdminUser (one): polls
GET /v1/loop/status every second, as the Loop page does. Every response's status is tallied; a 429 without
Retry-After is counted apart. At the end the tallies go to the JSON file named by TUNESHIP_BENCH_OUT.
Environment: TUNESHIP_BENCH_KEY (the admin key), TUNESHIP_BENCH_MODEL, TUNESHIP_BENCH_OUT,
TUNESHIP_BENCH_RETRY_AT_ONCE.
"""

from __future__ import annotations

import json
import os
import random
import time
import uuid
from collections import Counter

from locust import HttpUser, between, constant, events, task

AUTH = {"Authorization": f"Bearer {os.environ.get('TUNESHIP_BENCH_KEY', '')}"}
MODEL = os.environ.get("TUNESHIP_BENCH_MODEL", "tiny")
RETRY_AT_ONCE = os.environ.get("TUNESHIP_BENCH_RETRY_AT_ONCE") == "1"
TALLY: dict = {
    "statuses": Counter(),
    "refused_without_retry_after": 0,
    "status_ms": [],
    "feedback": {},  # feedback id -> generation id, for each accepted (new) feedback
    "replays": 0,
    "replays_not_matching": 0,
}


@events.request.add_listener
def tally(name: str, response_time: float, response=None, exception=None, **_kwargs) -> None:
    status = getattr(response, "status_code", 0) or 0
    TALLY["statuses"][str(status) if status else f"error:{type(exception).__name__}"] += 1
    if status == 429 and "Retry-After" not in response.headers:
        TALLY["refused_without_retry_after"] += 1
    if name == "status" and status == 200:
        TALLY["status_ms"].append(response_time)


@events.quitting.add_listener
def write_tally(**_kwargs) -> None:
    with open(os.environ["TUNESHIP_BENCH_OUT"], "w", encoding="utf-8") as out:
        json.dump(TALLY, out)


class ChatUser(HttpUser):
    wait_time = between(0.2, 1.0)

    @task
    def chat_and_send_feedback(self) -> None:
        question = f"Question number {random.randrange(12)}?"
        generation_id = self.stream(question) if random.random() < 0.25 else self.complete(question)
        if generation_id is None:
            return
        self.send_feedback(generation_id, question)

    def send_feedback(self, generation_id: str, question: str) -> None:
        body: dict = {"generation_id": generation_id, "rating": random.choice(["up", "down"])}
        if random.random() < 0.3:
            body["correction"] = f"The corrected answer to {question}"
        headers = {**AUTH, "Idempotency-Key": uuid.uuid4().hex}
        first = self.client.post("/v1/feedback", json=body, headers=headers, name="feedback")
        if first.status_code != 201:
            return
        TALLY["feedback"][first.json()["id"]] = generation_id
        again = self.client.post("/v1/feedback", json=body, headers=headers, name="feedback (retry)")
        TALLY["replays"] += 1
        if again.status_code >= 300 or again.json().get("id") != first.json()["id"]:
            TALLY["replays_not_matching"] += 1

    def complete(self, question: str) -> str | None:
        body = {"model": MODEL, "messages": [{"role": "user", "content": question}]}
        with self.client.post(
            "/v1/chat/completions", json=body, headers=AUTH, name="chat", catch_response=True
        ) as response:
            if response.status_code == 429:
                response.success()  # a refusal is an answer: tallied apart, not a failure
            generation_id = response.json()["id"] if response.status_code == 200 else None
        self.wait_if_refused(response)
        return generation_id

    def stream(self, question: str) -> str | None:
        body = {"model": MODEL, "messages": [{"role": "user", "content": question}], "stream": True}
        generation_id = None
        with self.client.post(
            "/v1/chat/completions", json=body, headers=AUTH, name="chat (stream)", stream=True, catch_response=True
        ) as response:
            if response.status_code == 429:
                response.success()
            elif response.status_code == 200:
                lines = [line for line in response.iter_lines() if line.startswith(b"data: {")]
                generation_id = json.loads(lines[0][len(b"data: ") :])["id"] if lines else None
        self.wait_if_refused(response)
        return generation_id

    def wait_if_refused(self, response) -> None:
        """A refused chat waits its Retry-After, as the openai client's retries do (unless told to retry at once)."""
        if response.status_code == 429 and not RETRY_AT_ONCE:
            time.sleep(float(response.headers.get("Retry-After", 1)))


class AdminUser(HttpUser):
    fixed_count = 1
    wait_time = constant(1.0)

    @task
    def status(self) -> None:
        self.client.get("/v1/loop/status", headers=AUTH, name="status")
