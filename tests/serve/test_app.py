"""App behaviour that needs no model: streamed bodies over the limit, starting a cycle, the lease's 409."""

import pytest

from tests.loop.test_store import add_generation


@pytest.fixture
def app(tmp_path):
    from tuneship.loop.registry import open_loop
    from tuneship.serve.app import create_app

    config = tmp_path / "run.yaml"
    config.write_text(f"run: {{name: shop, dir: {tmp_path / 'runs'}}}\nserve: {{max_body_bytes: 2048}}\n")
    return create_app(open_loop(config))


def test_a_chunked_body_over_the_limit_is_413_while_it_streams_in(app):
    from fastapi.testclient import TestClient

    def chunks():
        yield b'{"generation_id": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'", "rating": "up"}'

    with TestClient(app) as client:
        response = client.post("/v1/feedback", content=chunks(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["param"] == "body"
    assert "transfer-encoding" not in {k.lower() for k in response.request.headers if k.lower() == "content-length"}


def test_feedback_works_without_a_model_behind_it(app):
    from fastapi.testclient import TestClient

    add_generation(app.state.loop.store, "gen-1")
    with TestClient(app) as client:
        response = client.post("/v1/feedback", json={"generation_id": "gen-1", "rating": 5})
    assert response.status_code == 201 and app.state.loop.store.feedback_for("gen-1")[0].rating == "5"


def test_starting_a_cycle_runs_it_in_another_process_and_a_running_one_is_409(app, tmp_path):
    from fastapi.testclient import TestClient

    loop = app.state.loop
    with TestClient(app) as client:
        started = client.post("/v1/loop/cycle")
        assert started.status_code == 202 and started.json()["pid"] > 0
        app.state.cycles.processes[-1].wait(timeout=120)
        log = (loop.base_run.parent / "shop-loop" / "cycle.log").read_text()
        assert "has no exported GGUF or adapter" in log  # the cycle ran, in its own process, and said why
        loop.store.acquire_lease("cycle", "elsewhere:1", 60, stage="train")
        busy = client.post("/v1/loop/cycle")
    assert busy.status_code == 409 and "a cycle is already running (train)" in busy.json()["error"]["message"]
