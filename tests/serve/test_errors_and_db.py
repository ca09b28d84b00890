"""Issue 19, findings 9, 10 and 12, without a model behind the app: a locked database is a JSON 503 with
Retry-After within serve.db_timeout; the Idempotency-Key is bound to the body; every error is the OpenAI error
shape without paths or exception text; a key given with `--set` lands in no command line and no config.yaml."""

from __future__ import annotations

import sqlite3
import time

import pytest

from tests.loop.test_store import add_generation
from tuneship.errors import TuneshipError


@pytest.fixture
def app(tmp_path):
    from tuneship.loop.registry import open_loop
    from tuneship.serve.app import create_app

    config = tmp_path / "run.yaml"
    config.write_text(f"run: {{name: shop, dir: {tmp_path / 'runs'}}}\nserve: {{db_timeout: 1}}\n")
    app = create_app(open_loop(config))
    add_generation(app.state.loop.store, "gen-1")
    return app


@pytest.fixture
def client(app):
    from fastapi.testclient import TestClient

    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def assert_openai_error(response, status: int, hidden: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param"} and error["message"]
    if hidden is not None:
        assert hidden not in response.text
    return error


def test_a_version_id_beyond_the_store_is_422_and_an_unknown_one_404(client):
    error = assert_openai_error(client.post("/v1/versions/100000000000000000000/promote"), 422)
    assert error["param"] == "version_id"
    error = assert_openai_error(client.post("/v1/versions/999/promote"), 404)
    assert error["message"] == "no version 999; see `tuneship loop versions`"


def test_every_error_is_the_openai_shape_without_the_runs_folder(client, tmp_path):
    assert_openai_error(client.get("/v1/no-such-route"), 404)
    assert_openai_error(client.delete("/v1/feedback"), 405)
    error = assert_openai_error(client.get("/runs/no-such-run"), 404, hidden=str(tmp_path))
    assert "no-such-run" in error["message"]


def test_a_promotion_refused_does_not_show_the_version_files(client, app, tmp_path):
    app.state.loop.store.add_version(
        id=2,
        name="shop-v2",
        parent_id=1,
        run_dir=str(tmp_path / "runs" / "shop-v2"),
        gguf=str(tmp_path / "runs" / "shop-v2" / "gone.gguf"),
        status="candidate",
        example_ids=[],
        metrics={},
    )
    error = assert_openai_error(client.post("/v1/versions/2/promote"), 409, hidden=str(tmp_path))
    assert error["message"].startswith("v2 has no GGUF file")


def test_a_tuneship_error_or_a_crash_reaching_the_api_shows_no_detail(app, client, tmp_path):
    def refused():
        raise TuneshipError(f"cannot read {tmp_path}/secret.yaml")

    def crashed():
        raise RuntimeError(f"KeyError in {tmp_path}/module.py")

    app.add_api_route("/v1/refused", refused)
    app.add_api_route("/v1/crashed", crashed)
    response = client.get("/v1/refused")
    error = assert_openai_error(response, 503, hidden=str(tmp_path))
    assert error["type"] == "service_unavailable" and response.headers["Retry-After"].isdigit()
    error = assert_openai_error(client.get("/v1/crashed"), 500, hidden="KeyError")
    assert error["type"] == "server_error" and str(tmp_path) not in error["message"]


def test_a_locked_database_is_a_json_503_with_retry_after_within_db_timeout(app, client, tmp_path):
    database = tmp_path / "runs" / "tuneship.db"
    holder = sqlite3.connect(database, isolation_level=None)  # another process's writer, say a cycle
    holder.execute("BEGIN IMMEDIATE")
    try:
        started = time.monotonic()
        response = client.post("/v1/feedback", json={"generation_id": "gen-1", "rating": "up"})
        waited = time.monotonic() - started
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    error = assert_openai_error(response, 503, hidden=str(tmp_path))
    assert error["type"] == "database_unavailable" and response.headers["Retry-After"].isdigit()
    assert waited < 4, f"answered after {waited:.1f} s; serve.db_timeout is 1 s"
    retried = client.post("/v1/feedback", json={"generation_id": "gen-1", "rating": "up"})
    assert retried.status_code == 201 and app.state.loop.store.feedback_count() == 1


def test_the_same_idempotency_key_with_another_body_is_409_naming_the_key(app, client):
    add_generation(app.state.loop.store, "gen-2")
    first = client.post(
        "/v1/feedback", json={"generation_id": "gen-1", "rating": "up"}, headers={"Idempotency-Key": "k1"}
    )
    again = client.post(
        "/v1/feedback", json={"generation_id": "gen-1", "rating": "up"}, headers={"Idempotency-Key": "k1"}
    )
    assert (first.status_code, again.status_code) == (201, 201) and again.json()["replayed"] is True
    assert again.json()["id"] == first.json()["id"]
    for body in ({"generation_id": "gen-1", "rating": "down"}, {"generation_id": "gen-2", "rating": "up"}):
        error = assert_openai_error(client.post("/v1/feedback", json=body, headers={"Idempotency-Key": "k1"}), 409)
        assert error["param"] == "Idempotency-Key" and "'k1'" in error["message"]
    assert app.state.loop.store.feedback_count() == 1


def test_a_key_given_with_set_lands_in_no_command_line_and_no_config_yaml(tmp_path):
    from tuneship.config import load_config
    from tuneship.run import Run
    from tuneship.serve.app import CycleLauncher

    config = tmp_path / "run.yaml"
    config.write_text(f"run: {{name: shop, dir: {tmp_path / 'runs'}}}\n")
    overrides = ["serve.api_key=sekrit-key-123", "loop.min_examples=2"]
    command = CycleLauncher(str(config), overrides, None).command("api", "by hand")
    assert "sekrit-key-123" not in " ".join(command) and "loop.min_examples=2" in command
    cfg = load_config(config, overrides)
    assert cfg.serve.api_key == "sekrit-key-123"  # the serving process has it ...
    run = Run.create(cfg.model_copy(update={"run": cfg.run.model_copy(update={"name": "shop-v2"})}))
    assert "sekrit-key-123" not in (run.path / "config.yaml").read_text()  # ... a challenger's config.yaml not
