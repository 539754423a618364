"""Shared fixtures: an isolated Airflow home, the local AWS (moto behind its IAM gateway, on loopback), the local
SageMaker service and small MNIST files.

Every request the tests make is signed and authorized. The tests act as the local account's administrator (the
environment's keys, and the ``aws_default`` connection), so that they may make any bucket they like; the jobs they
start run as the pipeline's execution role, with its shipped trust policy, and beside its shipped permissions one
that reaches the tests' buckets (cli.local_aws.scratch_principals). The shipped policies themselves are proven whole
on a stack (tests/test_policies.py), and request by request in tests/test_local_iam.py."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REAL_MNIST = (ROOT.parent / "shared" / "mnist").resolve()

# Isolate every run from the user's Airflow, AWS and pipeline state before anything imports airflow or boto3.
_SESSION_HOME = Path(tempfile.mkdtemp(prefix="mnist-pipeline-tests-"))
os.environ.update(
    {
        "AIRFLOW_HOME": str(_SESSION_HOME / "airflow"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__UNIT_TEST_MODE": "True",
        "MNIST_PIPELINE_STATE_DIR": str(_SESSION_HOME / "state"),
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }
)


@pytest.fixture(scope="session", autouse=True)
def mnist_mirror_roots(tmp_path_factory):
    """The tests' generated MNIST files (under pytest's temporary directory) and the official ones are mirror
    directories the configuration allows, as an administrator would allow a data directory."""
    os.environ["MNIST_PIPELINE_MNIST_MIRROR_ROOTS"] = f"{tmp_path_factory.getbasetemp()},{REAL_MNIST}"
    yield
    os.environ.pop("MNIST_PIPELINE_MNIST_MIRROR_ROOTS", None)


def pytest_sessionfinish(session, exitstatus):
    from tests.helpers.local_stack import stop_shared

    stop_shared()
    shutil.rmtree(_SESSION_HOME, ignore_errors=True)


def _execution_role() -> str:
    from tasks.config import PipelineConfig

    return PipelineConfig().role_arn  # the configuration's default: the scratch account's execution role


EXECUTION_ROLE = _execution_role()


def _keys():
    from cli.local_aws import StackKeys

    return StackKeys.new()


KEYS = _keys()
os.environ.update(KEYS.admin.environment())  # the tests' own boto3 clients sign as the administrator


def start_test_aws(directory: Path, **options):
    """A local AWS of the tests' principals (cli.local_aws.scratch_principals); returns (process, endpoint URL)."""
    from cli.local_aws import start_scratch_aws

    directory.mkdir(parents=True, exist_ok=True)
    return start_scratch_aws(directory, KEYS, **options)


@pytest.fixture(scope="session")
def local_aws():
    """The local AWS on 127.0.0.1; the `aws_default` connection points at it, signing as the administrator. Yields
    the endpoint URL."""
    from cli.local_aws import connection_uri

    process, endpoint_url = start_test_aws(
        _SESSION_HOME / "local-aws",
        log_path=_SESSION_HOME / "local-aws.log",
        decision_log=_SESSION_HOME / "iam-decisions.jsonl",
    )
    try:
        os.environ["AIRFLOW_CONN_AWS_DEFAULT"] = connection_uri(endpoint_url, KEYS.admin)
        yield endpoint_url
    finally:
        process.terminate()
        process.wait()


@pytest.fixture(scope="session")
def local_sagemaker_service(local_aws):
    """The local SageMaker service on 127.0.0.1, backed by the session's local AWS; from here on the `aws_default`
    connection sends `sagemaker` and `sagemaker-runtime` to it, as the local stack's does. Yields its
    ``launch.Started`` (process record, control-plane URL, runtime URL)."""
    from cli.local_aws import connection_uri
    from local_sagemaker import launch

    started = launch.start(
        _SESSION_HOME / "sagemaker", local_aws, credentials=KEYS.sagemaker.environment(), cpus=2, metrics_interval=1
    )
    try:
        os.environ["AIRFLOW_CONN_AWS_DEFAULT"] = connection_uri(
            local_aws, KEYS.admin, sagemaker_endpoint=started.url, runtime_endpoint=started.runtime_url
        )
        # The provider polls jobs and endpoints this often (read when the DAG file is parsed): local ones take seconds.
        os.environ["AIRFLOW__MNIST_PIPELINE__SAGEMAKER_CHECK_INTERVAL"] = "1"
        yield started
    finally:  # it stops its model servers too
        launch.stop(started.record)


@pytest.fixture(scope="session")
def local_sagemaker(local_sagemaker_service) -> str:
    """The local SageMaker service's control-plane URL (boto3's `sagemaker` client)."""
    return local_sagemaker_service.url


@pytest.fixture(scope="session")
def local_sagemaker_runtime(local_sagemaker_service) -> str:
    """The local SageMaker service's runtime URL (boto3's `sagemaker-runtime` client)."""
    return local_sagemaker_service.runtime_url


@pytest.fixture(scope="session")
def airflow_db():
    """The isolated AIRFLOW_HOME's metadata database, migrated once per session (for `dag.test()`)."""
    import subprocess
    import sys

    airflow = Path(sys.executable).with_name("airflow")
    migrate = subprocess.run([airflow, "db", "migrate"], capture_output=True, text=True, check=False)
    assert migrate.returncode == 0, migrate.stdout[-3000:] + migrate.stderr[-3000:]


@pytest.fixture(scope="session")
def small_mnist(tmp_path_factory) -> Path:
    """A directory with the four MNIST files: 600 training and 100 test images of learnable synthetic digits."""
    from tests.helpers.synthetic_mnist import make_mnist

    directory = tmp_path_factory.mktemp("small-mnist")
    make_mnist(directory)
    return directory


@pytest.fixture(scope="session")
def small_reference(small_mnist, tmp_path_factory) -> Path:
    """The class statistics of ``small_mnist``: the reference its damaged copies are held to."""
    from data_checks.class_stats import write_reference
    from training.mnist_idx import load_mnist

    path = tmp_path_factory.mktemp("small-reference") / "reference.json"
    return write_reference(load_mnist(small_mnist), path, source="small_mnist")


@pytest.fixture(scope="session")
def real_mnist() -> Path:
    if not all((REAL_MNIST / name).is_file() for name in ("train-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")):
        pytest.skip(f"the official MNIST files are not in {REAL_MNIST}")
    return REAL_MNIST


# The files that share one local stack (tests/helpers/local_stack.py): under xdist they run on one worker, one stack.
STACK_FILES = {"tests/test_stack.py", "tests/test_browser.py", "tests/test_faults.py"}
# The long scopes start first, longest first (as measured by `pytest --junitxml` here, the real-data tests included),
# so that the many short files fill the workers at the end rather than one long file running alone there.
FIRST_SCOPES = (
    "stack",
    "tests/test_safe_deploy.py",
    "tests/test_service_endpoints.py",
    "tests/test_training.py",
    "tests/test_monitoring.py",
    "tests/test_service_training.py",
    "tests/test_service_transform.py",
    "tests/test_tune_dag.py",
    "tests/test_deployment.py",
    "tests/test_data_checks.py",
    "tests/test_batch_dag.py",
    "tests/test_report.py",
    "tests/test_serve.py",
    "tests/test_service_tuning.py",
)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`make test` runs on several workers (`-n`): each test file whole on one of them, so that its module fixtures
    are built once and its tests keep their order; the stack's files together, the longest files first. (xdist's own `loadgroup` cannot do this
    under pytest 9.2, which no longer lets it rename the tests it groups.)"""
    from xdist.scheduler import LoadScopeScheduling

    class FileScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return "stack" if path in STACK_FILES else path

        def _assign_work_unit(self, node) -> None:
            for scope in reversed(FIRST_SCOPES):
                if scope in self.workqueue:
                    self.workqueue.move_to_end(scope, last=False)
            super()._assign_work_unit(node)

    return FileScheduling(config, log)
