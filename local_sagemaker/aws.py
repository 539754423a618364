"""The AWS services the local SageMaker service itself uses: S3 for data and artifacts, CloudWatch Logs for job
logs, CloudWatch for alarms. Plain boto3, configured by the standard environment (``AWS_ENDPOINT_URL`` points
them at the local AWS), as SageMaker's own machines would reach the real ones."""

from __future__ import annotations

import base64
import functools
import hashlib
import threading
from pathlib import PurePosixPath

_lock = threading.Lock()


@functools.cache
def _session():
    import boto3

    return boto3.session.Session()


def client(service: str):
    """A client per service, shared by the service's threads (boto3 clients are thread-safe once built)."""
    with _lock:
        return _client(service)


@functools.cache
def _client(service: str):
    from botocore.config import Config

    return _session().client(service, config=Config(retries={"max_attempts": 3, "mode": "standard"}))


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` → (bucket, key); fails naming the URI when it is not one."""
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not uri.startswith("s3://") or not bucket:
        raise ValueError(f"{uri!r} is not an s3://bucket/key URI")
    return bucket, key


def safe_relative(key: str, prefix: str) -> PurePosixPath:
    """The part of ``key`` under ``prefix`` as a relative path that stays inside its directory."""
    relative = PurePosixPath(key[len(prefix) :].lstrip("/") or PurePosixPath(key).name)
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        raise ValueError(f"S3 key {key!r} would be written outside the channel's directory")
    return relative


def put_verified(bucket: str, key: str, body: bytes) -> None:
    """Put ``body`` and read back the SHA-256 S3 stored: a body damaged on the way is removed, never kept."""
    s3 = client("s3")
    sha256 = base64.b64encode(hashlib.sha256(body).digest()).decode()
    s3.put_object(Bucket=bucket, Key=key, Body=body, ChecksumAlgorithm="SHA256", ChecksumSHA256=sha256)
    stored = s3.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED").get("ChecksumSHA256")
    if stored != sha256:
        s3.delete_object(Bucket=bucket, Key=key)
        raise OSError(f"s3://{bucket}/{key}: stored SHA-256 {stored} is not the body's {sha256}; removed")
