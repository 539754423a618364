"""The batch predictions DAG with `dag.test()`: a registry version's model over a prefix of mixed image files, by the
provider's SageMakerTransformOperator against the local SageMaker service (real model servers), one transform job
per kind of file, then the summary. Scheduled on the champion asset: the stack test sees a sweep trigger it."""

from __future__ import annotations

import io
import json

import boto3
import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT
from tests.helpers.dag_runs import configure, states, xcoms
from tests.helpers.registry import register

pytest_plugins = ["tests.helpers.model_artifact"]  # the model_tarball and test_set fixtures

GROUP = "batch-local"
BIG_INSTANCE = "ml.p4d.24xlarge"  # a valid type, not one the configuration allows


def parse_batch_dag():
    from airflow.dag_processing.dagbag import DagBag

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AIRFLOW__MNIST_PIPELINE__SAGEMAKER_CHECK_INTERVAL", "1")
        bag = DagBag(str(ROOT / "dags"))
    assert bag.import_errors == {}
    return bag.dags["mnist_batch_predict"]


def test_the_batch_dag_is_scheduled_on_the_champion_asset_and_bounded():
    from airflow.providers.amazon.aws.operators.sagemaker import SageMakerTransformOperator

    dag = parse_batch_dag()
    from tasks.assets import CHAMPION

    assert list(dag.timetable.asset_condition.objects) == [CHAMPION]
    transform = dag.get_task("transform")
    assert type(transform).__name__ == "MappedOperator" and issubclass(
        transform.operator_class, SageMakerTransformOperator
    )
    for task in dag.tasks:
        assert task.execution_timeout is not None and task.retries >= 2, task.task_id
    for name in (
        "input_uri",
        "model",
        "endpoint_name",
        "instance_type",
        "max_concurrent_transforms",
        "max_payload_mb",
        "precision",
    ):
        assert dag.params.get_param(name).schema.get("title"), name


@pytest.fixture(scope="module")
def batch(local_sagemaker, local_aws, small_mnist, airflow_db, model_tarball, test_set, tmp_path_factory):
    """A registered version of a trained model, and a prefix holding each kind of file the model takes."""
    from tasks.config import load_config

    images, labels = test_set
    with pytest.MonkeyPatch.context() as patch:
        configure(patch, tmp_path_factory.mktemp("batch-local"), small_mnist, "batch-local", local_aws)
        config = load_config()
        s3 = boto3.client("s3", endpoint_url=local_aws)
        s3.upload_file(str(model_tarball), config.bucket, "models/m/model.tar.gz")
        model_data_url = f"s3://{config.bucket}/models/m/model.tar.gz"
        sagemaker = boto3.client("sagemaker", endpoint_url=local_sagemaker)
        # Version 1 Approved (the one that predicts), 2 Rejected, 3 waiting for a person.
        version = register(config, local_sagemaker, GROUP, model_data_url, 0.97)
        sagemaker.update_model_package(ModelPackageArn=version, ModelApprovalStatus="Approved")
        rejected = register(config, local_sagemaker, GROUP, model_data_url, 0.96)
        sagemaker.update_model_package(ModelPackageArn=rejected, ModelApprovalStatus="Rejected")
        pending = register(config, local_sagemaker, GROUP, model_data_url, 0.95)
        prefix = f"{config.prefix}/incoming"
        files, expected = {}, []

        def put(name: str, body: bytes, truth) -> None:
            s3.put_object(Bucket=config.bucket, Key=f"{prefix}/{name}", Body=body)
            files[name] = body
            expected.extend(truth)

        array = io.BytesIO()
        np.save(array, images[:40])
        put("day1/digits.npy", array.getvalue(), labels[:40])
        put(
            "digits.csv",
            "".join(",".join(map(str, image.ravel())) + "\n" for image in images[40:60]).encode(),
            labels[40:60],
        )
        picture = io.BytesIO()
        Image.fromarray(images[60]).save(picture, format="PNG")
        put("one.png", picture.getvalue(), labels[60:61])
        s3.put_object(Bucket=config.bucket, Key=f"{prefix}/README.txt", Body=b"not an image")
        common = {"endpoint_name": GROUP, "input_uri": f"s3://{config.bucket}/{prefix}/"}
        dag = parse_batch_dag()
        yield {
            "config": config,
            "aws": local_aws,
            "version": version,
            "rejected": rejected,
            "pending": pending,
            "expected": expected,
            "files": files,
            "prefix": prefix,
            "given": dag.test(
                run_conf={**common, "model": "1", "max_concurrent_transforms": 2, "precision": "bfloat16"}
            ),
            "no_champion": parse_batch_dag().test(run_conf=common),
            "big_instance": parse_batch_dag().test(run_conf={**common, "model": "1", "instance_type": BIG_INSTANCE}),
        }


def test_each_kind_of_file_goes_through_its_own_transform_job_and_the_summary_counts_the_digits(
    batch, local_aws, model_dir
):
    run = batch["given"]
    found = states(run)
    assert str(run.state) == "success", found
    # A job per kind (the service's tests take every kind and split; three here): the txt file is not an image.
    assert found["transform"] == ["success"] * 3
    [model] = xcoms(run.run_id, "resolve_model")
    assert model["model_package_arn"] == batch["version"] and model["version"] == 1
    transforms = xcoms(run.run_id, "transform")
    kinds = {t["Transform"]["TransformInput"]["ContentType"]: t["Transform"] for t in transforms}
    assert set(kinds) == {"application/x-npy", "text/csv", "image/png"}
    assert kinds["text/csv"]["TransformInput"]["SplitType"] == "Line"
    assert kinds["text/csv"]["BatchStrategy"] == "MultiRecord"
    for job in kinds.values():
        assert job["TransformJobStatus"] == "Completed" and job["ModelName"] == model["model_name"]
        assert job["TransformInput"]["DataSource"]["S3DataSource"]["S3DataType"] == "ManifestFile"
        assert job["Environment"] == {"MNIST_INFERENCE_PRECISION": "bfloat16"}  # the model servers' setting

    # A .out per file, under the run's output prefix, its answers the model's.
    s3 = boto3.client("s3", endpoint_url=local_aws)
    output = kinds["image/png"]["TransformOutput"]["S3OutputPath"]
    bucket, key = output.removeprefix("s3://").split("/", 1)
    listed = {item["Key"].removeprefix(key) for item in s3.list_objects_v2(Bucket=bucket, Prefix=key)["Contents"]}
    assert listed == {f"{name}.out" for name in batch["files"]}
    predicted = []
    for name in ("day1/digits.npy", "digits.csv", "one.png"):
        body = s3.get_object(Bucket=bucket, Key=f"{key}{name}.out")["Body"].read()
        predicted += [p["label"] for line in body.splitlines() if line for p in json.loads(line)["predictions"]]
    truth = [int(label) for label in batch["expected"]]
    assert len(predicted) == len(truth) == 61
    assert sum(map(int.__eq__, predicted, truth)) / len(truth) >= 0.9

    [summary] = xcoms(run.run_id, "summarize")
    assert summary["images"] == 61 and summary["version"] == 1
    assert summary["counts"] == {str(d): predicted.count(d) for d in range(10)}
    assert summary["seconds"] > 0 and summary["images_per_second"] == round(61 / summary["seconds"], 1)
    assert sorted(job["files"] for job in summary["jobs"]) == [1, 1, 1]
    assert {job["precision"] for job in summary["jobs"]} == {"bfloat16"}
    # The model servers computed in bfloat16 where this CPU does it natively (else float32, as they say).
    from inference.artifact import load_handler

    bfloat16_native = load_handler(model_dir).predictor.bfloat16_native
    logs = boto3.client("logs", endpoint_url=local_aws)
    name = kinds["application/x-npy"]["TransformJobName"]
    [stream] = logs.describe_log_streams(logGroupName="/aws/sagemaker/TransformJobs", logStreamNamePrefix=f"{name}/")[
        "logStreams"
    ]
    events = logs.get_log_events(logGroupName="/aws/sagemaker/TransformJobs", logStreamName=stream["logStreamName"])
    said = [e["message"] for e in events["events"] if "images or more computed in" in e["message"]]
    assert said and all(line.endswith("bfloat16" if bfloat16_native() else "float32") for line in said), said
    stored = s3.get_object(Bucket=bucket, Key=summary["summary_uri"].split("/", 3)[3])["Body"].read()
    assert json.loads(stored)["counts"] == summary["counts"]


def test_without_a_model_and_no_champion_the_run_fails_saying_so(batch):
    run = batch["no_champion"]
    found = states(run)
    assert str(run.state) == "failed" and found["resolve_model"] == ["failed"], found
    assert found["transform"] == ["upstream_failed"]


def test_an_instance_type_the_configuration_does_not_allow_fails_the_run_at_once(batch):
    """The batch DAG's instance_type is held to allowed_instance_types by the sweep's own check, before any request
    is made or anything written, and the task is not retried: the same params would be refused again."""
    from tasks.batch import output_uri, transform_jobs
    from tasks.training_jobs import RequestRefused

    run = batch["big_instance"]
    found = states(run)
    assert str(run.state) == "failed" and found["transform_requests"] == ["failed"], found
    [attempt] = [ti for ti in run.get_task_instances() if ti.task_id == "transform_requests"]
    assert attempt.try_number == 1  # failed for good, no retry
    [model] = xcoms(batch["given"].run_id, "resolve_model")
    config = batch["config"]
    with pytest.raises(RequestRefused, match=rf"^instance_type {BIG_INSTANCE} is not allowed here: one of ml\.m5"):
        transform_jobs(
            config,
            f"s3://{config.bucket}/{batch['prefix']}/",
            model,
            "refused-run",
            instance_type=BIG_INSTANCE,
            max_concurrent=1,
            max_payload_mb=6,
        )
    output = output_uri(config, "refused-run").split("/", 3)[3]
    written = boto3.client("s3", endpoint_url=batch["aws"]).list_objects_v2(Bucket=config.bucket, Prefix=output)
    assert written["KeyCount"] == 0


def test_only_an_approved_version_predicts_however_it_is_named(batch):
    """A version Rejected (rolled back, say) or still PendingManualApproval is refused, asked for by number or by
    ARN, or named by a champion asset event; the error names the version and its status."""
    from tasks.batch import VersionNotApproved, model_to_predict_with

    config = batch["config"]
    for arn, status in ((batch["rejected"], "Rejected"), (batch["pending"], "PendingManualApproval")):
        number = arn.rsplit("/", 1)[1]
        for model, events in ((number, []), (arn, []), (None, [{"model_package_arn": arn}])):
            with pytest.raises(VersionNotApproved) as refused:
                model_to_predict_with(config, GROUP, model, events)
            assert f"version {number} of {GROUP} ({arn})" in str(refused.value), refused.value
            assert f"is {status}: batch predictions use Approved versions only" in str(refused.value)
    assert model_to_predict_with(config, GROUP, "1", [])["model_package_arn"] == batch["version"]


def transform_request(batch, label: str) -> dict:
    """The DAG's request for one PNG, under a run id of its own."""
    from tasks.batch import transform_jobs
    from tasks.policy import TRANSFORM_INSTANCE_TYPE

    config = batch["config"]
    prefix = f"{batch['prefix']}-retry"
    s3 = boto3.client("s3", endpoint_url=batch["aws"])
    s3.put_object(Bucket=config.bucket, Key=f"{prefix}/one.png", Body=batch["files"]["one.png"])
    [model] = xcoms(batch["given"].run_id, "resolve_model")
    input_uri = f"s3://{config.bucket}/{prefix}/"
    [request] = transform_jobs(
        config,
        input_uri,
        model,
        f"retry-{label}",
        instance_type=TRANSFORM_INSTANCE_TYPE,
        max_concurrent=1,
        max_payload_mb=6,
    )
    return request


def transform_operator(request: dict):
    """The DAG's transform task as a retry runs it (no XCom here: no task instance to push to)."""
    import copy

    from tasks.operators import TransformOperator

    return TransformOperator(
        task_id="transform",
        config=copy.deepcopy(request),
        aws_conn_id="aws_default",
        region_name="us-east-1",
        check_interval=1,
        action_if_job_exists="timestamp",
        do_xcom_push=False,
    )


def jobs_named(sagemaker, name: str) -> list[str]:
    return sorted(
        job["TransformJobName"] for job in sagemaker.list_transform_jobs(NameContains=name)["TransformJobSummaries"]
    )


def test_a_retry_follows_the_transform_job_an_earlier_try_left_running_or_completed(batch, local_sagemaker):
    """A try killed before its on_kill could run leaves its job InProgress: the retry waits for it and passes on its
    result, and so does a retry after it Completed; also when the job is the provider's timestamped one, started by
    an earlier retry after the first job was stopped. No second job predicts the same files."""
    from tasks.earlier_jobs import TRANSFORM, timestamped

    sagemaker = boto3.client("sagemaker", endpoint_url=local_sagemaker)
    running, stopped = transform_request(batch, "running"), transform_request(batch, "renamed")
    sagemaker.create_transform_job(**running)
    sagemaker.create_transform_job(**stopped)
    sagemaker.stop_transform_job(TransformJobName=stopped["TransformJobName"])
    renamed = timestamped(stopped["TransformJobName"], TRANSFORM, 1700000000)
    sagemaker.create_transform_job(**{**stopped, "TransformJobName": renamed})

    for request, followed in ((running, running["TransformJobName"]), (stopped, renamed)):
        result = transform_operator(request).execute({})["Transform"]
        assert (result["TransformJobName"], result["TransformJobStatus"]) == (followed, "Completed")
    assert jobs_named(sagemaker, running["TransformJobName"]) == [running["TransformJobName"]]
    assert jobs_named(sagemaker, stopped["TransformJobName"]) == sorted([stopped["TransformJobName"], renamed])
    # A retry after the job completed: its predictions stand, nothing starts.
    again = transform_operator(running).execute({})["Transform"]
    assert again["TransformJobName"] == running["TransformJobName"]
    assert jobs_named(sagemaker, running["TransformJobName"]) == [running["TransformJobName"]]


def test_a_retry_starts_another_transform_job_only_after_a_stopped_one(batch, local_sagemaker):
    """Its earlier try's job Stopped (or Failed): the retry starts another, under the provider's timestamped name.
    A job that ends Stopped fails the task, where the provider's wait would pass it on."""
    import re

    from tasks.operators import TransformOperator

    sagemaker = boto3.client("sagemaker", endpoint_url=local_sagemaker)
    request = transform_request(batch, "stopped")
    name = request["TransformJobName"]
    sagemaker.create_transform_job(**request)
    sagemaker.stop_transform_job(TransformJobName=name)
    result = transform_operator(request).execute({})["Transform"]
    assert re.fullmatch(rf"{re.escape(name)}-\d{{10}}", result["TransformJobName"]), result["TransformJobName"]
    assert result["TransformJobStatus"] == "Completed"
    assert jobs_named(sagemaker, name) == sorted([name, result["TransformJobName"]])
    stopped = sagemaker.describe_transform_job(TransformJobName=name)
    assert stopped["TransformJobStatus"] == "Stopped"
    with pytest.raises(RuntimeError, match=f"SageMaker transform job {name} ended Stopped"):
        TransformOperator._ended_well({"Transform": stopped})
