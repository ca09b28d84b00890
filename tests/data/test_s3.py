"""The bucket source against a real S3-compatible server (moto's standalone server) on loopback."""

import json

import pytest

from tests.conftest import qa
from tuneship.config import S3Section
from tuneship.data.audit import AuditSettings
from tuneship.data.stage import prepare_data
from tuneship.errors import SourceError

boto3 = pytest.importorskip("boto3")


@pytest.fixture
def s3_server(monkeypatch, tmp_path):
    from tests.servers import s3_endpoint

    with s3_endpoint(monkeypatch, tmp_path, ["train-data"]) as (endpoint, client):
        body = "\n".join(json.dumps(qa(f"Q{i}", f"A{i}")) for i in range(3)) + "\n"
        client.put_object(Bucket="train-data", Key="sets/v1/facts.jsonl", Body=body.encode())
        client.put_object(Bucket="train-data", Key="sets/v1/more.jsonl", Body=json.dumps(qa("Q9", "A9")).encode())
        client.put_object(Bucket="train-data", Key="sets/v1/readme.txt", Body=b"not data")
        yield endpoint, client


def settings(endpoint, tmp_path, **extra):
    return S3Section(**{"endpoint_url": endpoint, "local_dir": tmp_path / "mirror", "max_attempts": 2} | extra)


def test_reads_an_object_and_remembers_its_uri(s3_server, tmp_path):
    endpoint, _ = s3_server
    result = prepare_data(
        ["s3://train-data/sets/v1/facts.jsonl"], AuditSettings(), s3_settings=settings(endpoint, tmp_path)
    )
    assert [str(c.source) for c in result.audit.kept] == [f"s3://train-data/sets/v1/facts.jsonl:{i}" for i in (1, 2, 3)]
    assert (tmp_path / "mirror" / "train-data" / "sets" / "v1" / "facts.jsonl").is_file()


def test_prefix_lists_data_files_only(s3_server, tmp_path):
    endpoint, _ = s3_server
    result = prepare_data(["s3://train-data/sets/"], AuditSettings(), s3_settings=settings(endpoint, tmp_path))
    assert result.files == ["s3://train-data/sets/v1/facts.jsonl", "s3://train-data/sets/v1/more.jsonl"]
    assert len(result.audit.kept) == 4


def test_mirror_is_revalidated_and_a_stale_copy_refreshed(s3_server, tmp_path):
    endpoint, client = s3_server
    uri = "s3://train-data/sets/v1/facts.jsonl"
    mirror = tmp_path / "mirror" / "train-data" / "sets" / "v1" / "facts.jsonl"
    prepare_data([uri], AuditSettings(), s3_settings=settings(endpoint, tmp_path))
    first_copy = mirror.stat().st_mtime_ns
    unchanged = prepare_data([uri], AuditSettings(), s3_settings=settings(endpoint, tmp_path))
    assert len(unchanged.audit.kept) == 3 and mirror.stat().st_mtime_ns == first_copy  # same ETag: not downloaded
    client.put_object(Bucket="train-data", Key="sets/v1/facts.jsonl", Body=json.dumps(qa("New", "One")).encode())
    refreshed = prepare_data([uri], AuditSettings(), s3_settings=settings(endpoint, tmp_path))
    assert [c.messages[0].content for c in refreshed.audit.kept] == ["New"]
    client.delete_object(Bucket="train-data", Key="sets/v1/facts.jsonl")
    with pytest.raises(SourceError, match="no object 'sets/v1/facts.jsonl'"):
        prepare_data([uri], AuditSettings(), s3_settings=settings(endpoint, tmp_path))


@pytest.fixture
def silent_endpoint():
    """A socket that accepts connections and never answers."""
    import socket

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"


def test_an_endpoint_that_never_answers_is_a_source_error_naming_it(silent_endpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    s3 = settings(silent_endpoint, tmp_path, timeout=0.5, max_attempts=1)
    for uri in ("s3://train-data/sets/v1/facts.jsonl", "s3://train-data/sets/"):
        with pytest.raises(SourceError) as error:
            prepare_data([uri], AuditSettings(), s3_settings=s3)
        message = str(error.value)
        assert f"cannot reach the S3 endpoint {silent_endpoint}" in message and "no answer within 0.5 s" in message
        assert "data.s3.endpoint_url" in message and "data.s3.timeout" in message


def test_offline_the_mirror_is_used_and_the_audit_says_so(s3_server, silent_endpoint, tmp_path):
    endpoint, _ = s3_server
    online = prepare_data(["s3://train-data/sets/"], AuditSettings(), s3_settings=settings(endpoint, tmp_path))
    offline_settings = settings(silent_endpoint, tmp_path, timeout=0.5, max_attempts=1)
    offline = prepare_data(["s3://train-data/sets/"], AuditSettings(), s3_settings=offline_settings)
    assert offline.files == online.files and len(offline.audit.kept) == 4
    assert {(f.code, f.severity) for f in offline.audit.findings} == {("offline-copy", "warning")}
    assert [f.file for f in offline.audit.findings] == ["s3://train-data/sets/", *online.files]
    assert silent_endpoint in offline.audit.findings[0].message and "local copy" in offline.audit.findings[0].message
    assert offline.audit.counts == {"offline-copy": {"error": 0, "warning": 3}}


@pytest.mark.parametrize(
    "uri,message",
    [
        ("s3://no-such-bucket/x.jsonl", "bucket 'no-such-bucket' does not exist"),
        ("s3://train-data/sets/v1/missing.jsonl", "no object 'sets/v1/missing.jsonl'"),
    ],
)
def test_missing_bucket_and_key_are_actionable(s3_server, tmp_path, uri, message):
    endpoint, _ = s3_server
    with pytest.raises(SourceError, match=message):
        prepare_data([uri], AuditSettings(), s3_settings=settings(endpoint, tmp_path))


def test_missing_credentials_say_what_to_set(s3_server, tmp_path, monkeypatch):
    endpoint, _ = s3_server
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(SourceError, match="set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"):
        prepare_data(["s3://train-data/sets/v1/facts.jsonl"], AuditSettings(), s3_settings=settings(endpoint, tmp_path))


def test_unreachable_endpoint_names_the_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with pytest.raises(SourceError, match="cannot reach the S3 endpoint"):
        prepare_data(["s3://b/k.jsonl"], AuditSettings(), s3_settings=settings("http://127.0.0.1:9", tmp_path))


def test_transient_errors_are_retried_with_backoff(s3_server, tmp_path):
    """A proxy in front of the S3 server answers 503 SlowDown twice; the read still succeeds."""
    import http.client
    from http.server import BaseHTTPRequestHandler
    from urllib.parse import urlparse

    from tests.servers import LoopbackServer

    endpoint, _ = s3_server
    upstream = urlparse(endpoint)
    failures = {"left": 2, "seen": 0}

    class Flaky(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _forward(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
            if failures["left"] > 0:
                failures["left"] -= 1
                failures["seen"] += 1
                error = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
                self.send_response(503)
                self.send_header("Content-Length", str(len(error)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(error)
                return
            connection = http.client.HTTPConnection(upstream.hostname, upstream.port)
            connection.request(self.command, self.path, body, dict(self.headers))
            response = connection.getresponse()
            data = response.read()
            self.send_response(response.status)
            for key, value in response.getheaders():
                if key.lower() not in ("transfer-encoding", "connection"):
                    self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_HEAD = do_PUT = do_POST = _forward

    with LoopbackServer(Flaky) as proxy:
        s3 = S3Section(endpoint_url=proxy.url, local_dir=tmp_path / "mirror", max_attempts=5)
        result = prepare_data(["s3://train-data/sets/v1/facts.jsonl"], AuditSettings(), s3_settings=s3)
    assert failures["seen"] == 2 and len(result.audit.kept) == 3
