"""The tar.gz archives a training job leaves in S3 (model.tar.gz, output.tar.gz), read as untrusted input: the pipeline
reads them for figures and publishes the model, and whoever could write where a job leaves them must not be able to
exhaust it with a huge archive, a decompression bomb or a maze of members.

``read_archive`` reads one from S3 within a size cap; ``members`` unpacks its regular files in memory within caps on
their count and their decompressed size, refusing links, devices and names outside the archive. Each refusal is an
ArchiveError naming the object and what is wrong.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import PurePosixPath

from tasks.config import PipelineConfig
from tasks.hooks import s3_hook

MAX_ARCHIVE_BYTES = 512 * 1024 * 1024  # far above any MNIST model or output (a few MB)
MAX_MEMBERS = 1_000
MAX_UNPACKED_BYTES = 1024 * 1024 * 1024


class ArchiveError(ValueError):
    """An archive that is not read; the message names it and why."""


def read_archive(config: PipelineConfig, bucket: str, key: str) -> bytes | None:
    """The body of ``s3://bucket/key`` if it is there (None if not), refused beyond MAX_ARCHIVE_BYTES."""
    from botocore.exceptions import ClientError

    client = s3_hook(config).conn
    try:
        size = client.head_object(Bucket=bucket, Key=key)["ContentLength"]
    except ClientError as error:
        if error.response["ResponseMetadata"]["HTTPStatusCode"] == 404:
            return None
        raise
    if size > MAX_ARCHIVE_BYTES:
        raise ArchiveError(f"s3://{bucket}/{key}: {size} bytes, over the {MAX_ARCHIVE_BYTES} this pipeline reads")
    # Read within the cap also when the object was replaced by a larger one since HEAD.
    body = client.get_object(Bucket=bucket, Key=key)["Body"].read(MAX_ARCHIVE_BYTES + 1)
    if len(body) > MAX_ARCHIVE_BYTES:
        raise ArchiveError(f"s3://{bucket}/{key}: over the {MAX_ARCHIVE_BYTES} bytes this pipeline reads")
    return body


def members(body: bytes, where: str, wanted: set[str] | None = None) -> dict[str, bytes]:
    """The regular files of the tar.gz ``body`` (only those named in ``wanted``, if given) by their normalized
    relative names; ArchiveError naming ``where`` for an archive that cannot be, or may not be, read."""
    found: dict[str, bytes] = {}
    unpacked = 0
    try:
        with tarfile.open(fileobj=io.BytesIO(body), mode="r:gz") as archive:
            for count, member in enumerate(archive, 1):
                if count > MAX_MEMBERS:
                    raise ArchiveError(f"{where}: more than {MAX_MEMBERS} members")
                if member.isdir():
                    continue
                name = PurePosixPath(member.name.lstrip("/"))
                name = PurePosixPath(*[part for part in name.parts if part != "."])
                if not member.isreg() or ".." in name.parts or not name.parts:
                    raise ArchiveError(f"{where}: member {member.name!r} is not a regular file inside the archive")
                unpacked += member.size
                if unpacked > MAX_UNPACKED_BYTES:
                    raise ArchiveError(f"{where}: unpacks to more than {MAX_UNPACKED_BYTES} bytes")
                if str(name) in found:
                    raise ArchiveError(f"{where}: holds {name} twice")
                if wanted is None or str(name) in wanted:
                    found[str(name)] = archive.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as error:
        raise ArchiveError(f"{where}: not a tar.gz archive that can be read ({error})") from None
    return found
