"""A loopback HTTP server run in a thread, for the test doubles of Ollama and the hub."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from http.server import ThreadingHTTPServer


class _JoinedThreadsServer(ThreadingHTTPServer):
    """server_close() waits for every request thread: none is left answering a late request while later tests
    run (a leftover thread once raced CPython 3.11's AST depth counter in tests/test_dependencies.py)."""

    daemon_threads = False
    block_on_close = True


class LoopbackServer:
    def __init__(self, handler):
        self.server = _JoinedThreadsServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@contextmanager
def s3_endpoint(monkeypatch, tmp_path, buckets=()):
    """moto's S3 server on loopback (a real S3-compatible endpoint), test credentials in the environment (also
    for child processes): yields (endpoint URL, boto3 client) with `buckets` created."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    endpoint = f"http://{host}:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    for bucket in buckets:
        client.create_bucket(Bucket=bucket)
    try:
        yield endpoint, client
    finally:
        server.stop()
