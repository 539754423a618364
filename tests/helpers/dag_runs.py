"""Running the sweep DAG in tests: parse it, configure a run on the small generated MNIST, run it with
`dag.test()`, and read back what each task did (states, XComs, the report)."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest

from data_checks.class_stats import write_reference
from tests.conftest import ROOT
from training.mnist_idx import load_mnist

DAG_FILE = ROOT / "dags" / "mnist_sweep.py"
# A tuning search as small as a test wants: two Random trials at once over two learning rates, whose choice is
# registered but not deployed (the tests that deploy say so), whatever its accuracy.
SMALL_TUNE = {
    "search": "tune",
    "tune_strategy": "Random",
    "tune_max_jobs": 2,
    "tune_max_parallel": 2,
    "tune_lr": [0.002, 0.01],
    "deploy": False,
    "min_test_accuracy": 0.0,
}


def parse_dag(dag_id: str = "mnist_sweep"):
    from airflow.dag_processing.dagbag import DagBag

    with pytest.MonkeyPatch.context() as patch:
        # Local jobs and endpoints take seconds: poll every second, not every 30 (read when the file is parsed).
        patch.setenv("AIRFLOW__MNIST_PIPELINE__SAGEMAKER_CHECK_INTERVAL", "1")
        # Long enough for the check of a small model to run inside it, short enough for the runs that pass.
        patch.setenv("AIRFLOW__MNIST_PIPELINE__BAKE_SECONDS", "10")
        bag = DagBag(str(DAG_FILE.parent))
    assert bag.import_errors == {}
    dag = bag.dags[dag_id]
    # dag.test() cannot create a run of a DAG with a deadline alert (Airflow 3.3.2: it looks the alert up by its
    # definition instead of its id). The stack tests run the DAG as written, deadline and all.
    dag.deadline = None
    return dag


def configure(patch: pytest.MonkeyPatch, directory: Path, small_mnist: Path, bucket: str, aws_endpoint: str) -> dict:
    """Environment for runs on the small generated MNIST, with their own bucket (created in the local S3, as a
    deployment's bucket exists before its runs) and state directory; returns the run conf that points the download
    at those files."""
    import boto3

    from tests.helpers.synthetic_mnist import make_mnist

    sums = make_mnist(directory / "unused", seed=0)  # the same files as small_mnist: same seed, same sums
    md5sums = directory / "md5sums"
    md5sums.write_text("".join(f"{digest}  {name}\n" for name, digest in sums.items()))
    patch.setenv("MNIST_PIPELINE_MNIST_MD5SUMS", str(md5sums))
    patch.setenv("MNIST_PIPELINE_MNIST_EXPECTED_COUNTS", "600,100")
    reference = write_reference(load_mnist(small_mnist), directory / "reference.json", source=str(small_mnist))
    patch.setenv("MNIST_PIPELINE_MNIST_REFERENCE", str(reference))
    patch.setenv("MNIST_PIPELINE_STATE_DIR", str(directory / "state"))
    patch.setenv("MNIST_CACHE", str(directory / "cache"))
    patch.setenv("MNIST_PIPELINE_BUCKET", bucket)
    boto3.client("s3", endpoint_url=aws_endpoint).create_bucket(Bucket=bucket)
    patch.setenv("MNIST_PIPELINE_METRICS_INTERVAL", "1")  # the monitoring check waits for metrics a second apart
    return {"mnist_mirror": str(small_mnist)}


def run_sweep(conf: dict, moment: datetime.datetime | None = None):
    """One run of a freshly parsed DAG: in one process, `dag.test()` leaves a run's conf in its tasks' Param objects,
    where the next run of the same DAG object would find them as its defaults."""
    moment = moment or datetime.datetime.now(datetime.UTC)
    return parse_dag().test(run_conf=conf, logical_date=moment, run_after=moment)


def xcoms(run_id: str, task_id: str) -> list:
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = session.scalars(XComModel.get_many(run_id=run_id, task_ids=task_id, key="return_value")).all()
        return [XComModel.deserialize_value(row) for row in sorted(rows, key=lambda row: row.map_index)]


def states(run) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for ti in sorted(run.get_task_instances(), key=lambda ti: ti.map_index):
        found.setdefault(ti.task_id, []).append(str(ti.state))
    return found


def report_text(run_id: str) -> str:
    [where] = xcoms(run_id, "report")
    return Path(where["markdown"]).read_text()
