"""The sweep DAG: it parses light and right, and runs end to end with `dag.test()` on both backends.

Local backend: real training jobs (the project's train.py in subprocesses) on small generated digits, the local S3
(moto server), a real local endpoint answering a prediction. SageMaker backend: the same DAG against moto's
SageMaker, which accepts, validates and records every request but runs nothing: the test stands in for the
training containers by leaving each job's output.tar.gz (metrics.json) where SageMaker would.
"""

from __future__ import annotations

import datetime
import io
import json
import os
import subprocess
import sys
import tarfile
import time

import boto3
import pytest

from tests.conftest import ROOT

DAG_FILE = ROOT / "dags" / "mnist_sweep.py"
HEAVY = ("torch", "pandas", "great_expectations", "sagemaker", "numpy")


@pytest.fixture(scope="module")
def dag():
    from airflow.dag_processing.dagbag import DagBag

    with pytest.MonkeyPatch.context() as patch:
        # moto completes a job at once: poll it every second, not every 30 (read when the DAG file is parsed).
        patch.setenv("AIRFLOW__MNIST_PIPELINE__SAGEMAKER_CHECK_INTERVAL", "1")
        bag = DagBag(str(DAG_FILE.parent))
        assert bag.import_errors == {}
        yield bag.dags["mnist_sweep"]


def test_dag_parses_with_its_settings(dag):
    assert dag.tags == {"mnist", "sagemaker", "training", "sweep"}
    assert dag.max_active_runs == 1 and dag.catchup is False
    assert dag.schedule is None  # no schedule configured
    assert dag.doc_md.lstrip().startswith("# MNIST hidden_channels sweep")
    for task in dag.tasks:
        assert task.retries >= 2 and task.retry_delay >= datetime.timedelta(seconds=30), task.task_id
    assert dag.get_task("train_local").pool == "local_training"
    params = dag.params
    assert params["hidden_channels"] == [2, 5, 10, 20, 32]
    for name in ("hidden_channels", "epochs", "preset", "optimizer", "lr", "batch_size", "dropout", "kernel_size",
                 "instance_type", "instance_count", "mnist_mirror", "deploy", "endpoint_name"):  # fmt: skip
        param = params.get_param(name)
        assert param.schema.get("title") and param.description, name


def test_dag_file_imports_nothing_heavy():
    """The DAG processor parses this file often: no torch, pandas, great_expectations, sagemaker (nor numpy)."""
    code = (
        "import json, sys, time, importlib.util\n"
        "import airflow.sdk, airflow.providers.amazon.aws.operators.sagemaker\n"
        "start = time.perf_counter()\n"
        f"spec = importlib.util.spec_from_file_location('mnist_sweep', {str(DAG_FILE)!r})\n"
        "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
        "seconds = time.perf_counter() - start\n"
        f"print(json.dumps({{'seconds': seconds, 'heavy': [m for m in {HEAVY!r} if m in sys.modules]}}))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["heavy"] == [], f"parsing the DAG imported {measured['heavy']}"
    assert measured["seconds"] < 2.0, f"the DAG file alone took {measured['seconds']:.2f} s to import"


def test_schedule_comes_from_configuration(monkeypatch):
    monkeypatch.setenv("MNIST_PIPELINE_SCHEDULE", "0 3 * * 1")
    code = (
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('mnist_sweep', {str(DAG_FILE)!r})\n"
        "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
        "print(module._schedule())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert result.stdout.strip().splitlines()[-1] == "0 3 * * 1"


@pytest.mark.parametrize(
    ("conf", "param"),
    [
        ({"hidden_channels": [0, 5]}, "hidden_channels"),
        ({"hidden_channels": []}, "hidden_channels"),
        ({"hidden_channels": [4, 4]}, "hidden_channels"),
        ({"hidden_channels": list(range(1, 18))}, "hidden_channels"),
        ({"epochs": 0}, "epochs"),
        ({"optimizer": "rmsprop"}, "optimizer"),
        ({"instance_type": "m5.xlarge"}, "instance_type"),
        ({"endpoint_name": "bad_name"}, "endpoint_name"),
    ],
)
def test_invalid_params_are_refused_naming_the_param(dag, airflow_db, conf, param):
    from airflow.sdk.exceptions import ParamValidationError

    with pytest.raises(ParamValidationError, match=f"Invalid input for param {param}"):
        dag.test(run_conf=conf)


# -- end to end --------------------------------------------------------------------------------------------------


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


@pytest.fixture
def sweep_env(monkeypatch, local_aws, small_mnist, tmp_path, airflow_db):
    """Configuration for a run on the small generated MNIST, with its own bucket and state directory."""
    from tests.synthetic_mnist import make_mnist

    sums = make_mnist(tmp_path / "unused", seed=0)  # the same files as small_mnist: same seed, same sums
    md5sums = tmp_path / "md5sums"
    md5sums.write_text("".join(f"{digest}  {name}\n" for name, digest in sums.items()))
    monkeypatch.setenv("MNIST_PIPELINE_MNIST_MD5SUMS", str(md5sums))
    monkeypatch.setenv("MNIST_PIPELINE_MNIST_EXPECTED_COUNTS", "600,100")
    monkeypatch.setenv("MNIST_PIPELINE_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("MNIST_CACHE", str(tmp_path / "cache"))
    return {"mnist_mirror": str(small_mnist)}


def run_sweep(dag, conf: dict):
    moment = datetime.datetime.now(datetime.UTC)
    return dag.test(run_conf=conf, logical_date=moment, run_after=moment)


def test_local_sweep_end_to_end(dag, sweep_env, monkeypatch, local_aws, small_mnist):
    from tasks.config import load_config
    from tasks.local_endpoints import stop_all
    from training.mnist_idx import load_mnist

    monkeypatch.setenv("MNIST_PIPELINE_BACKEND", "local")
    monkeypatch.setenv("MNIST_PIPELINE_BUCKET", "sweep-local")
    monkeypatch.setenv("MNIST_PIPELINE_LOCAL_CPUS", "2")
    # Settings that learn the small digits in two short epochs, so the jobs differ and the best is clear.
    training = {"epochs": 2, "optimizer": "adam", "lr": 0.005, "batch_size": 32}
    conf = {**sweep_env, **training, "hidden_channels": [2, 16], "endpoint_name": "e2e-local"}
    started = time.monotonic()
    try:
        run = run_sweep(dag, conf)
        took = time.monotonic() - started
        found = states(run)
        assert str(run.state) == "success", found
        assert found["train_local"] == ["success"] * 2
        assert found["train_sagemaker"] == ["skipped"] and found["deploy_sagemaker.create_model"] == ["skipped"]

        s3 = boto3.client("s3", endpoint_url=local_aws)
        accuracies = {}
        for result in xcoms(run.run_id, "train_local"):
            job = result["Training"]
            assert job["TrainingJobStatus"] == "Completed"
            assert job["HyperParameters"]["optimizer"] == "adam"
            bucket, key = job["ModelArtifacts"]["S3ModelArtifacts"][5:].split("/", 1)
            with tarfile.open(fileobj=io.BytesIO(s3.get_object(Bucket=bucket, Key=key)["Body"].read())) as model:
                assert {"model.pth", "model_config.json", "code/inference.py"} <= set(model.getnames())
            final = {m["MetricName"]: m["Value"] for m in job["FinalMetricDataList"]}
            assert {"test:loss", "test:accuracy"} <= set(final)  # (train:loss only when a log interval passes)
            accuracies[int(job["HyperParameters"]["hidden_channels"])] = final["test:accuracy"] / 100

        [best] = xcoms(run.run_id, "select_best")
        assert best["test_accuracy"] == max(accuracies.values()) >= 0.8
        assert best["hidden_channels"] == min(hc for hc, acc in accuracies.items() if acc == best["test_accuracy"])
        assert [trial["hidden_channels"] for trial in best["trials"]] == [2, 16]

        # The endpoint serves the best model: on the test set it scores what that job scored.
        [deployment] = xcoms(run.run_id, "deploy_local")
        assert deployment["model_data_url"] == best["model_data_url"]
        test = load_mnist(small_mnist)
        runtime = boto3.client("sagemaker-runtime", endpoint_url=deployment["runtime_url"])
        answer = runtime.invoke_endpoint(
            EndpointName="e2e-local",
            ContentType="application/json",
            Body=json.dumps({"instances": test["test_images"].tolist()}),
        )
        labels = [prediction["label"] for prediction in json.loads(answer["Body"].read())["predictions"]]
        served_accuracy = sum(map(int.__eq__, labels, test["test_labels"].tolist())) / len(labels)
        assert served_accuracy == pytest.approx(best["test_accuracy"], abs=0.011)
        assert took < 120, f"the sweep took {took:.0f} s"
    finally:
        stop_all(load_config())


def test_sagemaker_sweep_sends_the_requests(dag, sweep_env, monkeypatch, local_aws):
    """moto's SageMaker runs no job: this checks what the DAG asks of SageMaker, and the wiring around it."""
    from tasks.training_jobs import training_job_name

    monkeypatch.setenv("MNIST_PIPELINE_BACKEND", "sagemaker")
    monkeypatch.setenv("MNIST_PIPELINE_BUCKET", "sweep-sagemaker")
    s3 = boto3.client("s3", endpoint_url=local_aws)
    s3.create_bucket(Bucket="sweep-sagemaker")  # on AWS the bucket must exist beforehand
    moment = datetime.datetime.now(datetime.UTC)
    run_id = f"manual__{moment.isoformat()}"
    # What each training container would leave: the output data dir with metrics.json (hidden_channels 8 wins).
    for hidden_channels, accuracy in ((4, 0.9612), (8, 0.9733)):
        output = io.BytesIO()
        with tarfile.open(fileobj=output, mode="w:gz") as archive:
            body = json.dumps({"test_accuracy": accuracy, "parameters": 1000 * hidden_channels}).encode()
            info = tarfile.TarInfo("metrics.json")
            info.size = len(body)
            archive.addfile(info, io.BytesIO(body))
        key = f"mnist-sweep/training-jobs/{training_job_name(run_id, hidden_channels)}/output/output.tar.gz"
        s3.put_object(Bucket="sweep-sagemaker", Key=key, Body=output.getvalue())

    conf = {**sweep_env, "hidden_channels": [4, 8], "instance_type": "ml.c5.xlarge", "endpoint_name": "e2e-sm"}
    run = dag.test(run_conf=conf, logical_date=moment, run_after=moment)
    found = states(run)
    assert str(run.state) == "success", found
    assert found["train_sagemaker"] == ["success"] * 2 and found["train_local"] == ["skipped"]
    assert found["deploy_local"] == ["skipped"]

    sagemaker = boto3.client("sagemaker", endpoint_url=local_aws)
    [requests] = xcoms(run_id, "training_requests")
    for request, result in zip(requests, xcoms(run_id, "train_sagemaker"), strict=True):
        recorded = sagemaker.describe_training_job(TrainingJobName=request["TrainingJobName"])
        assert recorded["HyperParameters"] == request["HyperParameters"]
        assert recorded["InputDataConfig"] == request["InputDataConfig"]
        assert recorded["ResourceConfig"] == {"InstanceType": "ml.c5.xlarge", "InstanceCount": 1, "VolumeSizeInGB": 10}
        assert recorded["AlgorithmSpecification"]["TrainingImage"].endswith("/pytorch-training:2.6-cpu-py312")
        assert recorded["ExperimentConfig"] == {
            "ExperimentName": "mnist-sweep",
            "TrialName": requests[0]["ExperimentConfig"]["TrialName"],
        }
        assert recorded["RoleArn"] == request["RoleArn"]
        assert set(result) == {"Training"} and result["Training"]["TrainingJobName"] == request["TrainingJobName"]
        assert result["Training"]["TrainingJobStatus"] == "Completed"
    assert [r["HyperParameters"]["hidden_channels"] for r in requests] == ["4", "8"]

    [best] = xcoms(run_id, "select_best")
    assert (best["hidden_channels"], best["test_accuracy"]) == (8, 0.9733)
    endpoint = sagemaker.describe_endpoint(EndpointName="e2e-sm")
    config = sagemaker.describe_endpoint_config(EndpointConfigName=endpoint["EndpointConfigName"])
    assert config["ProductionVariants"][0]["ModelName"] == best["training_job_name"]
    model = sagemaker.describe_model(ModelName=best["training_job_name"])
    assert model["PrimaryContainer"]["ModelDataUrl"] == best["model_data_url"]
    assert model["PrimaryContainer"]["Image"].endswith("/pytorch-inference:2.6-cpu-py312")
    assert model["PrimaryContainer"]["Environment"]["SAGEMAKER_PROGRAM"] == "inference.py"


@pytest.mark.aws
@pytest.mark.skipif(
    not (os.environ.get("AIRFLOW_CONN_AWS_DEFAULT") and os.environ.get("MNIST_PIPELINE_ROLE_ARN")),
    reason="needs AIRFLOW_CONN_AWS_DEFAULT with AWS credentials, MNIST_PIPELINE_ROLE_ARN and MNIST_PIPELINE_BUCKET",
)
def test_sagemaker_sweep_on_aws(dag, airflow_db, real_mnist, monkeypatch):
    """Opt in with `-m aws`: AIRFLOW_CONN_AWS_DEFAULT (real credentials), MNIST_PIPELINE_ROLE_ARN and
    MNIST_PIPELINE_BUCKET (existing) set. One real 1-epoch job on SageMaker, no deployment: ~10 minutes, cents."""
    monkeypatch.setenv("MNIST_PIPELINE_BACKEND", "sagemaker")
    conf = {"hidden_channels": [4], "epochs": 1, "deploy": False, "mnist_mirror": str(real_mnist)}
    run = run_sweep(dag, conf)
    assert str(run.state) == "success", states(run)
    [best] = xcoms(run.run_id, "select_best")
    assert best["hidden_channels"] == 4 and best["test_accuracy"] > 0.9
    assert best["model_data_url"].endswith("/output/model.tar.gz")
