"""The tar.gz archives SageMaker moves: sourcedir.tar.gz and model.tar.gz unpacked, model and output directories
packed. One unpacker for both, since both come from S3 and both end up running code."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path


class ArchiveError(ValueError):
    """The archive cannot be unpacked safely; the message names it."""


def unpack(body: bytes, target: Path, what: str) -> None:
    """Unpack a tar.gz: regular files and directories only, every one inside ``target``."""
    target.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(fileobj=io.BytesIO(body), mode="r:gz") as archive:
            for member in archive.getmembers():
                if not (member.isfile() or member.isdir()):
                    raise ArchiveError(f"{what} holds {member.name!r}, which is not a regular file: refused")
            archive.extractall(target, filter="data")  # refuses absolute paths and `..`
    except (tarfile.TarError, OSError, EOFError) as error:
        raise ArchiveError(f"{what} is not a readable tar.gz archive: {error}") from None


def pack(directory: Path) -> bytes:
    """A tar.gz of ``directory``, entries relative to it, as SageMaker packs /opt/ml/model."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for path in sorted(directory.rglob("*")):
            archive.add(path, arcname=path.relative_to(directory).as_posix(), recursive=False)
    return buffer.getvalue()
