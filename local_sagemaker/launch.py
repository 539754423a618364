"""Start and stop the local SageMaker service as a process of its own (for the local stack and the tests).

The service reaches S3, CloudWatch and CloudWatch Logs wherever ``aws_endpoint_url`` points (the local AWS),
with the local credentials; its record is what ``local_sagemaker.processes.stop`` takes.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

from local_aws import LOCAL_REGION
from local_sagemaker import processes

HOST = "127.0.0.1"
# The service answers /ping once the endpoints its records name serve again, their model servers started anew.
SERVICE_START_TIMEOUT = 120.0


@dataclasses.dataclass(frozen=True)
class Started:
    """A running service: its process record (what ``stop`` takes), the control plane's URL and the runtime's."""

    record: dict
    url: str
    runtime_url: str


def service_env(aws_endpoint_url: str, region: str, credentials: dict[str, str]) -> dict[str, str]:
    return processes.allowed_env(
        {
            **credentials,
            "AWS_ENDPOINT_URL": aws_endpoint_url,
            "AWS_DEFAULT_REGION": region,
            "AWS_CONFIG_FILE": "/dev/null",
            "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
            "PYTHONUNBUFFERED": "1",
        }
    )


def start(
    state_dir: Path,
    aws_endpoint_url: str,
    *,
    credentials: dict[str, str],
    region: str = LOCAL_REGION,
    port: int | None = None,
    runtime_port: int | None = None,
    cpus: int = 0,
    metrics_interval: float = 10.0,
    log_path: Path | None = None,
    timeout: float = SERVICE_START_TIMEOUT,
) -> Started:
    """Start the service; returns once it answers /ping with 200."""
    port = port or processes.free_port(HOST)
    runtime_port = runtime_port or processes.free_port(HOST)
    command = [
        sys.executable,
        "-m",
        "local_sagemaker",
        "--state-dir",
        str(state_dir),
        "--host",
        HOST,
        "--port",
        str(port),
        "--runtime-port",
        str(runtime_port),
        "--cpus",
        str(cpus),
        "--metrics-interval",
        str(metrics_interval),
        "--region",
        region,
    ]
    log_path = log_path or Path(state_dir) / "logs" / "local-sagemaker.log"
    process, record = processes.spawn(
        command, env=service_env(aws_endpoint_url, region, credentials), log_path=log_path
    )
    url = f"http://{HOST}:{port}"
    deadline = time.monotonic() + timeout
    while True:
        if processes.healthy(url):
            return Started(record, url, f"http://{HOST}:{runtime_port}")
        if process.poll() is not None or time.monotonic() > deadline:
            processes.stop([record], grace=processes.IDLE_STOP_GRACE_SECONDS)
            what = f"exited with {process.returncode}" if process.poll() is not None else "did not become ready"
            raise RuntimeError(f"the local SageMaker service {what}; its log ends:\n{processes.log_tail(log_path)}")
        time.sleep(0.1)


def stop(record: dict) -> None:
    """Stop the service; it stops its jobs and model servers first (the records stay)."""
    processes.stop([record], grace=processes.SERVICE_STOP_GRACE_SECONDS)


def stop_strays(state_dir: Path) -> int:
    """Stop what a killed service left running under ``state_dir``, recorded or not: the model servers of its
    endpoints and transform jobs, and the processes of its training jobs (a clean stop stops them itself). Returns
    how many there were."""
    # The service's own modules take a quarter of a second to import, which only a clean-up needs to pay.
    from local_sagemaker.training import running_hosts

    state_dir = Path(state_dir)
    strays = [
        *processes.running_with("inference.serve", state_dir / "endpoint-fleets"),
        *processes.running_with("inference.serve", state_dir / "transform-job-dirs"),
        *running_hosts(state_dir / "job-dirs"),
    ]
    # Training hosts among them get their job's grace, the longer of the two.
    processes.stop(strays, grace=processes.JOB_STOP_GRACE_SECONDS)
    return len(strays)
