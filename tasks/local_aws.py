"""The local AWS: moto in server mode on loopback, reached like AWS through the connection's `endpoint_url`.

S3, CloudWatch and CloudWatch Logs are real HTTP services here; the code that talks to them is the code that
talks to AWS. Used by the local stack (`mnist-pipeline up`) and by the tests.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

# moto accepts any credentials; these make boto3 sign requests without looking for real ones.
LOCAL_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "local", "AWS_SECRET_ACCESS_KEY": "local"}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, timeout: float = 30.0, process: subprocess.Popen | None = None) -> None:
    """Poll ``url`` until it answers (any HTTP status), the process dies, or the timeout passes."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            if process is not None and process.poll() is not None:
                raise RuntimeError(
                    f"process {process.args!r} exited with {process.returncode} before {url} answered"
                ) from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not answer within {timeout:.0f} s") from None
            time.sleep(0.1)


def start_moto_server(
    host: str = "127.0.0.1", port: int | None = None, log_path: Path | None = None
) -> tuple[subprocess.Popen, str]:
    """Start moto server in its own process (session) and return it with its endpoint URL once it answers."""
    port = port or free_port(host)
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115 - handed to the child
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    endpoint_url = f"http://{host}:{port}"
    try:
        wait_for_http(f"{endpoint_url}/moto-api/", process=process)
    except Exception:
        process.kill()
        raise
    return process, endpoint_url


def connection_uri(endpoint_url: str, region: str = "us-east-1") -> str:
    """An Airflow AWS connection (JSON form, for AIRFLOW_CONN_<ID>) pointing at a local endpoint."""
    return json.dumps(
        {
            "conn_type": "aws",
            "login": LOCAL_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            "password": LOCAL_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            "extra": {"endpoint_url": endpoint_url, "region_name": region},
        }
    )
