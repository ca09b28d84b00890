"""Roles, the pages' sign-in, and the Host/Origin allow-lists (issue 19, findings 1-4), against `tuneship serve`'s
app under a real uvicorn on loopback; the real `openai` client where a client talks."""

from __future__ import annotations

import shutil

import httpx
import pytest
import yaml

from tests.loop.test_store import add_generation
from tests.loop_fixtures import tiny_base_run  # noqa: F401
from tests.serve.conftest import serve_loop

ADMIN_KEY = "admin-key-0123456789abcdef"
CLIENT_KEY = "shop-client-key-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
CLIENT = {"Authorization": f"Bearer {CLIENT_KEY}"}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Question number 3?"}], "max_tokens": 4}
ADMIN_READS = ["/v1/versions", "/v1/loop/events", "/v1/loop/status", "/v1/golden"]
PAGES = ["/", "/runs/tiny", "/runs/tiny/loss.png", "/playground", "/review", "/versions", "/loop"]


@pytest.fixture(scope="module")
def keyed(tiny_base_run, tmp_path_factory):  # noqa: F811
    """(loop, server) over a copy of the tiny run with an admin key and a client keys file naming "shop"."""
    folder = tmp_path_factory.mktemp("keyed")
    target = folder / "runs" / tiny_base_run.name
    shutil.copytree(tiny_base_run, target, ignore=shutil.ignore_patterns("checkpoints"))
    keys_file = folder / "clients.txt"
    keys_file.write_text(f"# the shop's app\nshop:{CLIENT_KEY}\n\n")
    config = yaml.safe_load((target / "config.yaml").read_text())
    config["run"]["dir"] = str(target.parent)
    config["serve"].update(api_key=ADMIN_KEY, client_keys_file=str(keys_file))
    (target / "config.yaml").write_text(yaml.safe_dump(config))
    loop, server = serve_loop(target)
    with server:
        yield loop, server


def bare_app(tmp_path, cycles=None, **serve):
    """The app over a loop with no model behind it (enough for everything but chat)."""
    from tuneship.loop.registry import open_loop
    from tuneship.serve.app import create_app

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"run": {"name": "shop", "dir": str(tmp_path / "runs")}, "serve": serve}))
    return create_app(open_loop(config), cycles=cycles)


class RecordedCycles:
    """A CycleLauncher that only records what it was asked to start."""

    def __init__(self):
        self.started = []

    def start(self, *args, **kwargs):
        self.started.append(args)
        return 4242

    def running(self):
        return False


def sign_in(server, key=ADMIN_KEY, next_page="/versions") -> httpx.Response:
    return httpx.post(server.url + "/signin", data={"key": key, "next": next_page}, follow_redirects=False)


def session_cookies(response: httpx.Response) -> dict:
    return {name: value for name, value in response.cookies.items()}


# finding 1: chat needs a key when a key is set ------------------------------------------------


def test_chat_and_models_without_a_key_are_401_when_a_key_is_set(keyed):
    from openai import AuthenticationError, OpenAI

    _, server = keyed
    refused = httpx.post(server.url + "/v1/chat/completions", json=CHAT)
    assert refused.status_code == 401 and refused.json()["error"]["param"] == "Authorization"
    assert httpx.get(server.url + "/v1/models").status_code == 401
    wrong = OpenAI(base_url=server.url + "/v1", api_key="not-a-key", max_retries=0)
    with pytest.raises(AuthenticationError):
        wrong.chat.completions.create(**CHAT)


# finding 2: reads and pages need the admin key ------------------------------------------------


@pytest.mark.parametrize("path", ADMIN_READS)
def test_reads_need_the_admin_key(keyed, path):
    _, server = keyed
    anonymous = httpx.get(server.url + path)
    assert anonymous.status_code == 401 and anonymous.json()["error"]["type"] == "authentication_error"
    assert httpx.get(server.url + path, headers=CLIENT).status_code == 403
    assert httpx.get(server.url + path, headers=ADMIN).status_code == 200


def test_pages_send_a_stranger_to_sign_in_and_show_nothing_before(keyed):
    loop, server = keyed
    add_generation(loop.store, "gen-secret")  # its prompt and answer are what a page must not show
    secret = loop.store.generation("gen-secret")
    for page in PAGES:
        for headers in ({}, CLIENT):
            response = httpx.get(server.url + page, headers=headers, follow_redirects=False)
            assert response.status_code == 303, page
            assert response.headers["location"].startswith("/signin?next=/"), page
            body = response.text
            assert str(loop.base_run) not in body and secret.answer not in body and "tiny" not in body, page
    form = httpx.get(server.url + "/signin?next=/review")
    assert form.status_code == 200 and 'name="key"' in form.text and str(loop.base_run.parent) not in form.text


# finding 3: a client key chats and sends feedback, and nothing else ---------------------------


def test_a_client_key_chats_and_sends_feedback_with_its_name_and_is_403_on_admin_endpoints(keyed):
    from openai import OpenAI, PermissionDeniedError

    loop, server = keyed
    client = OpenAI(base_url=server.url + "/v1", api_key=CLIENT_KEY, max_retries=0)
    assert [m.id for m in client.models.list()] == ["tiny"]
    reply = client.chat.completions.create(**CHAT)
    assert loop.store.generation(reply.id) is not None
    feedback = client.post("/feedback", body={"generation_id": reply.id, "rating": "down"}, cast_to=object)
    assert feedback["generation_id"] == reply.id
    [row] = loop.store.feedback_for(reply.id)
    assert row.client == "shop"
    with pytest.raises(PermissionDeniedError):
        client.post("/rollback", body=None, cast_to=object)
    for path in ("/v1/versions/1/promote", "/v1/rollback", "/v1/loop/cycle", "/v1/golden"):
        refused = httpx.post(server.url + path, headers=CLIENT, json={"question": "Q?", "answer": "A."})
        assert refused.status_code == 403 and "admin key" in refused.json()["error"]["message"], path
    review = httpx.post(
        server.url + "/v1/review", headers=CLIENT, json={"generation_ids": [reply.id], "action": "approve"}
    )
    assert review.status_code == 403 and review.json()["error"]["type"] == "permission_error"
    assert loop.store.champion().id == 1


def test_the_admin_key_is_admin_in_the_feedback_rows(keyed):
    loop, server = keyed
    chat = httpx.post(server.url + "/v1/chat/completions", json=CHAT, headers=ADMIN, timeout=60)
    assert chat.status_code == 200
    sent = httpx.post(
        server.url + "/v1/feedback", json={"generation_id": chat.json()["id"], "rating": "up"}, headers=ADMIN
    )
    assert sent.status_code == 201 and loop.store.feedback_for(chat.json()["id"])[0].client == "admin"


# the pages' sign-in ----------------------------------------------------------------------------


def test_sign_in_sets_an_http_only_strict_session_cookie_that_opens_the_pages(keyed):
    loop, server = keyed
    assert sign_in(server, "wrong").status_code == 401
    assert sign_in(server, CLIENT_KEY).status_code == 401  # a client key does not open the pages
    signed = sign_in(server, next_page="/versions")
    assert signed.status_code == 303 and signed.headers["location"] == "/versions"
    cookie = signed.headers["set-cookie"]
    attributes = {part.strip().split("=")[0].lower(): part.strip() for part in cookie.split(";")}
    assert "httponly" in attributes and attributes["samesite"].lower() == "samesite=strict"
    assert attributes["path"] == "Path=/" and int(attributes["max-age"].split("=")[1]) > 0
    cookies = session_cookies(signed)
    for page in PAGES:
        assert httpx.get(server.url + page, cookies=cookies, follow_redirects=False).status_code == 200, page
    assert httpx.get(server.url + "/v1/loop/status", cookies=cookies).status_code == 200
    assert sign_in(server, next_page="//evil.example/").headers["location"] == "/"  # never sent off the server


def test_a_change_made_with_the_cookie_needs_the_servers_own_origin(keyed):
    loop, server = keyed
    cookies = session_cookies(sign_in(server))
    without_origin = httpx.post(server.url + "/v1/rollback", cookies=cookies)
    assert without_origin.status_code == 403 and without_origin.json()["error"]["param"] == "Origin"
    own = httpx.post(server.url + "/v1/rollback", cookies=cookies, headers={"Origin": server.url})
    assert own.status_code == 409 and "nothing to roll back" in own.json()["error"]["message"]
    signed_out = httpx.post(server.url + "/signout", cookies=cookies, follow_redirects=False)
    assert signed_out.status_code == 303
    assert httpx.get(server.url + "/v1/loop/status", cookies=cookies).status_code == 401
    assert httpx.get(server.url + "/versions", cookies=cookies, follow_redirects=False).status_code == 303


# finding 4: Host and Origin allow-lists ------------------------------------------------------


def test_a_foreign_host_is_refused_before_any_handler(keyed):
    _, server = keyed
    cookies = session_cookies(sign_in(server))
    for path in ("/v1/models", "/review", "/v1/loop/status"):
        refused = httpx.get(server.url + path, headers={**ADMIN, "Host": "evil.example"}, cookies=cookies)
        assert refused.status_code == 421, path
        error = refused.json()["error"]
        assert error["param"] == "Host" and "serve.allowed_hosts" in error["message"]
    port = server.url.rsplit(":", 1)[1]
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "localhost"):
        assert httpx.get(server.url + "/v1/models", headers={**ADMIN, "Host": host}).status_code == 200, host


def test_a_post_from_a_foreign_origin_is_refused_even_without_keys(tmp_path):
    from tests.serve.conftest import LiveServer

    cycles = RecordedCycles()
    with LiveServer(bare_app(tmp_path, cycles)) as server:
        for path in ("/v1/loop/cycle", "/v1/rollback", "/v1/versions/1/promote"):
            refused = httpx.post(server.url + path, headers={"Origin": "https://evil.example"})
            assert refused.status_code == 403 and refused.json()["error"]["param"] == "Origin", path
        assert cycles.started == []
        rebinding = httpx.get(server.url + "/review", headers={"Host": "evil.example"})
        assert rebinding.status_code == 421 and "Review" not in rebinding.text
        own = httpx.post(server.url + "/v1/loop/cycle", headers={"Origin": server.url})
        assert own.status_code == 202 and len(cycles.started) == 1
        local_app = httpx.post(server.url + "/v1/loop/cycle", headers={"Origin": "http://localhost:3000"})
        assert local_app.status_code == 202  # a loopback origin is allowed by default, as Ollama does
        assert httpx.get(server.url + "/loop").status_code == 200  # no key on loopback: the pages as before


def test_allowed_hosts_and_origins_come_from_the_config(tmp_path):
    from fastapi.testclient import TestClient

    app = bare_app(tmp_path, allowed_hosts=["tuneship.example:8443"], allowed_origins=["https://app.example"])
    with TestClient(app, base_url="http://127.0.0.1:8000") as client:
        assert client.get("/v1/models").status_code == 200  # the address it was sent to
        assert client.get("/v1/models", headers={"Host": "localhost"}).status_code == 421  # replaced by the list
        assert client.get("/v1/models", headers={"Host": "tuneship.example:8443"}).status_code == 200
        assert client.get("/v1/models", headers={"Host": "tuneship.example:9000"}).status_code == 421
        assert client.get("/v1/models", headers={"Origin": "https://app.example"}).status_code == 200
        assert client.get("/v1/models", headers={"Origin": "http://app.example"}).status_code == 403


@pytest.mark.parametrize(
    "host, allowed, own, expected",
    [
        ("localhost:8000", ["localhost"], None, True),
        ("LOCALHOST", ["localhost"], None, True),
        ("[::1]:8000", ["[::1]"], None, True),
        ("[::1]:8000", [], "::1", True),
        ("10.0.0.5:8000", [], "10.0.0.5", True),
        ("evil.example", ["localhost", "127.0.0.1"], "127.0.0.1", False),
        ("localhost.evil.example", ["localhost"], None, False),
        ("a.example:81", ["a.example:80"], None, False),
        ("anything", ["*"], None, True),
    ],
)
def test_host_matching(host, allowed, own, expected):
    from tuneship.serve.guard import host_allowed

    assert host_allowed(host, allowed, own) is expected


@pytest.mark.parametrize(
    "origin, host, allowed, expected",
    [
        ("http://127.0.0.1:8000", "127.0.0.1:8000", [], True),
        ("http://localhost:3000", "127.0.0.1:8000", ["http://localhost"], True),
        ("https://localhost:3000", "127.0.0.1:8000", ["http://localhost"], False),
        ("http://localhost:3000", "127.0.0.1:8000", ["http://localhost:4000"], False),
        ("https://evil.example", "127.0.0.1:8000", ["http://localhost", "http://127.0.0.1"], False),
        ("http://127.0.0.1.evil.example", "127.0.0.1:8000", ["http://127.0.0.1"], False),
        ("null", "127.0.0.1:8000", ["http://localhost"], False),
        ("https://app.example", "127.0.0.1:8000", ["*"], True),
    ],
)
def test_origin_matching(origin, host, allowed, expected):
    from tuneship.serve.guard import origin_allowed

    assert origin_allowed(origin, host, allowed) is expected


# the client keys file --------------------------------------------------------------------------


def test_a_client_keys_file_with_a_bad_line_fails_naming_file_and_line(tmp_path):
    from tuneship.serve.auth import ClientKeysError

    keys = tmp_path / "clients.txt"
    keys.write_text(f"# apps\nshop:{CLIENT_KEY}\nwebsite-no-colon-{CLIENT_KEY}\n")
    with pytest.raises(ClientKeysError) as error:
        bare_app(tmp_path, api_key=ADMIN_KEY, client_keys_file=str(keys))
    assert f"{keys}:3: no `:`" in str(error.value) and CLIENT_KEY not in str(error.value)
    keys.write_text("shop:short\n")
    with pytest.raises(ClientKeysError, match=r"clients.txt:1: the key of 'shop' must be at least 16"):
        bare_app(tmp_path, api_key=ADMIN_KEY, client_keys_file=str(keys))
    keys.write_text(f"admin:{CLIENT_KEY}\n")
    with pytest.raises(ClientKeysError, match=r"clients.txt:1: the client name"):
        bare_app(tmp_path, api_key=ADMIN_KEY, client_keys_file=str(keys))
    keys.write_text(f"shop:{CLIENT_KEY}\n")
    with pytest.raises(ClientKeysError, match="no admin key is set"):
        bare_app(tmp_path, client_keys_file=str(keys))
    with pytest.raises(ClientKeysError, match="cannot be read"):
        bare_app(tmp_path, api_key=ADMIN_KEY, client_keys_file=str(tmp_path / "missing.txt"))


def test_the_serve_command_prints_a_bad_keys_file_without_a_traceback(cli, tmp_path, monkeypatch):
    monkeypatch.delenv("TUNESHIP_API_KEY", raising=False)
    keys = tmp_path / "clients.txt"
    keys.write_text(f"shop {CLIENT_KEY}\n")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"run": {"name": "shop", "dir": str(tmp_path / "runs")}}))
    options = ["--set", f"serve.api_key={ADMIN_KEY}", "--set", f"serve.client_keys_file={keys}"]
    result = cli("serve", config, "--port", "1", *options)
    assert result.code == 2 and f"{keys}:1: no `:`" in " ".join(result.err.split()) and "Traceback" not in result.err


def test_a_key_given_with_set_reaches_the_cycle_through_its_environment_only(tmp_path, monkeypatch):
    import subprocess

    from tuneship.serve.app import CycleLauncher

    launched = {}

    class Process:
        def __init__(self, command, **kwargs):
            launched.update(command=command, env=kwargs["env"])

        def poll(self):
            return None

        pid = 1

    monkeypatch.setattr(subprocess, "Popen", Process)
    launcher = CycleLauncher("runs/tiny", [f"serve.api_key={ADMIN_KEY}", "loop.min_examples=3"], "http://127.0.0.1:1")
    launcher.start("api", "test", tmp_path)
    assert ADMIN_KEY not in " ".join(launched["command"]) and "loop.min_examples=3" in launched["command"]
    assert launched["env"]["TUNESHIP_API_KEY"] == ADMIN_KEY


def test_a_client_beyond_its_feedback_per_minute_gets_429_with_retry_after_and_the_admin_does_not(keyed):
    from tuneship.serve.ratelimit import PerClientLimit

    loop, server = keyed
    app = server.server.config.app
    add_generation(loop.store, "gen-limited")
    app.state.feedback_limit, before = PerClientLimit(2), app.state.feedback_limit
    body = {"generation_id": "gen-limited", "rating": "up"}
    try:
        sent = [httpx.post(server.url + "/v1/feedback", json=body, headers=CLIENT) for _ in range(3)]
        admin = [httpx.post(server.url + "/v1/feedback", json=body, headers=ADMIN).status_code for _ in range(3)]
    finally:
        app.state.feedback_limit = before
    assert [r.status_code for r in sent] == [201, 201, 429] and 1 <= int(sent[2].headers["Retry-After"]) <= 60
    error = sent[2].json()["error"]
    assert error["type"] == "rate_limit_exceeded" and "serve.feedback_per_minute=2" in error["message"]
    assert admin == [201, 201, 201]
    clients = [f.client for f in loop.store.feedback_for("gen-limited")]
    assert clients.count("shop") == 2 and clients.count("admin") == 3
