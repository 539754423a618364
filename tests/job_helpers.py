"""The training jobs of the service tests: a stand-in script, put in S3 as the sourcedir.tar.gz it runs."""

from __future__ import annotations

import io
import tarfile


def put_script(s3, bucket: str, key: str, script: str) -> None:
    """``script`` as `train.py`, the one file of a sourcedir.tar.gz at ``s3://bucket/key``."""
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        body = script.encode()
        info = tarfile.TarInfo("train.py")
        info.size = len(body)
        tar.addfile(info, io.BytesIO(body))
    s3.put_object(Bucket=bucket, Key=key, Body=archive.getvalue())
