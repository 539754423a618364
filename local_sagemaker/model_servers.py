"""Model servers: ``python -m inference.serve`` over a model's model.tar.gz, running the artifact's own
``code/inference.py`` as the SageMaker PyTorch container does. Endpoints (local_sagemaker.endpoints) and transform
jobs (local_sagemaker.transform) both serve their models this way: one unpacking and one start for both.

The server is started as a process (through local_sagemaker.processes), never imported: the service knows it only
by its container contract, ``GET /ping`` and ``POST /invocations``.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path

from local_sagemaker import aws, processes
from local_sagemaker.archives import ArchiveError, unpack

HOST = "127.0.0.1"
START_TIMEOUT = 120.0


class LaunchFailed(Exception):
    """A model server could not come up; the message is the FailureReason."""


def model_dir(directory: Path, model_data_url: str, s3) -> Path:
    """``model_data_url`` (a model.tar.gz in S3, read with the model's role's ``s3`` client) unpacked into
    ``directory``, once: a directory unpacked whole before is used as it is. The archive is checked against the
    SHA-256 its key names, if it names one."""
    if (directory / ".complete").is_file():
        return directory
    shutil.rmtree(directory, ignore_errors=True)
    try:
        bucket, key = aws.split_s3_uri(model_data_url)
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    except Exception as error:
        raise LaunchFailed(f"cannot read the model artifact {model_data_url}: {error}") from None
    try:
        if address := aws.content_address(model_data_url):  # its code runs only as the key that names it says
            aws.check_digest(body, address, f"the model artifact {model_data_url}")
        unpack(body, directory, model_data_url)
    except (ArchiveError, ValueError) as error:
        raise LaunchFailed(str(error)) from None
    (directory / ".complete").touch()
    return directory


def start(model: Path, *, name: str, variant: str, workers: int, metrics_interval: float | None,
          environment: Mapping[str, str], aws_environment: Mapping[str, str], log_path: Path,
          stopping: threading.Event) -> tuple[dict, str]:  # fmt: skip
    """Start a server for the model directory ``model`` and wait until it answers /ping; returns its process record
    and URL. ``name`` and ``variant`` are the EndpointName and VariantName it reports (metrics every
    ``metrics_interval`` seconds; None: none); ``environment`` the container's, ``aws_environment`` how it reaches
    AWS as the model's role. LaunchFailed, with the end of its log, if it exits, does not answer in time, or
    ``stopping`` is set first; nothing is left running then."""
    port = processes.free_port(HOST)
    command = [
        sys.executable, "-m", "inference.serve", "--model-dir", str(model), "--host", HOST, "--port", str(port),
        "--endpoint-name", name, "--variant-name", variant, "--workers", str(workers),
    ]  # fmt: skip
    command += ["--no-metrics"] if metrics_interval is None else ["--metrics-interval", str(metrics_interval)]
    # The container's own environment and its role's way to AWS, nothing else (never the service's credentials).
    env = processes.allowed_env({**environment, **aws_environment, "PYTHONUNBUFFERED": "1"})
    process, record = processes.spawn(command, env=env, log_path=log_path)
    url = f"http://{HOST}:{port}"
    deadline = time.monotonic() + START_TIMEOUT
    while not processes.healthy(url):
        if process.poll() is not None or time.monotonic() > deadline or stopping.is_set():
            what = (f"exited with status {process.returncode}" if process.poll() is not None
                    else f"did not answer /ping within {START_TIMEOUT:.0f} s")  # fmt: skip
            processes.stop([record], grace=5)
            raise LaunchFailed(f"The model server of variant {variant} {what}; its log ends:\n"
                               f"{processes.log_tail(log_path, 15)}")  # fmt: skip
        time.sleep(0.1)
    return record, url
