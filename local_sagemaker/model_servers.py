"""Model servers: ``python -m inference.serve`` over a model's model.tar.gz, running the artifact's own
``code/inference.py`` as the SageMaker PyTorch container does. Endpoints (local_sagemaker.endpoints) and transform
jobs (local_sagemaker.transform) both serve their models this way: one unpacking and one start for both.

The server is started as a process (through local_sagemaker.processes), never imported: the service knows it only
by its container contract, ``GET /ping`` and ``POST /invocations``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from local_sagemaker import aws, processes, store
from local_sagemaker.archives import ArchiveError, unpack

HOST = "127.0.0.1"
# A model server's own start (the service's start, launch.SERVICE_START_TIMEOUT, waits for the whole service).
MODEL_SERVER_START_TIMEOUT = 120.0


class LaunchFailed(Exception):
    """A model server could not come up; the message is the FailureReason."""


def model_dir(root: Path, model_data_url: str, s3) -> Path:
    """``model_data_url`` (a model.tar.gz in S3, read with the model's role's ``s3`` client) unpacked into
    ``root/<SHA-256 of the archive>``. The directory is named by the bytes it was unpacked from, never by the config or
    model that asked for them: the same archive is unpacked once, and another one (a config or model deleted and made
    again under its old name) can never be served from a directory unpacked before. The archive is checked against
    the SHA-256 its key names, if it names one."""
    try:
        bucket, key = aws.split_s3_uri(model_data_url)
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    except Exception as error:
        raise LaunchFailed(f"cannot read the model artifact {model_data_url}: {error}") from None
    try:
        if address := aws.content_address(model_data_url):  # its code runs only as the key that names it says
            aws.check_digest(body, address, f"the model artifact {model_data_url}")
        directory = root / (address or hashlib.sha256(body).hexdigest())
        if not directory.is_dir():
            _unpack_whole(body, directory, model_data_url)
    except (ArchiveError, ValueError) as error:
        raise LaunchFailed(str(error)) from None
    return directory


def _unpack_whole(body: bytes, directory: Path, what: str) -> None:
    """Unpack into a directory of its own beside ``directory``, synced, then renamed into place: a crash (or a power
    cut) mid-unpack leaves no half directory under the name a later start would serve, only one ``prune`` removes."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.", suffix=".unpacking"))
    try:
        unpack(body, staging, what)
        for path in sorted(staging.rglob("*"), reverse=True):  # files before the directories that name them
            if path.is_file():
                with path.open("rb") as file:
                    os.fsync(file.fileno())
            else:
                store.fsync_directory(path)
        store.fsync_directory(staging)
        try:
            os.rename(staging, directory)
        except OSError:
            if not directory.is_dir():
                raise
            # Another thread unpacked the same bytes first: theirs is as good as this one.
        store.fsync_directory(directory.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def prune(root: Path, keep: Iterable[Path]) -> None:
    """Remove everything under ``root`` but the model directories ``keep`` (and the directories that hold them): what
    no server uses any more, and what an unpack a crash cut short left behind."""
    kept = {Path(path).resolve() for path in keep}

    def walk(directory: Path) -> None:
        for entry in directory.iterdir():
            path = entry.resolve()
            if path in kept:
                continue
            if entry.is_dir() and not entry.is_symlink() and any(k.is_relative_to(path) for k in kept):
                walk(entry)
            elif entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)

    if root.is_dir():
        walk(root)


def start(
    model: Path,
    *,
    name: str,
    variant: str,
    workers: int,
    metrics_interval: float | None,
    environment: Mapping[str, str],
    aws_environment: Mapping[str, str],
    log_path: Path,
    stopping: threading.Event,
) -> tuple[dict, str]:
    """Start a server for the model directory ``model`` and wait until it answers /ping; returns its process record
    and URL. ``name`` and ``variant`` are the EndpointName and VariantName it reports (metrics every
    ``metrics_interval`` seconds; None: none); ``environment`` the container's, ``aws_environment`` how it reaches
    AWS as the model's role. LaunchFailed, with the end of its log, if it exits, does not answer in time, or
    ``stopping`` is set first; nothing is left running then."""
    port = processes.free_port(HOST)
    command = [
        sys.executable,
        "-m",
        "inference.serve",
        "--model-dir",
        str(model),
        "--host",
        HOST,
        "--port",
        str(port),
        "--endpoint-name",
        name,
        "--variant-name",
        variant,
        "--workers",
        str(workers),
    ]
    command += ["--no-metrics"] if metrics_interval is None else ["--metrics-interval", str(metrics_interval)]
    # The container's own environment and its role's way to AWS, nothing else (never the service's credentials).
    env = processes.allowed_env({**environment, **aws_environment, "PYTHONUNBUFFERED": "1"})
    process, record = processes.spawn(command, env=env, log_path=log_path)
    url = f"http://{HOST}:{port}"
    deadline = time.monotonic() + MODEL_SERVER_START_TIMEOUT
    while not processes.healthy(url):
        if process.poll() is not None or time.monotonic() > deadline or stopping.is_set():
            what = (
                f"exited with status {process.returncode}"
                if process.poll() is not None
                else f"did not answer /ping within {MODEL_SERVER_START_TIMEOUT:.0f} s"
            )
            processes.stop([record], grace=processes.IDLE_STOP_GRACE_SECONDS)
            raise LaunchFailed(
                f"The model server of variant {variant} {what}; its log ends:\n{processes.log_tail(log_path, 15)}"
            )
        time.sleep(0.1)
    return record, url
