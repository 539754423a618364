"""The CreateTrainingJob requests: exact shape, valid for SageMaker's API model, deterministic names and code."""

import gzip
import hashlib
import io
import re
import tarfile

import boto3
import botocore.session
import pytest
from botocore.validate import validate_parameters

from tasks.config import load_config
from tasks.training_jobs import (
    METRIC_DEFINITIONS,
    build_sourcedir,
    build_training_job_request,
    sagemaker_name,
    sourcedir_files,
    sweep_requests,
    training_job_name,
    upload_sourcedir,
)
from tests.helpers.jobs import put_script, s3_channel, training, training_operator
from tests.helpers.polling import wait_until

SAGEMAKER = botocore.session.get_session().get_service_model("sagemaker")
NAME_PATTERN = re.compile(SAGEMAKER.shape_for("TrainingJobName").metadata["pattern"])
RUN_ID = "manual__2026-11-23T18:07:10.934072+00:00"
PARAMS = {
    "hidden_channels": [2, 32],
    "preset": "seed",
    "epochs": 2,
    "optimizer": "sgd",
    "lr": None,
    "batch_size": None,
    "dropout": 0.2,
    "kernel_size": 5,
    "instance_type": "ml.m5.xlarge",
    "instance_count": 1,
}


def request(**overrides) -> dict:
    arguments = {
        "job_name": training_job_name(RUN_ID, 10),
        "hyperparameters": {"hidden_channels": 10, "epochs": 2, "dropout": 0.2},
        "training_data_uri": "s3://bucket/mnist-sweep/datasets/mnist/abc/",
        "sourcedir_uri": "s3://bucket/mnist-sweep/code/def/sourcedir.tar.gz",
        "output_uri": "s3://bucket/mnist-sweep/training-jobs",
        "role_arn": "arn:aws:iam::123456789012:role/sagemaker",
        "region": "eu-west-1",
        "instance_type": "ml.g5.xlarge",
        "instance_count": 2,
        "experiment_name": "mnist-sweep",
        "trial_name": "manual-2026",
        "tags": {"run_id": RUN_ID},
    }
    return build_training_job_request(**(arguments | overrides))


@pytest.mark.long  # importing the SDK alone takes half a minute here: make test-long
def test_the_images_are_the_ones_the_sagemaker_sdk_names_in_every_region():
    """tasks.images reads the SDK's own image table instead of importing the SDK: the same URI as the SDK's
    image_uris.retrieve for both scopes, CPU and GPU instances, in every region the table holds, and the SDK's refusal
    of a region it does not (checked in a child process, so that no other test imports the SDK by the way)."""
    import json
    import subprocess
    import sys

    from tasks.images import FRAMEWORK_VERSION, PY_VERSION, _table, pytorch_image_uri

    cases = [
        (region, instance_type, scope)
        for scope in ("training", "inference")
        for region in sorted(
            _table()[scope]["versions"][_table()[scope]["version_aliases"][FRAMEWORK_VERSION]]["registries"]
        )
        for instance_type in ("ml.m5.large", "ml.c5.xlarge", "ml.g5.xlarge", "ml.p3.2xlarge")
    ]
    code = (
        "import json, sys\n"
        "from sagemaker.core import image_uris\n"
        "cases = json.loads(sys.stdin.read())\n"
        "print(json.dumps([image_uris.retrieve(framework='pytorch', region=r, version=sys.argv[1], "
        "py_version=sys.argv[2], instance_type=i, image_scope=s) for r, i, s in cases]))\n"
    )
    sdk = subprocess.run(
        [sys.executable, "-c", code, FRAMEWORK_VERSION, PY_VERSION],
        input=json.dumps(cases),
        capture_output=True,
        text=True,
        check=True,
    )
    expected = json.loads(sdk.stdout.strip().splitlines()[-1])
    assert len(cases) > 100
    assert [pytorch_image_uri(*case) for case in cases] == expected
    assert "sagemaker" not in sys.modules or "sagemaker.core.image_uris" not in sys.modules  # read, not imported
    with pytest.raises(ValueError, match="Unsupported region: mars-west-1"):
        pytorch_image_uri("mars-west-1", "ml.m5.large")
    with pytest.raises(ValueError, match=r"Invalid SageMaker instance type: m5\.large"):
        pytorch_image_uri("us-east-1", "m5.large")


def test_request_has_the_exact_shape():
    built = request()
    assert built == {
        "TrainingJobName": "manual-2026-11-23t18-07-10-934072-00-00-hc10-" + built["TrainingJobName"][-8:],
        "AlgorithmSpecification": {
            "TrainingImage": "763104351884.dkr.ecr.eu-west-1.amazonaws.com/pytorch-training:2.6-gpu-py312",
            "TrainingInputMode": "File",
            "MetricDefinitions": [
                {"Name": "train:loss", "Regex": "Train Loss: (.*?);"},
                {"Name": "test:loss", "Regex": "Test Average loss: (.*?),"},
                {"Name": "test:accuracy", "Regex": "Test Accuracy: (.*?)%;"},
            ],
            "EnableSageMakerMetricsTimeSeries": True,
        },
        "HyperParameters": {
            "hidden_channels": "10",
            "epochs": "2",
            "dropout": "0.2",
            "sagemaker_program": "train.py",
            "sagemaker_submit_directory": "s3://bucket/mnist-sweep/code/def/sourcedir.tar.gz",
            "sagemaker_region": "eu-west-1",
        },
        "InputDataConfig": [s3_channel("training", "s3://bucket/mnist-sweep/datasets/mnist/abc/")],
        "OutputDataConfig": {"S3OutputPath": "s3://bucket/mnist-sweep/training-jobs"},
        "ResourceConfig": {"InstanceType": "ml.g5.xlarge", "InstanceCount": 2, "VolumeSizeInGB": 10},
        "StoppingCondition": {"MaxRuntimeInSeconds": 7200},
        "RoleArn": "arn:aws:iam::123456789012:role/sagemaker",
        "ExperimentConfig": {"ExperimentName": "mnist-sweep", "TrialName": "manual-2026"},
        "Tags": [{"Key": "run_id", "Value": RUN_ID}],
    }
    assert request(instance_type="ml.m5.xlarge")["AlgorithmSpecification"]["TrainingImage"].endswith("2.6-cpu-py312")


def test_request_passes_the_sagemaker_api_model():
    validate_parameters(request(), SAGEMAKER.operation_model("CreateTrainingJob").input_shape)
    with pytest.raises(botocore.exceptions.ParamValidationError, match="InstanceCount"):
        validate_parameters(request(instance_count="2"), SAGEMAKER.operation_model("CreateTrainingJob").input_shape)


def test_a_stubbed_client_accepts_the_request():
    """botocore's own client-side validation, as the provider's hook calls create_training_job(**request)."""
    from botocore.stub import Stubber

    client = boto3.client("sagemaker", region_name="eu-west-1")
    with Stubber(client) as stub:
        stub.add_response("create_training_job", {"TrainingJobArn": "arn:aws:sagemaker:::training-job/x"}, request())
        client.create_training_job(**request())


@pytest.mark.parametrize(
    "run_id",
    [RUN_ID, "scheduled__2026-01-01T00:00:00+00:00", "x" * 250, "__--..", "manual__ü/ñ:é"],
)
@pytest.mark.parametrize("hidden_channels", [1, 32, 256])
def test_job_names_are_valid_deterministic_and_distinct(run_id, hidden_channels):
    name = training_job_name(run_id, hidden_channels)
    assert NAME_PATTERN.fullmatch(name) and len(name) <= 63
    assert name == training_job_name(run_id, hidden_channels)
    assert name.endswith(f"hc{hidden_channels}-{hashlib.sha1(run_id.encode()).hexdigest()[:8]}")
    assert name != training_job_name(run_id + "1", hidden_channels)
    assert name != training_job_name(run_id, hidden_channels + 1)


def test_runs_differing_only_in_refused_characters_get_distinct_names():
    assert training_job_name("run:1+2", 5) != training_job_name("run-1-2", 5)
    assert sagemaker_name("Mnist_Sweep", max_length=120) == "mnist-sweep"
    with pytest.raises(ValueError, match="cannot fit"):
        sagemaker_name("a", "b" * 70)


def test_sweep_requests_carry_only_the_params_that_are_set(local_sagemaker, local_aws, tmp_path):
    config = load_config(bucket="sweep-requests", state_dir=str(tmp_path))
    boto3.client("s3", endpoint_url=local_aws).create_bucket(Bucket=config.bucket)
    requests = sweep_requests(PARAMS, config=config, dag_id="mnist_sweep", run_id=RUN_ID, dataset_uri="s3://b/d/")
    assert [r["HyperParameters"]["hidden_channels"] for r in requests] == ["2", "32"]
    hyperparameters = requests[0]["HyperParameters"]
    assert {key for key in hyperparameters if not key.startswith("sagemaker_")} == {
        "hidden_channels",
        "preset",
        "epochs",
        "optimizer",
        "dropout",
        "kernel_size",
    }
    assert hyperparameters["sagemaker_submit_directory"] == upload_sourcedir(config)
    assert requests[0]["ExperimentConfig"] == requests[1]["ExperimentConfig"]
    assert requests[0]["ExperimentConfig"]["ExperimentName"] == "mnist-sweep"
    assert requests[0]["OutputDataConfig"]["S3OutputPath"] == f"{config.s3_root}/training-jobs"
    assert {tag["Key"]: tag["Value"] for tag in requests[1]["Tags"]}["hidden_channels"] == "32"
    for built in requests:
        validate_parameters(built, SAGEMAKER.operation_model("CreateTrainingJob").input_shape)
    # The experiment (the DAG) and the trial (the run) exist, once: a second call finds them.
    sagemaker = boto3.client("sagemaker", endpoint_url=local_sagemaker)
    trial = requests[0]["ExperimentConfig"]["TrialName"]
    assert sagemaker.describe_trial(TrialName=trial)["ExperimentName"] == "mnist-sweep"
    sweep_requests(PARAMS, config=config, dag_id="mnist_sweep", run_id=RUN_ID, dataset_uri="s3://b/d/")


def test_sourcedir_holds_training_and_the_handler_and_is_reproducible():
    first, second = build_sourcedir(), build_sourcedir()
    assert first == second
    assert gzip.decompress(first)  # a plain gzip stream, as SageMaker's container unpacks it
    with tarfile.open(fileobj=io.BytesIO(first)) as archive:
        members = archive.getmembers()
        names = [member.name for member in members]
        assert {"mnist_idx.py", "inference.py"} <= set(names)
        assert names == sorted(names)
        assert all(m.mtime == 0 and m.uid == 0 and m.mode == 0o644 and m.isfile() for m in members)
        assert not any("__pycache__" in name or name.endswith(".pyc") for name in names)
        files = sourcedir_files()
        assert archive.extractfile("inference.py").read() == files["inference.py"].read_bytes()


def test_sourcedir_upload_is_content_addressed_and_skipped_when_present(local_aws, tmp_path, caplog):
    config = load_config(bucket="code-upload", state_dir=str(tmp_path))
    s3 = boto3.client("s3", endpoint_url=local_aws)
    s3.create_bucket(Bucket=config.bucket)
    body = build_sourcedir()
    uri = upload_sourcedir(config)
    assert uri == f"s3://code-upload/mnist-sweep/code/{hashlib.sha256(body).hexdigest()}/sourcedir.tar.gz"
    stored = s3.get_object(Bucket=config.bucket, Key=uri.split("/", 3)[3])
    assert stored["Body"].read() == body
    with caplog.at_level("INFO", logger="tasks.s3"):
        assert upload_sourcedir(config) == uri
    assert "already in S3" in caplog.text


def test_metric_definitions_parse_the_seed_log_lines():
    lines = {
        "train:loss": "Train Epoch: 1 [6400/60000 (11%)], Train Loss: 1.617049;",
        "test:loss": "Test Average loss: 0.0912, Test Accuracy: 97.14%;",
        "test:accuracy": "Test Average loss: 0.0912, Test Accuracy: 97.14%;",
    }
    values = {d["Name"]: re.search(d["Regex"], lines[d["Name"]]).group(1) for d in METRIC_DEFINITIONS}
    assert values == {"train:loss": "1.617049", "test:loss": "0.0912", "test:accuracy": "97.14"}


def test_resources_outside_the_configuration_are_refused_naming_the_param(tmp_path):
    """One form submission cannot start instances the administrator did not allow, nor too many of them."""
    from tasks.training_jobs import RequestRefused

    config = load_config(
        state_dir=str(tmp_path), allowed_instance_types="ml.m5.xlarge, ml.g5.xlarge", max_instances_per_run=8
    )
    for changes, message in (
        (
            {"instance_type": "ml.p4d.24xlarge"},
            "instance_type ml.p4d.24xlarge is not allowed here: one of ml.m5.xlarge, "
            "ml.g5.xlarge (the allowed_instance_types setting)",
        ),
        (
            {"instance_count": 5},
            "instance_count 5 x 2 hidden_channels values = 10 instances, over the 8 a run may "
            "start (the max_instances_per_run setting)",
        ),
    ):
        with pytest.raises(RequestRefused, match=re.escape(message)):
            sweep_requests({**PARAMS, **changes}, config=config, dag_id="d", run_id=RUN_ID, dataset_uri="s3://b/d/")


def test_kms_and_vpc_are_optional_settings_of_the_request():
    """On AWS a training job may take a KMS key for its outputs and volumes, and a VPC (both subnets and groups)."""
    from tasks.training_jobs import RequestRefused

    plain = request()
    assert "VpcConfig" not in plain and "KmsKeyId" not in plain["OutputDataConfig"]
    key = "arn:aws:kms:eu-west-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    built = request(kms_key_id=key, subnets=["subnet-0a1b2c3d"], security_group_ids=["sg-0a1b2c3d"])
    assert built["OutputDataConfig"]["KmsKeyId"] == built["ResourceConfig"]["VolumeKmsKeyId"] == key
    assert built["VpcConfig"] == {"Subnets": ["subnet-0a1b2c3d"], "SecurityGroupIds": ["sg-0a1b2c3d"]}
    assert built["EnableNetworkIsolation"] is True
    validate_parameters(built, SAGEMAKER.operation_model("CreateTrainingJob").input_shape)
    with pytest.raises(RequestRefused, match="a VPC needs both subnets and security_group_ids"):
        request(subnets=["subnet-0a1b2c3d"])
    config = load_config(kms_key_id=key, subnets="subnet-1, subnet-2", security_group_ids="sg-1")
    assert (config.vpc_subnets, config.vpc_security_groups) == (("subnet-1", "subnet-2"), ("sg-1",))


def test_a_planted_object_at_the_codes_address_is_refused_by_name_and_left_alone(local_aws, tmp_path):
    from tasks.s3 import ContentAddressError

    config = load_config(bucket="planted-code", state_dir=str(tmp_path))
    s3 = boto3.client("s3", endpoint_url=local_aws)
    s3.create_bucket(Bucket=config.bucket)
    uri = upload_sourcedir(config)
    assert upload_sourcedir(config) == uri  # there, intact: nothing written
    key = uri.removeprefix(f"s3://{config.bucket}/")
    s3.put_object(Bucket=config.bucket, Key=key, Body=b"someone else's code")
    with pytest.raises(ContentAddressError, match=rf"{key} does not hold the body its address names"):
        upload_sourcedir(config)
    assert s3.get_object(Bucket=config.bucket, Key=key)["Body"].read() == b"someone else's code"


# -- a retry of the sweep's train task follows its earlier try's job (tasks.operators, tasks.earlier_jobs) ---

RETRY_BUCKET = "training-retries"
# A stand-in train.py: the first try's job (its name not yet suffixed with the time) hangs until stopped, and on
# SIGTERM takes seconds to end, as a job that saves its state does: long enough to be found Stopping.
RETRY_SCRIPT = """
import os, re, signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: (time.sleep(3), sys.exit(1)))
first = not re.search(r"-[0-9]{10}$", os.environ["TRAINING_JOB_NAME"])
if "--hang_first" in sys.argv and first:
    time.sleep(120)
"""


def retry_request(name: str, **hyperparameters) -> dict:
    built = build_training_job_request(
        job_name=name,
        hyperparameters=hyperparameters,
        training_data_uri=f"s3://{RETRY_BUCKET}/data/",
        sourcedir_uri=f"s3://{RETRY_BUCKET}/code/sourcedir.tar.gz",
        output_uri=f"s3://{RETRY_BUCKET}/jobs",
        role_arn=load_config().role_arn,
        region="us-east-1",
        instance_type="ml.m5.large",
        instance_count=1,
        experiment_name="e",
        trial_name="t",
        tags={},
    )
    built.pop("ExperimentConfig")  # no experiment here: this is about the job
    return built


def test_a_training_retry_waits_out_a_stopping_job_starts_another_and_then_follows_that_one(
    local_sagemaker, local_aws, capfd
):
    """The first try's job Stopping: the retry waits it out; the job Stopped, the provider starts another under its
    timestamped name. A retry after that one Completed: it is the result, nothing else trains. A job of the same name
    with other hyperparameters is not the request's. (InProgress: test_service_training.)"""
    import copy
    import time

    from tasks.operators import TrainingOperator

    s3 = boto3.client("s3", endpoint_url=local_aws)
    s3.create_bucket(Bucket=RETRY_BUCKET)
    put_script(s3, RETRY_BUCKET, "code/sourcedir.tar.gz", RETRY_SCRIPT)
    s3.put_object(Bucket=RETRY_BUCKET, Key="data/digits", Body=b"0123456789")
    sagemaker = boto3.client("sagemaker", endpoint_url=local_sagemaker)
    sent = retry_request("retry-stopping", hang_first=1)

    def retry() -> dict:
        return training_operator(copy.deepcopy(sent), action_if_job_exists="timestamp").execute({})["Training"]

    def named() -> list[str]:
        return sorted(
            job["TrainingJobName"]
            for job in sagemaker.list_training_jobs(NameContains="retry-stopping")["TrainingJobSummaries"]
        )

    sagemaker.create_training_job(**sent)  # what the killed try started
    wait_until(lambda: training(sagemaker, "retry-stopping"), timeout=60)
    time.sleep(1)  # the script's SIGTERM handler is in place
    sagemaker.stop_training_job(TrainingJobName="retry-stopping")
    capfd.readouterr()
    result = retry()
    # The task's log, as Airflow's logging writes it here.
    assert "retry-stopping of an earlier try is Stopping: waiting it out" in "".join(capfd.readouterr())
    renamed = result["TrainingJobName"]
    assert re.fullmatch(r"retry-stopping-\d{10}", renamed) and result["TrainingJobStatus"] == "Completed", result
    assert sagemaker.describe_training_job(TrainingJobName="retry-stopping")["TrainingJobStatus"] == "Stopped"
    assert named() == ["retry-stopping", renamed]

    again = retry()
    assert (again["TrainingJobName"], again["TrainingJobStatus"]) == (renamed, "Completed")
    assert named() == ["retry-stopping", renamed]
    other = TrainingOperator(task_id="train", config=retry_request("retry-stopping", hang_first=1, epochs=2))
    assert not other.same_request(sagemaker.describe_training_job(TrainingJobName=renamed))  # it would train anew
