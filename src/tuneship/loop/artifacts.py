"""Versions' files in object storage (`loop.artifacts_url`: s3://bucket/prefix on AWS S3, Cloudflare R2, MinIO;
the client settings are the S3 data source's, `data.s3`), for replicas and workers on other machines.

What serving a version needs is published before it can be promoted (`publish_artifacts`): its GGUF (in adapter
format the base model's quantized GGUF, shared by every version), its LoRA GGUF, its ChatFormat (the adapter
folder's tokenizer files, not the weights) and its reports. Each file goes to `<prefix>/blobs/<sha256>/<name>`,
so a file many versions share (the base GGUF) is stored once, and the registry row records each file's key,
sha256 and size (`versions.artifacts`).

A replica brings a version's files into its cache (`local_version`): each file is downloaded once into
`<cache>/artifacts/blobs/<sha256>/<name>` and its sha256 checked before it is kept; a file whose content differs
from the recorded hash is refused (ArtifactRejected), never served. The version it returns names the local copies,
so everything that serves a version (the model pool, the ChatFormat) works on it unchanged.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from tuneship.data.s3 import call_s3, split_uri
from tuneship.errors import TuneshipError
from tuneship.paths import cache_dir

if TYPE_CHECKING:
    from tuneship.loop.registry import Loop
    from tuneship.loop.tables import Version

CHAT_PREFIX = "chat/"  # artifact names of the ChatFormat's files: chat/<file of the adapter folder>
REPORT_PREFIX = "reports/"
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")  # the PyTorch adapter: training's, not serving's


class ArtifactRejected(TuneshipError):
    """A version's file that cannot be served here: missing from the bucket, or its content not what the registry
    recorded."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def served_artifact_files(version: Version) -> dict[str, Path]:
    """Artifact name -> local file: what a replica needs to serve `version` (see the module's docstring)."""
    files = {"gguf": Path(version.gguf)} if version.gguf else {}
    if version.adapter:
        files["adapter"] = Path(version.adapter)
    run_dir = Path(version.run_dir)
    for folder, prefix in ((run_dir / "adapter", CHAT_PREFIX), (run_dir / "reports", REPORT_PREFIX)):
        if folder.is_dir():
            files.update(
                {prefix + f.name: f for f in sorted(folder.iterdir()) if f.is_file() and f.name not in WEIGHTS}
            )
    return files


def publish_artifacts(loop: Loop, version: Version) -> Version:
    """Upload the files serving `version` needs that the bucket lacks, and record each one's key, sha256 and size
    on its registry row. A file already recorded from the same path with the same size is not read again."""
    recorded = dict(version.artifacts or {})
    bucket = Bucket(loop)
    artifacts = {}
    for name, path in served_artifact_files(version).items():
        if not path.is_file():
            raise ArtifactRejected(f"v{version.id}: {path} is missing; it cannot be published to loop.artifacts_url")
        known = recorded.get(name)
        if known and known.get("path") == str(path) and known.get("size") == path.stat().st_size:
            artifacts[name] = known
            continue
        artifacts[name] = _upload(bucket, path)
    if artifacts == recorded:
        return version
    return loop.store.update_version(version.id, artifacts=artifacts)


def _upload(bucket: Bucket, path: Path) -> dict:
    sha256, size = file_sha256(path), path.stat().st_size
    key = bucket.key(sha256, path.name)
    if _remote_size(bucket, key) != size:
        bucket.call(key, lambda client: client.upload_file(str(path), bucket.name, key))
    return {"key": key, "sha256": sha256, "size": size, "path": str(path)}


def _remote_size(bucket: Bucket, key: str) -> int | None:
    """The object's size in the bucket, None when it is not there."""
    from botocore.exceptions import ClientError

    def head(client) -> int | None:
        try:
            return client.head_object(Bucket=bucket.name, Key=key)["ContentLength"]
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    return bucket.call(key, head)


def local_version(loop: Loop, version: Version) -> Version:
    """`version` with its files in this machine's cache (downloaded and checked when missing): a detached copy
    whose gguf, adapter and run_dir name the local copies. ArtifactRejected when a file is not published, missing
    from the bucket or not what the registry recorded."""
    from tuneship.loop.tables import Version

    artifacts = version.artifacts or {}
    if not artifacts:
        raise ArtifactRejected(
            f"v{version.id} has no files in loop.artifacts_url (published by the worker that trained it); "
            "this replica cannot serve it"
        )
    bucket = Bucket(loop)
    local = {name: _fetched(bucket, version, entry) for name, entry in artifacts.items()}
    run_dir = _version_folder(loop, version, local)
    fields = {column.key: getattr(version, column.key) for column in Version.__table__.columns}
    fields.update(
        run_dir=str(run_dir), gguf=str(local["gguf"]), adapter=str(local["adapter"]) if "adapter" in local else None
    )
    return Version(**fields)


def _fetched(bucket: Bucket, version: Version, entry: dict) -> Path:
    """The cached copy of one artifact, downloaded and checked when it is not cached yet."""
    target = cache_dir() / "artifacts" / "blobs" / entry["sha256"] / Path(entry["key"]).name
    if target.is_file():
        return target
    key = entry["key"]
    uri = f"s3://{bucket.name}/{key}"
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    try:
        bucket.call(key, lambda client: client.download_file(bucket.name, key, str(partial)))
    except TuneshipError as exc:
        raise ArtifactRejected(f"v{version.id}: {exc}") from None
    found = file_sha256(partial)
    if found != entry["sha256"]:
        partial.unlink()
        raise ArtifactRejected(
            f"v{version.id}: {uri} has sha256 {found[:12]}..., the registry recorded {entry['sha256'][:12]}... "
            "(changed or corrupted in the bucket); not served"
        )
    partial.replace(target)
    return target


def _version_folder(loop: Loop, version: Version, local: dict[str, Path]) -> Path:
    """<cache>/artifacts/<name>-v<N>/ with adapter/ (the ChatFormat) and reports/: links to the cached files."""
    folder = cache_dir() / "artifacts" / "versions" / f"{loop.name}-v{version.id}"
    for name, path in local.items():
        for prefix, sub in ((CHAT_PREFIX, "adapter"), (REPORT_PREFIX, "reports")):
            if name.startswith(prefix):
                _link(path, folder / sub / name.removeprefix(prefix))
    return folder


def _link(source: Path, target: Path) -> None:
    if target.is_file() and target.stat().st_size == source.stat().st_size:
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    try:
        os.link(source, partial)
    except OSError:  # another file system: a copy
        shutil.copyfile(source, partial)
    partial.replace(target)


class Bucket:
    """loop.artifacts_url's bucket and prefix, through one client for a whole publish or fetch."""

    def __init__(self, loop: Loop) -> None:
        self.name, prefix = split_uri(_url(loop))
        self.prefix = prefix.strip("/")
        self.settings = loop.cfg.data.s3
        self.client = None

    def key(self, sha256: str, name: str) -> str:
        return "/".join(part for part in (self.prefix, "blobs", sha256, name) if part)

    def call(self, key: str, action):
        if self.client is None:
            self.client = call_s3(f"s3://{self.name}/", self.settings, lambda client: client)
        return call_s3(f"s3://{self.name}/{key}", self.settings, action, self.client)


def _url(loop: Loop) -> str:
    url = loop.cfg.loop.artifacts_url
    if not url or not url.startswith("s3://"):
        raise ArtifactRejected(f"loop.artifacts_url={url!r}: expected s3://BUCKET/PREFIX")
    return url
