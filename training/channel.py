"""The training channel checked by the training script itself, as nothing else checks it on SageMaker.

The pipeline uploads a dataset under the SHA-256 of its manifest (SHA256SUMS, `sha256sum` lines) and names that
digest in the job's hyperparameters (``dataset_sha256``). The script refuses to train unless the channel's manifest
has that digest and lists each file it reads with the digest that file has; nothing else of the channel is read.
Without ``dataset_sha256`` (a run by hand), a manifest that is there is still checked. The pipeline's monitoring
check reads its test files the same way.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path, PurePosixPath

MANIFEST = "SHA256SUMS"
_LINE = re.compile(r"([0-9a-f]{64}) [ *](.+)")


class ChannelError(ValueError):
    """The channel is not the dataset it should be; the message names the file and what is wrong."""


def verify(directory: str | Path, dataset_sha256: str | None, needed: list[str]) -> bool:
    """Check the files ``needed`` of the channel in ``directory`` against its manifest, and the manifest against
    ``dataset_sha256``. True when checked, False when there was no manifest to check and none was asked for."""
    directory = Path(directory)
    manifest = directory / MANIFEST
    if not manifest.is_file():
        if dataset_sha256:
            raise ChannelError(f"{manifest}: missing; the dataset {dataset_sha256} comes with its manifest")
        return False
    body = manifest.read_bytes()
    if dataset_sha256 and (actual := hashlib.sha256(body).hexdigest()) != dataset_sha256:
        raise ChannelError(f"{manifest}: its SHA-256 is {actual}, not the dataset's {dataset_sha256}")
    listed = {}
    for number, line in enumerate(body.decode("utf-8", "replace").splitlines(), 1):
        if not line.strip():
            continue
        match = _LINE.fullmatch(line)
        name = PurePosixPath(match[2]) if match else None
        if not match or name.is_absolute() or ".." in name.parts:
            raise ChannelError(f"{manifest}: line {number} is not `<sha256>  <name>` of a file in the channel")
        listed[str(name)] = match[1]
    unlisted = [name for name in needed if name not in listed]
    if unlisted:
        raise ChannelError(f"{manifest}: lists no {', '.join(unlisted)}")
    for name in needed:
        path = directory / name
        if not path.is_file():
            raise ChannelError(f"{path}: listed in {MANIFEST}, missing from the channel")
        actual = _sha256(path)
        if actual != listed[name]:
            raise ChannelError(f"{path}: its SHA-256 is {actual}, {MANIFEST} says {listed[name]}")
    return True


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
