"""S3-compatible buckets (AWS S3, Cloudflare R2, MinIO) as data sources.

Objects are mirrored locally (`data.s3.local_dir`) with their ETag and size beside them. When the bucket
answers, every read compares the object's ETag and size with the mirror's and downloads only a changed
object; when the endpoint does not answer (connection refused, timeout), the mirror is used and an
`offline-copy` finding says so in the audit. Transient errors are retried with exponential backoff
(botocore's "standard" retry mode); the errors a person can fix (credentials, bucket, key, endpoint) are
reported with what to do.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tuneship.data.findings import Finding
from tuneship.errors import SourceError
from tuneship.extras import import_extra
from tuneship.paths import cache_dir

DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
MIRROR_META = ".s3meta"  # beside each mirrored object: {"etag", "size"} of the copy


class EndpointUnreachable(SourceError):
    """The endpoint did not connect or did not answer in time."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


class S3Mirror:
    """Reads s3:// sources through the local mirror; `findings` says which ones came from it offline."""

    def __init__(self, settings=None):
        self.settings = settings
        self.findings: list[Finding] = []

    def expand(self, uri: str) -> list[str]:
        """A key stays itself; a prefix (ending in /) becomes the data files below it."""
        bucket, prefix = split_uri(uri)
        if not uri.endswith("/") and prefix:
            return [uri]
        try:
            keys = call_s3(uri, self.settings, lambda client: _list_keys(client, bucket, prefix))
        except EndpointUnreachable as exc:
            keys = self._mirrored_keys(uri)
            if not keys:
                raise
            self._note_offline(uri, exc)
        if not keys:
            raise SourceError(f"{uri}: no .jsonl/.json/.csv/.parquet object under this prefix")
        return [f"s3://{bucket}/{key}" for key in keys]

    def fetch(self, uri: str) -> Path:
        """The object's local copy: downloaded when missing or changed (atomically), the mirror when offline."""
        target = local_path(uri, self.settings)
        bucket, key = split_uri(uri)
        try:
            head = call_s3(uri, self.settings, lambda client: client.head_object(Bucket=bucket, Key=key))
        except EndpointUnreachable as exc:
            if not target.is_file():
                raise
            self._note_offline(uri, exc)
            return target
        remote = {"etag": head["ETag"], "size": head["ContentLength"]}
        if _mirrored_as(target) != remote:
            self._download(uri, target, remote)
        return target

    def _download(self, uri: str, target: Path, remote: dict) -> None:
        bucket, key = split_uri(uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        call_s3(uri, self.settings, lambda client: client.download_file(bucket, key, str(partial)))
        partial.replace(target)  # a change between the HEAD and this download shows as another ETag next time
        target.with_name(target.name + MIRROR_META).write_text(json.dumps(remote), encoding="utf-8")

    def _mirrored_keys(self, uri: str) -> list[str]:
        bucket, _ = split_uri(uri)
        root = local_path(f"s3://{bucket}/", self.settings)
        mirror = local_path(uri, self.settings)
        found = sorted(p for p in mirror.rglob("*") if p.suffix in DATA_SUFFIXES) if mirror.is_dir() else []
        return [p.relative_to(root).as_posix() for p in found]

    def _note_offline(self, uri: str, exc: EndpointUnreachable) -> None:
        self.findings.append(
            Finding(
                "offline-copy",
                "warning",
                uri,
                0,
                f"{exc.reason}; read the local copy in {local_path(uri, self.settings)}, which may be stale",
            )
        )


def split_uri(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not bucket:
        raise SourceError(f"{uri}: expected s3://BUCKET/KEY or s3://BUCKET/PREFIX/")
    return bucket, key


def local_path(uri: str, settings) -> Path:
    bucket, key = split_uri(uri)
    root = settings.local_dir if settings and settings.local_dir else cache_dir() / "s3"
    return Path(root) / bucket / key


def _mirrored_as(target: Path) -> dict | None:
    """The ETag and size the mirror's copy was downloaded with, when the copy is still that size."""
    meta = target.with_name(target.name + MIRROR_META)
    if not (target.is_file() and meta.is_file()):
        return None
    recorded = json.loads(meta.read_text(encoding="utf-8"))
    return recorded if recorded.get("size") == target.stat().st_size else None


def _list_keys(client, bucket: str, prefix: str) -> list[str]:
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys.extend(o["Key"] for o in page.get("Contents", []) if o["Key"].endswith(DATA_SUFFIXES))
    return sorted(keys)


def _endpoint(settings) -> str | None:
    return (settings.endpoint_url if settings else None) or os.environ.get("AWS_ENDPOINT_URL")


def s3_client(settings):
    """A boto3 S3 client for data.s3's endpoint, region, retries and timeouts."""
    boto3 = import_extra("boto3", "s3:// sources")
    from botocore.config import Config

    region = (settings.region if settings else None) or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    attempts = settings.max_attempts if settings else 5
    timeout = settings.timeout if settings else 20.0
    retry = Config(
        retries={"max_attempts": attempts, "mode": "standard"}, connect_timeout=timeout, read_timeout=timeout
    )
    session = boto3.session.Session()  # a fresh session: the default one caches credentials process-wide
    return session.client("s3", endpoint_url=_endpoint(settings), region_name=region, config=retry)


def call_s3(uri: str, settings, action, client=None):
    """`action(client)` against the endpoint of `settings` (data.s3); errors a person can fix become SourceError
    saying what to do, an endpoint that does not answer EndpointUnreachable."""
    import_extra("boto3", "s3:// sources")
    from boto3.exceptions import RetriesExceededError
    from botocore.exceptions import ClientError, ConnectionError, HTTPClientError, NoCredentialsError

    try:
        return action(client or s3_client(settings))
    except NoCredentialsError:
        raise SourceError(
            f"{uri}: no S3 credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
        ) from None
    except (ConnectionError, HTTPClientError, RetriesExceededError) as exc:
        raise _unreachable(uri, settings, getattr(exc, "last_exception", None) or exc) from None
    except ClientError as exc:
        raise SourceError(_describe_client_error(uri, exc, settings)) from None


def _unreachable(uri: str, settings, exc: Exception) -> EndpointUnreachable:
    from botocore.exceptions import ConnectTimeoutError, ReadTimeoutError

    endpoint = _endpoint(settings) or "the default AWS endpoint"
    timeout = settings.timeout if settings else 20.0
    attempts = settings.max_attempts if settings else 5
    if isinstance(exc, (ConnectTimeoutError, ReadTimeoutError)):
        what = f"no answer within {timeout:g} s"
    else:
        what = f"{type(exc).__name__}: {exc}"
    return EndpointUnreachable(
        f"{uri}: cannot reach the S3 endpoint {endpoint} ({what}, {attempts} attempt(s)); check "
        "data.s3.endpoint_url or AWS_ENDPOINT_URL and the network, or raise data.s3.timeout / data.s3.max_attempts",
        f"the S3 endpoint {endpoint} did not answer ({what})",
    )


def _bucket_exists(bucket: str, settings) -> bool:
    from botocore.exceptions import ClientError

    try:
        s3_client(settings).head_bucket(Bucket=bucket)
    except ClientError:
        return False
    return True


def _describe_client_error(uri: str, exc, settings) -> str:
    code = str(exc.response.get("Error", {}).get("Code", ""))
    bucket, key = split_uri(uri)
    if code in ("404", "NotFound") and not _bucket_exists(bucket, settings):
        code = "NoSuchBucket"  # a HEAD on a key cannot tell a missing bucket from a missing key
    if code == "NoSuchBucket":
        return f"{uri}: bucket {bucket!r} does not exist at this endpoint; check the name and data.s3.endpoint_url"
    if code in ("NoSuchKey", "404", "NotFound"):
        return f"{uri}: no object {key!r} in bucket {bucket!r}; check the key (list the bucket to see what is there)"
    if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
        return f"{uri}: the bucket refused these credentials ({code}); check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
    return f"{uri}: S3 error {code}: {exc}"
