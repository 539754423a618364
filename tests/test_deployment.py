"""Deployment: the requests (valid for SageMaker's API model, names unique per run, the handler named), when a run
deploys, and create-or-update through the provider's hook against the local SageMaker service, where a retry finds
its first try's work and a later run updates the endpoint blue/green.

Blue/green under load and traffic shifting are tests/test_service_endpoints.py's."""

import re
import uuid

import boto3
import botocore.session
import pytest
from botocore.validate import validate_parameters

from tasks.config import load_config
from tasks.deployment import (
    RolledBack,
    deployment_config,
    endpoint_config_name,
    roll_out,
    sagemaker_deploy_requests,
    wait_settled,
)
from tests.helpers.endpoints import model_artifacts, pack

SAGEMAKER = botocore.session.get_session().get_service_model("sagemaker")
BEST = {
    "training_job_name": "manual-2026-11-23t18-07-10-hc10-1a2b3c4d",
    "hidden_channels": 10,
    "model_data_url": "s3://bucket/mnist-sweep/models/0123/model.tar.gz",
    "test_accuracy": 0.9714,
}


def test_deploy_requests_pass_the_api_model():
    requests = sagemaker_deploy_requests(BEST, endpoint_name="mnist-classifier", run_id="run-1", config=load_config())
    for operation, key in (
        ("CreateModel", "model"),
        ("CreateEndpointConfig", "endpoint_config"),
        ("CreateEndpoint", "endpoint"),
    ):
        validate_parameters(requests[key], SAGEMAKER.operation_model(operation).input_shape)
    model = requests["model"]
    assert model["ModelName"] == BEST["training_job_name"]
    assert model["PrimaryContainer"]["ModelDataUrl"] == BEST["model_data_url"]
    assert model["PrimaryContainer"]["Image"].endswith("/pytorch-inference:2.6-cpu-py312")
    assert model["PrimaryContainer"]["Environment"]["SAGEMAKER_SUBMIT_DIRECTORY"] == "/opt/ml/model/code"
    [variant] = requests["endpoint_config"]["ProductionVariants"]
    assert variant["ModelName"] == model["ModelName"]
    assert requests["endpoint"]["EndpointConfigName"] == requests["endpoint_config"]["EndpointConfigName"]


def test_endpoint_config_names_are_valid_and_unique_per_run():
    pattern = re.compile(SAGEMAKER.shape_for("EndpointConfigName").metadata["pattern"])
    names = {endpoint_config_name(endpoint, run) for endpoint in ("e", "x" * 63) for run in ("run-1", "run-2")}
    assert len(names) == 4
    assert all(pattern.fullmatch(name) and len(name) <= 63 for name in names)
    assert endpoint_config_name("e", "run-1") == endpoint_config_name("e", "run-1")


@pytest.fixture(scope="module")
def artifacts(local_sagemaker, local_aws, small_mnist, tmp_path_factory) -> dict:
    """Two real model artifacts in the local S3, as training jobs leave them."""
    built = model_artifacts(small_mnist, tmp_path_factory.getbasetemp() / "model-artifacts")
    s3 = boto3.client("s3", endpoint_url=local_aws)
    s3.create_bucket(Bucket="deployment")
    packed = tmp_path_factory.mktemp("deployment-artifacts")
    for kind in ("good", "shuffled"):
        s3.upload_file(str(pack(built[kind], packed / f"{kind}.tar.gz")), "deployment", f"{kind}/model.tar.gz")
    return {kind: f"s3://deployment/{kind}/model.tar.gz" for kind in ("good", "shuffled")}


def _best(run: str, model_data_url: str) -> dict:
    return {**BEST, "training_job_name": f"{run}-hc10-1a2b3c4d", "model_data_url": model_data_url}


def _deploy(config, run: str, model_data_url: str, endpoint: str, previous: str | None = None, **options) -> dict:
    """The deploy task on ``run``'s best model (at ``model_data_url``), checking the endpoint every second."""
    return roll_out(
        _best(run, model_data_url),
        previous_endpoint_config_name=previous,
        endpoint_name=endpoint,
        run_id=run,
        config=config,
        check_interval=1,
        **options,
    )


def _endpoint_and_two_runs() -> tuple[str, str, str]:
    return f"dep-{uuid.uuid4().hex[:8]}", f"run-{uuid.uuid4().hex[:8]}", f"run-{uuid.uuid4().hex[:8]}"


def test_deploy_creates_once_per_run_and_a_retry_changes_nothing(artifacts, local_sagemaker):
    endpoint, run = f"dep-{uuid.uuid4().hex[:8]}", f"run-{uuid.uuid4().hex[:8]}"
    config = load_config()
    deployed = _deploy(config, run, artifacts["good"], endpoint)
    assert deployed == {
        "endpoint_name": endpoint,
        "endpoint_config_name": endpoint_config_name(endpoint, run),
        "model_data_url": artifacts["good"],
        "previous_endpoint_config_name": None,
        "created": True,
        "deployment_config": None,  # a new endpoint has no traffic to shift
        "baking": False,
    }
    # A retry: SageMaker refuses to create a model or an endpoint config twice, and the deploy finds them.
    again = _deploy(config, run, artifacts["good"], endpoint)
    assert again == deployed

    sagemaker = boto3.client("sagemaker", endpoint_url=local_sagemaker)
    assert [m["ModelName"] for m in sagemaker.list_models(NameContains=run)["Models"]] == [f"{run}-hc10-1a2b3c4d"]
    configs = sagemaker.list_endpoint_configs(NameContains=endpoint)["EndpointConfigs"]
    assert [c["EndpointConfigName"] for c in configs] == [endpoint_config_name(endpoint, run)]
    described = sagemaker.describe_endpoint(EndpointName=endpoint)
    assert (described["EndpointStatus"], described["EndpointConfigName"]) == (
        "InService",
        deployed["endpoint_config_name"],
    )
    sagemaker.delete_endpoint(EndpointName=endpoint)


def test_deploy_of_a_later_run_updates_the_endpoint(artifacts, local_sagemaker):
    endpoint, first, second = _endpoint_and_two_runs()
    config = load_config()
    served = _deploy(config, first, artifacts["good"], endpoint)
    traffic = {"traffic_shift": "linear", "percent": 50, "wait_seconds": 1, "bake_seconds": 3}
    thresholds = {"max_5xx_rate": 0.05, "min_rate_requests": 100, "alarm_p99_model_latency_ms": 5000}
    updated = _deploy(
        config,
        second,
        artifacts["shuffled"],
        endpoint,
        served["endpoint_config_name"],
        traffic=traffic,
        alarm_thresholds=thresholds,
    )
    assert updated["created"] is False and updated["previous_endpoint_config_name"] == served["endpoint_config_name"]
    # It returns once the new model takes all the traffic, in its bake (the monitoring check runs then).
    assert updated["baking"] is True
    sagemaker = boto3.client("sagemaker", endpoint_url=local_sagemaker)
    baking = sagemaker.describe_endpoint(EndpointName=endpoint)
    assert baking["EndpointStatus"] == "Updating"
    pending = baking["PendingDeploymentSummary"]
    assert pending["EndpointConfigName"] == updated["endpoint_config_name"]
    assert [status["Status"] for status in pending["ProductionVariants"][0]["VariantStatus"]] == ["Baking"]
    described = wait_settled(config, endpoint, timeout=60, delay=0.2)
    assert (described["EndpointStatus"], described["EndpointConfigName"]) == (
        "InService",
        updated["endpoint_config_name"],
    )
    # Linear steps of half the capacity, guarded by the endpoint's own alarms, made before the update.
    sent = described["LastDeploymentConfig"]
    assert sent == updated["deployment_config"]
    assert sent["BlueGreenUpdatePolicy"]["TrafficRoutingConfiguration"] == {
        "Type": "LINEAR",
        "WaitIntervalInSeconds": 1,
        "LinearStepSize": {"Type": "CAPACITY_PERCENT", "Value": 50},
    }
    assert [a["AlarmName"] for a in sent["AutoRollbackConfiguration"]["Alarms"]] == [
        f"{endpoint}-invocation-5xx-errors",
        f"{endpoint}-model-latency-p99",
    ]
    sagemaker.delete_endpoint(EndpointName=endpoint)


@pytest.mark.parametrize("shift", ["all_at_once", "canary", "linear"])
def test_deployment_configs_pass_the_api_model(shift):
    built = deployment_config(shift, percent=25, wait_seconds=30, bake_seconds=60, alarms=["a-5xx", "a-p99"])
    validate_parameters(
        {"EndpointName": "e", "EndpointConfigName": "c", "DeploymentConfig": built},
        SAGEMAKER.operation_model("UpdateEndpoint").input_shape,
    )
    # SageMaker ends the update by then: the fleet's launch, 30 s after each step but the last (none, the canary,
    # three of four linear steps of 25%), then the 60 s bake.
    waits = {"all_at_once": 0, "canary": 30, "linear": 90}[shift]
    assert built["BlueGreenUpdatePolicy"]["MaximumExecutionTimeoutInSeconds"] == 600 + waits + 60
    with pytest.raises(ValueError, match="traffic_shift 'sideways' is not one of all_at_once, canary, linear"):
        deployment_config("sideways")


def test_a_deploy_whose_update_cannot_come_up_fails_naming_why(artifacts, local_sagemaker, local_aws):
    boto3.client("s3", endpoint_url=local_aws).put_object(Bucket="deployment", Key="broken/model.tar.gz", Body=b"x")
    endpoint, first, second = _endpoint_and_two_runs()
    config = load_config()
    served = _deploy(config, first, artifacts["good"], endpoint)
    with pytest.raises(RolledBack, match=r"serves config .*, not .*: Failed to update endpoint"):
        _deploy(config, second, "s3://deployment/broken/model.tar.gz", endpoint, served["endpoint_config_name"])
    sagemaker = boto3.client("sagemaker", endpoint_url=local_sagemaker)
    assert sagemaker.describe_endpoint(EndpointName=endpoint)["EndpointConfigName"] == served["endpoint_config_name"]
    sagemaker.delete_endpoint(EndpointName=endpoint)
