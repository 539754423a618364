"""The SageMaker Python SDK v3, unchanged, against the local stack, as a user would drive it: pointed there by the
standard AWS_ENDPOINT_URL_* variables alone, with the SDK's own calls.

- ModelTrainer trains the project's training script with SourceCode: the SDK's drivers (its ``sm_drivers``
  channel, run by ``/bin/bash -c`` as a framework image runs them) set up the SM_* environment from the job's
  /opt/ml and run train.py; its role check (iam:SimulatePrincipalPolicy) refuses the shipped execution role, as AWS
  would, and passes a role with the permissions it asks for.
- Model, EndpointConfig and Endpoint deploy that model, answer (also as a response stream) and are deleted.
- ModelPackage.get_all reads a registry group whose versions are created as the pipeline creates them.
- HyperParameterTuningJob.get_all lists a tuning job whose static hyperparameters are JSON-encoded, as the SDK's
  framework estimators send them.

Two of the SDK 3.27 calls fail on AWS as here, in the SDK itself, and the boto3 client of the same session stands in
for them: Endpoint.invoke_with_response_stream (its response transform cannot read botocore's EventStream) and
ModelPackage.create (it reads a ModelPackageName that CreateModelPackage does not answer).

The SDK is imported inside the fixtures: its import takes seconds, which collection elsewhere should not pay.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import tarfile
import textwrap

import boto3
import pytest

from tests.conftest import EXECUTION_ROLE
from tests.helpers.jobs import put_script

BUCKET = "sdk-tests"
ACCOUNT = EXECUTION_ROLE.split(":")[4]
# What a user writes for a training role: the SDK's role check simulates the actions it grants on "*" (the ECR,
# CloudWatch and VPC ones of a training container), and the job reads and writes this bucket and logs.
TRAINER_ROLE = "sdk-model-trainer"
TRAINER_POLICY = {
    "Version": "2012-10-17",
    "Statement": [
        {
            "Effect": "Allow",
            "Action": ["s3:GetObject", "s3:PutObject", "s3:ListBucket"],
            "Resource": [f"arn:aws:s3:::{BUCKET}", f"arn:aws:s3:::{BUCKET}/*"],
        },
        {
            "Effect": "Allow",
            "Action": ["logs:CreateLogGroup", "logs:CreateLogStream", "logs:PutLogEvents", "logs:DescribeLogStreams"],
            "Resource": "arn:aws:logs:*:*:log-group:/aws/sagemaker/TrainingJobs*",
        },
        {
            "Effect": "Allow",
            "Action": [
                "ecr:GetAuthorizationToken",
                "cloudwatch:PutMetricData",
                "ec2:CreateNetworkInterface",
                "ec2:CreateNetworkInterfacePermission",
                "ec2:DeleteNetworkInterface",
                "ec2:DeleteNetworkInterfacePermission",
                "ec2:DescribeNetworkInterfaces",
                "ec2:DescribeVpcs",
                "ec2:DescribeDhcpOptions",
                "ec2:DescribeSubnets",
                "ec2:DescribeSecurityGroups",
            ],
            "Resource": "*",
        },
    ],
}
# A framework image, as a user names one; the local service runs the job's commands with its own Python.
IMAGE = "763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch-training:2.5-cpu-py311"
# The tuning job's stand-in for train.py: it succeeds only with its hyperparameters decoded as the training toolkit
# decodes them (JSON strings unquoted), and reports an objective.
TUNED_SCRIPT = textwrap.dedent(
    """
    import sys
    expected = ["--epochs", "1", "--hidden_channels", "4", "--optimizer", "adam"]
    if sys.argv[1:] != expected:
        sys.exit(f"arguments {sys.argv[1:]}, not {expected}")
    print("Test Accuracy: 97.50%;", flush=True)
    """
)


@pytest.fixture(scope="module")
def session(local_aws, local_sagemaker, local_sagemaker_runtime, small_mnist, tmp_path_factory):
    """A boto3 session as the SDK's user has one: the standard variables point every client at the stack; the
    SDK's own configuration is a file of the test's (no telemetry to AWS, nothing of the user's)."""
    config = tmp_path_factory.mktemp("sdk-config") / "config.yaml"
    config.write_text("SchemaVersion: '1.0'\nSageMaker:\n  PythonSDK:\n    Modules:\n      TelemetryOptOut: true\n")
    with pytest.MonkeyPatch.context() as patch:
        for name, value in {
            "AWS_ENDPOINT_URL": local_aws,
            "AWS_ENDPOINT_URL_SAGEMAKER": local_sagemaker,
            "AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME": local_sagemaker_runtime,
            "SAGEMAKER_USER_CONFIG_OVERRIDE": str(config),
            "SAGEMAKER_ADMIN_CONFIG_OVERRIDE": str(config),
        }.items():
            patch.setenv(name, value)
        session = boto3.Session()
        s3 = session.client("s3")
        s3.create_bucket(Bucket=BUCKET)
        for path in small_mnist.iterdir():
            s3.upload_file(str(path), BUCKET, f"mnist/{path.name}")
        yield session


@pytest.fixture(scope="module")
def trainer_role(session) -> str:
    iam = session.client("iam")
    trust = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": {"Service": "sagemaker.amazonaws.com"},
                "Action": "sts:AssumeRole",
                "Condition": {"StringEquals": {"aws:SourceAccount": ACCOUNT}},
            }
        ],
    }
    arn = iam.create_role(RoleName=TRAINER_ROLE, AssumeRolePolicyDocument=json.dumps(trust))["Role"]["Arn"]
    iam.put_role_policy(RoleName=TRAINER_ROLE, PolicyName="model-trainer", PolicyDocument=json.dumps(TRAINER_POLICY))
    return arn


@pytest.fixture(scope="module")
def tuning_job(session):
    """A tuning job of one stand-in training job in script mode, its static hyperparameters JSON-encoded; created
    first, so that it runs while the SDK trains."""
    from sagemaker.core import shapes
    from sagemaker.core.resources import HyperParameterTuningJob

    put_script(session.client("s3"), BUCKET, "tuning/sourcedir.tar.gz", TUNED_SCRIPT)
    static = {
        "epochs": 1,
        "optimizer": "adam",
        "sagemaker_program": "train.py",
        "sagemaker_submit_directory": f"s3://{BUCKET}/tuning/sourcedir.tar.gz",
    }
    data = shapes.S3DataSource(s3_data_type="S3Prefix", s3_uri=f"s3://{BUCKET}/mnist/")
    return HyperParameterTuningJob.create(
        hyper_parameter_tuning_job_name="sdk-tuning",
        hyper_parameter_tuning_job_config=shapes.HyperParameterTuningJobConfig(
            strategy="Random",
            hyper_parameter_tuning_job_objective=shapes.HyperParameterTuningJobObjective(
                type="Maximize", metric_name="test:accuracy"
            ),
            resource_limits=shapes.ResourceLimits(max_number_of_training_jobs=1, max_parallel_training_jobs=1),
            parameter_ranges=shapes.ParameterRanges(
                categorical_parameter_ranges=[shapes.CategoricalParameterRange(name="hidden_channels", values=["4"])]
            ),
        ),
        training_job_definition=shapes.HyperParameterTrainingJobDefinition(
            static_hyper_parameters={key: json.dumps(value) for key, value in static.items()},
            algorithm_specification=shapes.HyperParameterAlgorithmSpecification(
                training_image=IMAGE,
                training_input_mode="File",
                metric_definitions=[shapes.MetricDefinition(name="test:accuracy", regex=r"Test Accuracy: ([0-9.]+)%")],
            ),
            role_arn=EXECUTION_ROLE,
            input_data_config=[
                shapes.Channel(channel_name="training", data_source=shapes.DataSource(s3_data_source=data))
            ],
            output_data_config=shapes.OutputDataConfig(s3_output_path=f"s3://{BUCKET}/tuning-jobs"),
            resource_config=shapes.ResourceConfig(instance_type="ml.m5.xlarge", instance_count=1, volume_size_in_gb=1),
            stopping_condition=shapes.StoppingCondition(max_runtime_in_seconds=300),
        ),
        session=session,
    )


@pytest.fixture(scope="module")
def trained(session, trainer_role, tuning_job, tmp_path_factory):
    """ModelTrainer.train of the project's training script (the sourcedir the pipeline ships, as a directory),
    one epoch on the small set; the SDK's TrainingJob."""
    from sagemaker.core.helper.session_helper import Session
    from sagemaker.train import ModelTrainer
    from sagemaker.train.configs import Compute, InputData, SourceCode

    from tasks.training_jobs import sourcedir_files

    source = tmp_path_factory.mktemp("sdk-source")
    for name, path in sourcedir_files().items():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, source / name)
    trainer = ModelTrainer(
        training_image=IMAGE,
        source_code=SourceCode(source_dir=str(source), entry_script="train.py"),
        compute=Compute(instance_type="ml.m5.xlarge", instance_count=1),
        hyperparameters={"epochs": 1, "hidden_channels": 4},
        role=trainer_role,
        base_job_name="sdk-mnist",
        sagemaker_session=Session(boto_session=session, default_bucket=BUCKET),
    )
    trainer.train(
        input_data_config=[InputData(channel_name="training", data_source=f"s3://{BUCKET}/mnist/")],
        wait=True,
        logs=False,
    )
    return trainer._latest_training_job  # as the SDK's own ModelTrainer example reads it


def test_model_trainer_trains_the_projects_script_with_source_code(session, trainer_role, trained):
    from sagemaker.core.helper.iam_role_resolver import RoleValidationError
    from sagemaker.core.helper.session_helper import Session
    from sagemaker.train import ModelTrainer

    # The role check, as on AWS: the shipped execution role lacks the ECR and VPC actions it simulates.
    with pytest.raises(RoleValidationError, match=r"Missing permissions: .*ecr:GetAuthorizationToken"):
        ModelTrainer(
            training_image=IMAGE,
            role=EXECUTION_ROLE,
            sagemaker_session=Session(boto_session=session, default_bucket=BUCKET),
        )

    assert trained.training_job_status == "Completed", trained.failure_reason
    # The SDK's own contract ran: its entry point and its driver and code channels.
    assert trained.algorithm_specification.container_entrypoint == ["/bin/bash"]
    assert {"sm_drivers", "code", "training"} == {c.channel_name for c in trained.input_data_config}
    uri = trained.model_artifacts.s3_model_artifacts
    assert uri.endswith(f"/{trained.training_job_name}/output/model.tar.gz")
    bucket, key = uri.removeprefix("s3://").split("/", 1)
    with tarfile.open(
        fileobj=io.BytesIO(session.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read())
    ) as tar:
        assert {"model.pth", "model_config.json", "code/inference.py"} <= set(tar.getnames())
        # The hyperparameters reached train.py as arguments, through the SDK's drivers.
        assert json.load(tar.extractfile("model_config.json"))["kwargs"]["hidden_channels"] == 4
    # One account: STS's, IAM's and SageMaker's ARNs.
    assert session.client("sts").get_caller_identity()["Account"] == ACCOUNT
    assert trainer_role.split(":")[4] == trained.training_job_arn.split(":")[4] == ACCOUNT


def test_model_endpoint_config_and_endpoint_deploy_answer_and_are_deleted(session, trained, small_mnist):
    from sagemaker.core.resources import Endpoint, EndpointConfig, Model
    from sagemaker.core.shapes import ContainerDefinition, ProductionVariant

    from training.mnist_idx import load_mnist

    model = Model.create(
        model_name="sdk-model",
        primary_container=ContainerDefinition(image=IMAGE, model_data_url=trained.model_artifacts.s3_model_artifacts),
        execution_role_arn=EXECUTION_ROLE,
        session=session,
    )
    config = EndpointConfig.create(
        endpoint_config_name="sdk-config",
        production_variants=[
            ProductionVariant(
                variant_name="AllTraffic", model_name="sdk-model", initial_instance_count=1, instance_type="ml.m5.large"
            )
        ],
        session=session,
    )
    endpoint = Endpoint.create(endpoint_name="sdk-endpoint", endpoint_config_name="sdk-config", session=session)
    try:
        endpoint.wait_for_status("InService", poll=1, timeout=180)
        body = json.dumps({"instances": [load_mnist(small_mnist)["test_images"][0].tolist()]})
        answer = endpoint.invoke(body=body, content_type="application/json", session=session).body.read()
        [prediction] = json.loads(answer)["predictions"]
        assert 0 <= prediction["label"] <= 9 and len(prediction["probabilities"]) == 10
        stream = session.client("sagemaker-runtime").invoke_endpoint_with_response_stream(
            EndpointName="sdk-endpoint", Body=body, ContentType="application/json"
        )
        assert b"".join(event["PayloadPart"]["Bytes"] for event in stream["Body"]) == answer
    finally:
        with contextlib.suppress(Exception):  # what the test got to create goes, whatever failed
            endpoint.delete()
            endpoint.wait_for_delete(poll=1, timeout=60)
        config.delete()
        model.delete()
    assert "sdk-endpoint" not in {e.endpoint_name for e in Endpoint.get_all(session=session)}
    assert "sdk-config" not in {c.endpoint_config_name for c in EndpointConfig.get_all(session=session)}
    assert "sdk-model" not in {m.model_name for m in Model.get_all(session=session)}


def test_model_package_get_all_reads_a_registry_group(session, trained):
    from sagemaker.core.resources import ModelPackage, ModelPackageGroup

    ModelPackageGroup.create(model_package_group_name="sdk-registry", session=session)
    sagemaker = session.client("sagemaker")
    for status in ("PendingManualApproval", "Approved"):
        sagemaker.create_model_package(
            ModelPackageGroupName="sdk-registry",
            ModelApprovalStatus=status,
            InferenceSpecification={
                "Containers": [{"Image": IMAGE, "ModelDataUrl": trained.model_artifacts.s3_model_artifacts}],
                "SupportedContentTypes": ["application/json"],
                "SupportedResponseMIMETypes": ["application/json"],
            },
        )
    versions = ModelPackage.get_all(model_package_group_name="sdk-registry", session=session)
    assert [(p.model_package_version, p.model_approval_status, p.model_package_arn) for p in versions] == [
        (1, "PendingManualApproval", f"arn:aws:sagemaker:us-east-1:{ACCOUNT}:model-package/sdk-registry/1"),
        (2, "Approved", f"arn:aws:sagemaker:us-east-1:{ACCOUNT}:model-package/sdk-registry/2"),
    ]
    approved = ModelPackage.get_all(
        model_package_group_name="sdk-registry", model_approval_status="Approved", session=session
    )
    assert [p.model_package_version for p in approved] == [2]


def test_hyperparameter_tuning_job_get_all_lists_a_tuning_job_of_json_encoded_hyperparameters(session, tuning_job):
    from sagemaker.core.resources import HyperParameterTuningJob

    tuning_job.wait(poll=1, timeout=120)
    assert tuning_job.hyper_parameter_tuning_job_status == "Completed", tuning_job.failure_reason
    best = tuning_job.best_training_job
    assert (
        best.training_job_status == "Completed" and best.final_hyper_parameter_tuning_job_objective_metric.value == 97.5
    )
    listed = HyperParameterTuningJob.get_all(session=session)
    assert "sdk-tuning" in {job.hyper_parameter_tuning_job_name for job in listed}
