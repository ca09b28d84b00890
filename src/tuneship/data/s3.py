"""S3-compatible buckets (AWS S3, Cloudflare R2, MinIO) as data sources.

Local first: an object already in the local mirror is read from there and the bucket is not
touched. Transient errors are retried with exponential backoff (botocore's "standard" retry mode);
the errors a person can fix (credentials, bucket, key, endpoint) are reported with what to do.
"""

from __future__ import annotations

import os
from pathlib import Path

from tuneship.errors import SourceError
from tuneship.paths import cache_dir

DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def split_uri(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not bucket:
        raise SourceError(f"{uri}: expected s3://BUCKET/KEY or s3://BUCKET/PREFIX/")
    return bucket, key


def local_path(uri: str, settings) -> Path:
    bucket, key = split_uri(uri)
    root = settings.local_dir if settings and settings.local_dir else cache_dir() / "s3"
    return Path(root) / bucket / key


def expand(uri: str, settings) -> list[str]:
    """A key stays itself; a prefix (ending in /) becomes the data files below it."""
    if not uri.endswith("/") and split_uri(uri)[1]:
        return [uri]
    mirror = local_path(uri, settings)
    if mirror.is_dir():
        found = sorted(p for p in mirror.rglob("*") if p.suffix in DATA_SUFFIXES)
        if found:
            bucket, _ = split_uri(uri)
            root = local_path(f"s3://{bucket}/", settings)
            return [f"s3://{bucket}/{p.relative_to(root).as_posix()}" for p in found]
    bucket, prefix = split_uri(uri)
    keys = _call(uri, settings, lambda client: _list_keys(client, bucket, prefix))
    if not keys:
        raise SourceError(f"{uri}: no .jsonl/.json/.csv/.parquet object under this prefix")
    return [f"s3://{bucket}/{key}" for key in keys]


def fetch(uri: str, settings) -> Path:
    """The object's local copy, downloaded once (atomically) into the mirror."""
    target = local_path(uri, settings)
    if target.is_file():
        return target
    bucket, key = split_uri(uri)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    _call(uri, settings, lambda client: client.download_file(bucket, key, str(partial)))
    partial.replace(target)
    return target


def _list_keys(client, bucket: str, prefix: str) -> list[str]:
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys.extend(o["Key"] for o in page.get("Contents", []) if o["Key"].endswith(DATA_SUFFIXES))
    return sorted(keys)


def _client(settings):
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise SourceError("s3:// sources need boto3; pip install 'tuneship[s3]'") from None
    endpoint = (settings.endpoint_url if settings else None) or os.environ.get("AWS_ENDPOINT_URL")
    region = (settings.region if settings else None) or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    attempts = settings.max_attempts if settings else 5
    retry = Config(retries={"max_attempts": attempts, "mode": "standard"}, connect_timeout=10, read_timeout=60)
    session = boto3.session.Session()  # a fresh session: the default one caches credentials process-wide
    return session.client("s3", endpoint_url=endpoint, region_name=region, config=retry)


def _call(uri: str, settings, action):
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    try:
        return action(_client(settings))
    except NoCredentialsError:
        raise SourceError(
            f"{uri}: no S3 credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
        ) from None
    except EndpointConnectionError as exc:
        raise SourceError(
            f"{uri}: cannot reach the S3 endpoint ({exc}); check data.s3.endpoint_url or AWS_ENDPOINT_URL"
        ) from None
    except ClientError as exc:
        raise SourceError(_describe_client_error(uri, exc, settings)) from None


def _bucket_exists(bucket: str, settings) -> bool:
    from botocore.exceptions import ClientError

    try:
        _client(settings).head_bucket(Bucket=bucket)
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
