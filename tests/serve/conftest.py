"""`tuneship serve`'s app under a real uvicorn on loopback, over the tiny exported run."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from tests.loop_fixtures import fresh_loop_dir, tiny_base_run  # noqa: F401


class LiveServer:
    """uvicorn in a thread on a free loopback port, with `tuneship serve`'s settings."""

    def __init__(self, app):
        import uvicorn

        from tuneship.serve.cli import server_config

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.server = uvicorn.Server(server_config(app, "127.0.0.1", self.port))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)


def serve_loop(loop_dir, overrides=()):
    from tuneship.loop.registry import open_loop
    from tuneship.serve.app import create_app

    loop = open_loop(loop_dir, list(overrides))
    return loop, LiveServer(create_app(loop))


@pytest.fixture(scope="module")
def served(tiny_base_run, tmp_path_factory):  # noqa: F811
    """(loop, server) over a module-wide copy of the tiny run, with an API key."""
    import shutil

    import yaml

    target = tmp_path_factory.mktemp("served") / "runs" / tiny_base_run.name
    shutil.copytree(tiny_base_run, target, ignore=shutil.ignore_patterns("checkpoints"))
    config = yaml.safe_load((target / "config.yaml").read_text())
    config["run"]["dir"] = str(target.parent)
    config["serve"].update(api_key="s3cret", max_body_bytes=8192)
    (target / "config.yaml").write_text(yaml.safe_dump(config))
    loop, server = serve_loop(target)
    with server:
        yield loop, server


@pytest.fixture
def client(served):
    from openai import OpenAI

    return OpenAI(base_url=served[1].url + "/v1", api_key="s3cret", max_retries=0)
