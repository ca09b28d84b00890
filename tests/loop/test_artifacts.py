"""Versions' files in object storage (loop.artifacts_url) against moto's S3 server on loopback: published with
their sha256 in the registry, shared files stored once, fetched into another cache and checked, and a file changed
in the bucket refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.loop_fixtures import fresh_loop_dir, tiny_base_run  # noqa: F401
from tests.serve.test_routing import add_copy_as_version
from tests.servers import s3_endpoint

BUCKET = "versions"


@pytest.fixture
def s3(monkeypatch, tmp_path):
    with s3_endpoint(monkeypatch, tmp_path, [BUCKET]) as server:
        yield server


def artifact_loop(loop_dir, endpoint):
    from tuneship.loop.registry import open_loop

    return open_loop(loop_dir, [f"loop.artifacts_url=s3://{BUCKET}/team/tiny", f"data.s3.endpoint_url={endpoint}"])


def objects(client) -> dict[str, int]:
    listing = client.list_objects_v2(Bucket=BUCKET).get("Contents", [])
    return {o["Key"]: o["Size"] for o in listing}


def test_a_published_version_is_served_from_another_cache_with_its_hashes_checked(
    fresh_loop_dir,  # noqa: F811
    s3,
    tmp_path,
    monkeypatch,
):
    from tuneship.chat.format import ChatFormat
    from tuneship.loop.artifacts import file_sha256, local_version, publish_artifacts

    endpoint, client = s3
    loop = artifact_loop(fresh_loop_dir, endpoint)
    v1 = publish_artifacts(loop, loop.store.champion())

    recorded = loop.store.version(1).artifacts
    assert recorded == v1.artifacts and {"gguf", "chat/chat_format.json"} <= set(recorded)
    assert not any(name.startswith("chat/adapter_model") for name in recorded)  # the weights serve nothing
    assert recorded["gguf"]["sha256"] == file_sha256(v1.gguf)
    assert all(entry["key"].startswith("team/tiny/blobs/") for entry in recorded.values())
    assert objects(client) == {e["key"]: e["size"] for e in recorded.values()}

    monkeypatch.setenv("TUNESHIP_CACHE", str(tmp_path / "replica-cache"))
    here = local_version(loop, loop.store.version(1))
    assert here.gguf.startswith(str(tmp_path / "replica-cache")) and file_sha256(here.gguf) == file_sha256(v1.gguf)
    chat = ChatFormat.load(Path(here.run_dir) / "adapter")
    assert chat.spec == ChatFormat.load(fresh_loop_dir / "adapter").spec


def test_files_two_versions_share_are_stored_once_and_republishing_uploads_nothing(fresh_loop_dir, s3):  # noqa: F811
    from tuneship.loop.artifacts import publish_artifacts

    endpoint, client = s3
    loop = artifact_loop(fresh_loop_dir, endpoint)
    publish_artifacts(loop, loop.store.champion())
    before = objects(client)
    v2 = publish_artifacts(loop, add_copy_as_version(loop))  # a copy of v1: the same GGUF and ChatFormat

    assert v2.artifacts["gguf"]["key"] == loop.store.version(1).artifacts["gguf"]["key"]
    assert objects(client) == before
    assert publish_artifacts(loop, v2).artifacts == v2.artifacts


def test_a_file_changed_in_the_bucket_is_refused_and_nothing_is_cached(fresh_loop_dir, s3, tmp_path, monkeypatch):  # noqa: F811
    from tuneship.loop.artifacts import ArtifactRejected, local_version, publish_artifacts

    endpoint, client = s3
    loop = artifact_loop(fresh_loop_dir, endpoint)
    v1 = publish_artifacts(loop, loop.store.champion())
    key = v1.artifacts["gguf"]["key"]
    body = bytearray(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    body[len(body) // 2] ^= 0x01  # one byte, same size
    client.put_object(Bucket=BUCKET, Key=key, Body=bytes(body))

    cache = tmp_path / "replica-cache"
    monkeypatch.setenv("TUNESHIP_CACHE", str(cache))
    with pytest.raises(ArtifactRejected, match=r"v1: .*sha256 .*the registry recorded .*not served"):
        local_version(loop, loop.store.version(1))
    assert not [p for p in (cache / "artifacts" / "blobs").rglob("*") if p.is_file() and p.suffix == ".gguf"]


def test_a_version_never_published_cannot_be_fetched_and_says_why(fresh_loop_dir, s3):  # noqa: F811
    from tuneship.loop.artifacts import ArtifactRejected, local_version

    loop = artifact_loop(fresh_loop_dir, s3[0])
    with pytest.raises(ArtifactRejected, match="v1 has no files in loop.artifacts_url"):
        local_version(loop, loop.store.champion())
