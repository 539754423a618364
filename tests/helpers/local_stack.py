"""One real local stack (`mnist-pipeline up`) shared by the stack and browser tests: starting Airflow costs ~30 s.

Started on first use with its own state directory and configured for the small generated MNIST files; stopped
with `mnist-pipeline down` at the end of the session, unless a test stopped it before (test_stack's last test).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

from cli.stack import USERNAME, StackPaths
from data_checks.class_stats import write_reference
from tests.conftest import ROOT
from tests.helpers import traffic
from training.mnist_idx import load_mnist

DEADLINE_SECONDS = 15
# Variables of the test session that must not leak into the stack: it has its own home, connection and config.
_NOT_INHERITED = (
    "AIRFLOW_HOME",
    "AIRFLOW__CORE__UNIT_TEST_MODE",
    "AIRFLOW_CONN_AWS_DEFAULT",
    "MNIST_CACHE",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
)


@dataclasses.dataclass
class Stack:
    state_dir: Path
    env: dict
    up_output: str
    stopped: bool = False

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "cli.main", *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    @property
    def paths(self) -> StackPaths:
        return StackPaths(self.state_dir)

    @property
    def state(self) -> dict:
        return json.loads(self.paths.state.read_text())

    @property
    def url(self) -> str:
        return self.state["airflow_url"]

    @property
    def password(self) -> str:
        return json.loads(self.paths.passwords.read_text())[USERNAME]

    @property
    def keys(self):
        """The stack's keys (cli.local_aws.StackKeys): the administrator's, the pipeline's, the SageMaker service's."""
        from cli.local_aws import StackKeys

        return StackKeys.load(self.paths.credentials)

    def client(self, service: str, key=None):
        """A boto3 client of the stack, signing as the pipeline (or with ``key``): SageMaker at the local SageMaker
        service, the rest at the local AWS."""
        import boto3

        key = key or self.keys.pipeline
        url = {
            "sagemaker": self.state["sagemaker_endpoint"],
            "sagemaker-runtime": self.state["sagemaker_runtime_endpoint"],
        }.get(service, self.state["aws_endpoint"])
        return boto3.client(
            service,
            endpoint_url=url,
            region_name="us-east-1",
            aws_access_key_id=key.access_key_id,
            aws_secret_access_key=key.secret_access_key,
        )

    def invoke_all(self, images, endpoint: str = "mnist-classifier") -> None:
        """Send ``images`` to ``endpoint``, one JSON request each, and wait until its data capture holds them all
        (the runtime writes it in batches, a second apart)."""
        from tasks.config import load_config

        # The stack's bucket and prefix: the defaults.
        traffic.invoke_all(
            self.client("sagemaker-runtime"), self.client("s3", self.keys.admin), load_config(), endpoint, images
        )

    def api(self) -> httpx.Client:
        # As patient as the client below: an API server just started again (`up` after `down`) answers slowly.
        token = httpx.post(f"{self.url}/auth/token", json={"username": USERNAME, "password": self.password}, timeout=30)
        token.raise_for_status()
        headers = {"Authorization": f"Bearer {token.json()['access_token']}"}
        return httpx.Client(base_url=f"{self.url}/api/v2", headers=headers, timeout=30)

    def down(self) -> subprocess.CompletedProcess:
        result = self.cli("down", timeout=120)
        self.stopped = True
        return result


_shared: Stack | None = None


def shared_stack(request, mnist_dir: Path) -> Stack:
    """The session's stack, started now if needed, set up for the MNIST files in ``mnist_dir``."""
    global _shared
    if _shared is not None and not _shared.stopped:
        return _shared
    # A drift found in its captured traffic retrains (test_stack), on these MNIST files (the administrator's mirror:
    # a run the asset starts has the form's defaults); no drift check runs but the ones the tests start.
    retraining = {
        "MNIST_PIPELINE_RETRAIN_ON_DRIFT": "true",
        "MNIST_PIPELINE_DRIFT_SCHEDULE": "none",
        "MNIST_MIRROR": str(mnist_dir),
    }
    _shared = start_stack(request, mnist_dir, retraining)
    request.config.add_cleanup(stop_shared)  # cleanups run last in, first out
    return _shared


def start_stack(request, mnist_dir: Path, settings: dict[str, str] | None = None) -> Stack:
    """A new stack of its own state directory (removed at the session's end), set up for the MNIST files in
    ``mnist_dir`` (and the environment's ``settings``); whoever starts it stops it."""
    state_dir = Path(tempfile.mkdtemp(prefix="mnist-stack-"))
    md5sums = state_dir / "mnist.md5"
    md5sums.write_text("".join(f"{_md5(path)}  {path.name}\n" for path in sorted(mnist_dir.glob("*-ubyte.gz"))))
    counts = {name: _count(mnist_dir / name) for name in ("train-labels-idx1-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
    reference = write_reference(load_mnist(mnist_dir), state_dir / "mnist-reference.json", source=str(mnist_dir))
    env = {key: value for key, value in os.environ.items() if key not in _NOT_INHERITED}
    env.update(
        {
            "MNIST_PIPELINE_STATE_DIR": str(state_dir),
            "MNIST_PIPELINE_MNIST_MD5SUMS": str(md5sums),
            "MNIST_PIPELINE_MNIST_EXPECTED_COUNTS": ",".join(str(n) for n in counts.values()),
            "MNIST_PIPELINE_MNIST_REFERENCE": str(reference),
            "MNIST_PIPELINE_METRICS_INTERVAL": "1",  # the monitoring check waits for metrics a second apart
            # A task whose process died (the fault tests kill them) counts as failed after 30 s, not 5 minutes.
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "30",
            # A sweep here takes longer: its deadline alert is sent (test_stack reads it).
            "AIRFLOW__MNIST_PIPELINE__DEADLINE_SECONDS": str(DEADLINE_SECONDS),
            # Only the drift checks the tests start.
            "MNIST_PIPELINE_DRIFT_SCHEDULE": "none",
            **(settings or {}),
        }
    )
    result = subprocess.run(
        [sys.executable, "-m", "cli.main", "up", "--port", "0"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    stack = Stack(state_dir, env, result.stdout + result.stderr)
    if result.returncode != 0:
        stack.down()
        raise AssertionError(f"`mnist-pipeline up` failed ({result.returncode}):\n{stack.up_output}")
    request.config.add_cleanup(lambda: shutil.rmtree(state_dir, ignore_errors=True))
    return stack


def stop_shared() -> None:
    """Stop the session's stack if it runs: at the session's end, in the process that started it (an xdist worker
    stops its own before it exits; a later cleanup would be too late for it)."""
    if _shared is not None and not _shared.stopped:
        _shared.down()


def _md5(path: Path) -> str:
    import hashlib

    return hashlib.md5(path.read_bytes()).hexdigest()


def _count(labels: Path) -> int:
    from training.mnist_idx import read_idx

    return len(read_idx(labels))
