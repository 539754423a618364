"""The sweep report, from a real sweep: train.py run by the local SageMaker service on small generated MNIST, its
outputs in the local S3, selected by tasks.selection and validated by the real data checks."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import boto3
import numpy as np
import pytest

from tasks.config import load_config
from tasks.report import REPORT_FILES, build_report, run_name
from tasks.report_text import render_markdown

pytestmark = pytest.mark.slow

RUN_ID = "manual__2026-01-02T03:04:05+00:00"
PNG = b"\x89PNG\r\n\x1a\n"


def trained(request: dict, config) -> dict:
    """A training job run as the provider's operator runs it; its answer as the operator returns it."""
    from airflow.providers.amazon.aws.hooks.sagemaker import SageMakerHook
    from airflow.providers.amazon.aws.operators.sagemaker import serialize

    hook = SageMakerHook(aws_conn_id=config.aws_conn_id, region_name=config.region)
    hook.create_training_job(request, wait_for_completion=True, print_log=False, check_interval=1)
    return {"Training": serialize(hook.describe_training_job(request["TrainingJobName"]))}


@pytest.fixture(scope="module")
def sweep(local_sagemaker, local_aws, small_mnist, small_reference):
    from data_checks.mnist_suite import validate_mnist
    from tasks.mnist_data import upload_dataset
    from tasks.selection import most_accurate
    from tasks.training_jobs import sweep_requests

    config = load_config()
    boto3.client("s3", endpoint_url=local_aws).create_bucket(Bucket=config.bucket)
    params = {"hidden_channels": [2, 6], "epochs": 2, "lr": 0.05, "instance_type": "ml.m5.xlarge", "instance_count": 1}
    requests = sweep_requests(
        params, config=config, dag_id="mnist_sweep", run_id=RUN_ID, dataset_uri=upload_dataset(small_mnist, config)
    )
    best = most_accurate([trained(request, config) for request in requests], config=config)
    validation_dir = Path(config.state_dir) / "runs" / run_name(RUN_ID) / "validation"
    validation = validate_mnist(small_mnist, validation_dir, (600, 100), small_reference)
    return config, best, validation


def s3_objects(config, uri: str) -> dict[str, dict]:
    s3 = boto3.client("s3", endpoint_url=json.loads(_connection())["extra"]["endpoint_url"])
    bucket, prefix = uri.removeprefix("s3://").split("/", 1)
    keys = [item["Key"] for item in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]
    return {key.removeprefix(prefix): s3.head_object(Bucket=bucket, Key=key) for key in keys}


def _connection() -> str:
    import os

    return os.environ["AIRFLOW_CONN_AWS_DEFAULT"]


def best_job_metrics(config, best) -> dict:
    s3 = boto3.client("s3", endpoint_url=json.loads(_connection())["extra"]["endpoint_url"])
    bucket, key = best["training_model_data_url"].removeprefix("s3://").split("/", 1)
    body = s3.get_object(Bucket=bucket, Key=key.replace("model.tar.gz", "output.tar.gz"))["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(body)) as archive:
        return json.load(archive.extractfile("metrics.json"))


def test_report_of_a_real_sweep(sweep):
    from tasks.gate import judge

    config, best, validation = sweep
    decision = judge(config, "report-test", best["test_accuracy"], min_test_accuracy=0.0)
    where = build_report(RUN_ID, best, validation=validation, gate=decision, config=config)

    directory = Path(where["directory"])
    markdown = Path(where["markdown"]).read_text()
    for picture in ("curves.png", "confusion_matrix.png", "misclassified.png"):
        assert (directory / picture).read_bytes().startswith(PNG), picture
        assert f"]({picture})" in markdown
    # One table row per trial, with the selection's figures; the winner in bold.
    for trial in best["trials"]:
        channels = trial["hidden_channels"]
        cell = f"**{channels}**" if trial["training_job_name"] == best["training_job_name"] else str(channels)
        (row,) = [line for line in markdown.splitlines() if line.startswith(f"| {cell} |")]
        for key in ("accuracy_min", "accuracy_max", "accuracy_avg", "test_accuracy"):
            assert f"{100 * trial[key]:.2f}%" in row
        assert f"{trial['parameters']:,}" in row
    # The grid shows the best job's misclassified digits: as many as its confusion matrix has off the diagonal.
    matrix = np.array(best_job_metrics(config, best)["confusion_matrix"])
    wrong = int(matrix.sum() - np.trace(matrix))
    assert f"{min(wrong, 40)} of its {wrong} misclassified test digits" in markdown
    # Data validation with its Data Docs beside the report; the gate's reason.
    assert "**Passed**: " in markdown and "600 training and 100 test images" in markdown
    assert (directory / "../validation/index.html").resolve().is_file()
    assert "](../validation/index.html)" in markdown
    assert decision["reason"] in markdown

    page = Path(where["html"]).read_text()
    assert "<table>" in page and '<img src="curves.png"' in page and "|---" not in page

    stored = s3_objects(config, where["s3_uri"])
    assert set(stored) >= {"report.md", "report.html", "curves.png", "confusion_matrix.png", "misclassified.png"}
    assert stored["report.html"]["ContentType"].startswith("text/html")
    assert stored["curves.png"]["ContentType"] == "image/png"
    assert "index.html" in s3_objects(config, where["s3_uri"].replace("/report/", "/validation/"))


def test_a_rerun_replaces_the_report_whole(sweep):
    from tasks.gate import judge

    config, best, validation = sweep
    refused = judge(config, "report-test", best["test_accuracy"], min_test_accuracy=1.0)
    where = build_report(RUN_ID, best, validation=validation, gate=refused, config=config)
    markdown = Path(where["markdown"]).read_text()
    assert "the gate refused it (best test accuracy" in markdown and "not registered" in markdown
    assert "**Skip deployment**" in markdown
    leftovers = [p.name for p in Path(where["directory"]).parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_jobs_without_outputs_still_get_a_report(sweep):
    config, best, _ = sweep
    gone = [
        {**trial, "model_data_url": trial["model_data_url"].replace("/output/", "/missing/")}
        for trial in best["trials"]
    ]
    best = {**best, "model_data_url": gone[0]["model_data_url"], "training_job_name": gone[0]["training_job_name"]}
    where = build_report("manual__no-outputs", {**best, "trials": gone}, config=config)
    markdown = Path(where["markdown"]).read_text()
    assert "## Trials" in markdown and "Learning curves" not in markdown and "confusion_matrix.png" not in markdown
    assert "No validation summary" in markdown and "No gate ran" in markdown
    assert not any(Path(where["directory"]).glob("*.png"))


def test_a_failed_monitoring_check_is_reported_with_its_rollback(sweep):
    _, best, validation = sweep
    failures = ["live accuracy 0.1000 < 0.9000", "CloudWatch 5XX rate 0.06 > 0.05 (12 of 200 invocations)"]
    notes = ["CloudWatch Invocation4XXErrors 7: client errors (the load's own count among its errors)"]
    monitoring = {
        "endpoint_name": "mnist-classifier",
        "passed": False,
        "failures": failures,
        "notes": notes,
        "rollback": {"action": "restored", "endpoint_name": "mnist-classifier", "endpoint_config_name": "cfg-old"},
        "load": {"requests": 200, "errors": 12, "live_accuracy": 0.1, "p50_ms": 3.0, "p99_ms": 9.5},
        "cloudwatch": {
            "invocations": 200,
            "invocation_4xx_errors": 7,
            "invocation_5xx_errors": 12,
            "invocation_5xx_rate": 0.06,
        },
    }
    deployment = {"endpoint_name": "mnist-classifier", "endpoint_config_name": "cfg-new"}
    model = {
        "model_package_arn": "arn:aws:sagemaker:us-east-1:000000000000:model-package/mnist-classifier/3",
        "version": 3,
        "approval": "PendingManualApproval",
        "test_accuracy": best["test_accuracy"],
        "training_job_name": best["training_job_name"],
        "run_id": RUN_ID,
    }
    choice = {"deploy": True, "reason": "this run's model, version 3, which the gate let through", "model": model}
    context = {
        "dag_id": "mnist_sweep",
        "run_id": RUN_ID,
        "best": best,
        "validation": validation,
        "gate": None,
        "choice": choice,
        "deployment": deployment,
        "monitoring": monitoring,
        "data_docs_link": None,
        "curves": False,
        "best_metrics": None,
        "misclassified_shown": 0,
        "misclassified_total": 0,
    }
    markdown = render_markdown(context, REPORT_FILES)
    assert "version 3 (" in markdown and "**failed its monitoring check** and was rolled back (restored)" in markdown
    assert "| model package | `arn:aws:sagemaker:us-east-1:000000000000:model-package/mnist-classifier/3` |" in markdown
    for failure in failures:
        assert f"- failed: {failure}" in markdown
    assert "serving now: `cfg-old`" in markdown
    assert f"- reported, not judged: {notes[0]}" in markdown
    assert "| invocation 5xx errors | 12 |" in markdown and "| invocation 5xx rate | 0.06 |" in markdown
