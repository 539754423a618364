"""The AWS services the local SageMaker service uses: S3 for data and artifacts, CloudWatch Logs for job logs,
CloudWatch for alarms, STS for its execution roles. Plain boto3, configured by the standard environment
(``AWS_ENDPOINT_URL`` points them at the local AWS), as SageMaker's own machines would reach the real ones.

``client`` signs with the service's own credential, for what SageMaker does as itself (assuming roles, watching
alarms); a job's data, artifacts and log are reached with its execution role's (local_sagemaker.roles)."""

from __future__ import annotations

import base64
import functools
import hashlib
import os
import re
import threading
from pathlib import PurePosixPath

_lock = threading.Lock()
# A content-addressed key names its content's SHA-256 as one of its parts: `.../code/<sha256>/sourcedir.tar.gz`,
# `.../datasets/mnist/<sha256>/` (the SHA-256 of the dataset's manifest).
_ADDRESS = re.compile(r"(?:^|/)([0-9a-f]{64})(?:/|$)")
MANIFEST = "SHA256SUMS"  # a content-addressed dataset's `sha256sum` listing of its files


@functools.cache
def session():
    """The service's own boto3 session."""
    import boto3

    return boto3.session.Session()


def client(service: str):
    """A client per service, shared by the service's threads (boto3 clients are thread-safe once built)."""
    with _lock:
        return _client(service)


@functools.cache
def _client(service: str):
    from botocore.config import Config

    return session().client(service, config=Config(retries={"max_attempts": 3, "mode": "standard"}))


def endpoint_environment() -> dict[str, str]:
    """Where AWS is for the service's own processes: its endpoint settings and region, never its credentials."""
    names = ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION")
    return {key: value for key, value in os.environ.items() if key in names or key.startswith("AWS_ENDPOINT_URL_")}


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


def put_verified(s3, bucket: str, key: str, body: bytes) -> None:
    """Put ``body`` with the ``s3`` client and its SHA-256 (S3 refuses a body that does not match it, storing
    nothing), and read back the SHA-256 S3 stored: OSError naming the object if it is not the body's."""
    sha256 = base64.b64encode(hashlib.sha256(body).digest()).decode()
    s3.put_object(Bucket=bucket, Key=key, Body=body, ChecksumAlgorithm="SHA256", ChecksumSHA256=sha256)
    stored = s3.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED").get("ChecksumSHA256")
    if stored != sha256:
        raise OSError(f"s3://{bucket}/{key}: stored SHA-256 {stored} is not the body's {sha256}")


def content_address(uri: str) -> str | None:
    """The SHA-256 that ``uri``'s key names (its last 64-hex part), or None for a key that names none."""
    found = _ADDRESS.findall(uri.removeprefix("s3://").partition("/")[2])
    return found[-1] if found else None


def check_digest(body: bytes, expected: str, what: str) -> None:
    """ValueError naming ``what`` unless ``body``'s SHA-256 is ``expected`` (hex)."""
    actual = hashlib.sha256(body).hexdigest()
    if actual != expected:
        raise ValueError(f"{what} does not match the SHA-256 it is known by: expected {expected}, got {actual}")


def read_manifest(body: bytes, what: str) -> dict[str, str]:
    """``sha256sum`` lines → {relative name: hex digest}; ValueError naming ``what`` for a malformed line."""
    listed = {}
    for number, line in enumerate(body.decode("utf-8", "replace").splitlines(), 1):
        if not line.strip():
            continue
        match = re.fullmatch(r"([0-9a-f]{64}) [ *](.+)", line)
        if not match:
            raise ValueError(f"{what}: line {number} is not `<sha256>  <name>`")
        listed[match[2]] = match[1]
    return listed
