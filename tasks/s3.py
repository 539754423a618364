"""Objects the pipeline stores in S3 and later trusts: put and verified by their checksums, addressed by content.

A content-addressed key names its body's SHA-256 (`<s3_root>/<kind>/<sha256>/<file>`): whoever uses the object
checks the body against the key before running or trusting it, so a planted or damaged object is refused by name.
The pipeline's training code, datasets and models are stored this way, each written once (`If-None-Match: *`, as
the bucket's policy demands there) and never deleted or replaced.

Airflow hooks are imported inside the functions: DAG files import modules that import this one.
"""

from __future__ import annotations

import base64
import hashlib
import logging

from tasks.config import PipelineConfig
from tasks.hooks import s3_hook

log = logging.getLogger(__name__)


class UploadError(RuntimeError):
    """An object could not be stored in S3 intact; the message names the bucket or object."""


class ContentAddressError(UploadError):
    """A content-addressed key holds another body than the one it names; the message names the object."""


def stored_difference(client, bucket: str, key: str, body: bytes) -> str | None:
    """None when the object holds exactly ``body``, judged from the checksums S3 stored; else what differs."""
    from botocore.exceptions import ClientError

    try:
        head = client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    except ClientError as exc:
        if exc.response["ResponseMetadata"]["HTTPStatusCode"] == 404:
            return "missing"
        raise
    sha256 = base64.b64encode(hashlib.sha256(body).digest()).decode()
    md5 = hashlib.md5(body).hexdigest()
    etag = head["ETag"].strip('"')
    # S3 computes the ETag itself: the MD5 of the body for a single PUT unless encrypted with KMS or a customer key.
    etag_is_md5 = head.get("ServerSideEncryption", "AES256") == "AES256" and "SSECustomerAlgorithm" not in head
    if head["ContentLength"] != len(body):
        return f"{head['ContentLength']} bytes stored, {len(body)} sent"
    if head.get("ChecksumSHA256") != sha256:
        return f"stored SHA-256 {head.get('ChecksumSHA256')}, expected {sha256}"
    if etag_is_md5 and etag != md5:
        return f"stored MD5 (ETag) {etag}, expected {md5}"
    return None


def checksums(body: bytes) -> dict[str, str]:
    """PutObject's arguments that make S3 check ``body`` on the way in: its MD5 and SHA-256."""
    return {
        "ContentMD5": base64.b64encode(hashlib.md5(body).digest()).decode(),
        "ChecksumAlgorithm": "SHA256",
        "ChecksumSHA256": base64.b64encode(hashlib.sha256(body).digest()).decode(),
    }


def put_verified(client, bucket: str, key: str, body: bytes) -> None:
    """Put ``body`` with its MD5 and SHA-256 (S3 refuses a body that does not match them, storing nothing), then
    read the stored checksums back: UploadError naming the object if they are not the body's (the pipeline may not
    delete, so a damaged object is left for whoever may look into it)."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        client.put_object(Bucket=bucket, Key=key, Body=body, **checksums(body))
    except (ClientError, BotoCoreError) as exc:  # a broken connection; or S3 refusing a mismatched body (BadDigest)
        raise UploadError(f"s3://{bucket}/{key}: upload failed: {exc}") from exc
    difference = stored_difference(client, bucket, key, body)
    if difference:
        raise UploadError(f"s3://{bucket}/{key}: stored other than sent ({difference})")


def put_content_addressed(config: PipelineConfig, kind: str, filename: str, body: bytes) -> str:
    """Store ``body`` at ``<s3_root>/<kind>/<sha256>/<filename>`` unless it is there intact; return its S3 URI.

    Whatever else sits at that address is an error naming it (ContentAddressError): it is never used, nor replaced.
    """
    digest = hashlib.sha256(body).hexdigest()
    key = f"{config.prefix.strip('/')}/{kind}/{digest}/{filename}"
    uri = f"s3://{config.bucket}/{key}"
    if put_once(s3_hook(config).conn, config.bucket, key, body):
        log.info("Stored %s (%d bytes)", uri, len(body))
    else:
        log.info("%s is already in S3, intact", uri)
    return uri


def put_once(client, bucket: str, key: str, body: bytes) -> bool:
    """Write ``body`` at ``key`` unless an object is there (``If-None-Match: *``, which the bucket's policy demands
    under the content-addressed prefixes), with its MD5 and SHA-256 (S3 refuses a body that does not match them).
    True when written, False when the very same body was there already; ContentAddressError naming the object
    when something else is: content-addressed objects are written once, never deleted nor replaced."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        client.put_object(Bucket=bucket, Key=key, Body=body, IfNoneMatch="*", **checksums(body))
        written = True
    except ClientError as exc:
        # 412: an object is there already; 409: another writer's conditional put of it is under way.
        if exc.response["ResponseMetadata"]["HTTPStatusCode"] not in (409, 412):
            raise UploadError(f"s3://{bucket}/{key}: upload failed: {exc}") from exc
        written = False
    except BotoCoreError as exc:  # a broken connection
        raise UploadError(f"s3://{bucket}/{key}: upload failed: {exc}") from exc
    difference = stored_difference(client, bucket, key, body)
    if difference is not None:
        raise ContentAddressError(
            f"s3://{bucket}/{key} does not hold the body its address names ({difference}): it is left as it is, "
            "neither used nor replaced; remove it by hand once you know how it came there"
        )
    return written


def read_object(config: PipelineConfig, uri: str) -> bytes:
    """The body of ``s3://bucket/key``."""
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    bucket, key = S3Hook.parse_s3_url(uri)
    return s3_hook(config).conn.get_object(Bucket=bucket, Key=key)["Body"].read()
