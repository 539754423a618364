"""Deployment: the requests (valid for SageMaker's API model, names unique per run, the handler named), when a run
deploys, and the sagemaker backend's create-or-update against moto, where a retry finds its first try's work.

The local backend's create-or-update, blue/green under load and retries are tests/test_local_endpoints.py's."""

import json
import logging
import re
import uuid

import boto3
import botocore.session
import pytest
from botocore.exceptions import ClientError
from botocore.validate import validate_parameters

from tasks.config import load_config
from tasks.deployment import deploy, endpoint_config_name, sagemaker_deploy_requests, wanted
from tasks.local_aws import connection_uri

SAGEMAKER = botocore.session.get_session().get_service_model("sagemaker")
BEST = {
    "training_job_name": "manual-2026-11-23t18-07-10-hc10-1a2b3c4d",
    "hidden_channels": 10,
    "model_data_url": "s3://bucket/mnist-sweep/training-jobs/x/output/model.tar.gz",
}


def test_deploy_requests_pass_the_api_model():
    requests = sagemaker_deploy_requests(BEST, endpoint_name="mnist-classifier", run_id="run-1", config=load_config())
    for operation, key in (("CreateModel", "model"), ("CreateEndpointConfig", "endpoint_config"),
                           ("CreateEndpoint", "endpoint")):  # fmt: skip
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


@pytest.mark.parametrize(
    ("enabled", "allowed", "logged"),
    [
        (True, True, None),
        (False, True, "Deployment skipped: the deploy param is off for this run"),
        (True, False, "Deployment skipped: the gate refused the model: best test accuracy 0.8000 is below"),
    ],
)
def test_deployment_is_wanted_when_the_param_and_the_gate_say_so(enabled, allowed, logged, caplog):
    decision = {"deploy": allowed, "reason": "best test accuracy 0.8000 is below min_test_accuracy 0.9000"}
    with caplog.at_level(logging.INFO, logger="tasks.deployment"):
        assert wanted(decision, enabled) is (enabled and allowed)
    assert (logged in caplog.text) if logged else caplog.text == ""


@pytest.fixture
def sagemaker_config(local_aws, monkeypatch):
    """The sagemaker backend against moto, through a connection without retries (moto answers UpdateEndpoint 500)."""
    connection = json.loads(connection_uri(local_aws))
    connection["extra"]["config_kwargs"] = {"retries": {"total_max_attempts": 1}}
    monkeypatch.setenv("AIRFLOW_CONN_AWS_MOTO_ONCE", json.dumps(connection))
    return load_config(backend="sagemaker", aws_conn_id="aws_moto_once")


def _best(run: str) -> dict:
    return {**BEST, "training_job_name": f"{run}-hc10-1a2b3c4d", "model_data_url": f"s3://bucket/{run}/model.tar.gz"}


def test_sagemaker_deploy_creates_once_per_run_and_a_retry_changes_nothing(sagemaker_config, local_aws):
    endpoint, run = f"dep-{uuid.uuid4().hex[:8]}", f"run-{uuid.uuid4().hex[:8]}"
    first_try = {"deploy": True, "serving_endpoint_config_name": None}
    deployed = deploy(_best(run), first_try, endpoint_name=endpoint, run_id=run, config=sagemaker_config,
                      check_interval=0)  # fmt: skip
    assert deployed == {
        "endpoint_name": endpoint,
        "endpoint_config_name": endpoint_config_name(endpoint, run),
        "model_data_url": f"s3://bucket/{run}/model.tar.gz",
        "previous_endpoint_config_name": None,
        "created": True,
        "runtime_url": None,
    }
    # A retry: moto, like SageMaker, refuses to create a model or an endpoint config twice.
    again = deploy(_best(run), first_try, endpoint_name=endpoint, run_id=run, config=sagemaker_config,
                   check_interval=0)  # fmt: skip
    assert again == deployed

    sagemaker = boto3.client("sagemaker", endpoint_url=local_aws)
    # Counted by name here: moto's ListModels ignores NameContains, and other tests share this moto server.
    models = [m["ModelName"] for page in sagemaker.get_paginator("list_models").paginate() for m in page["Models"]]
    assert sum(run in name for name in models) == 1
    configs = sagemaker.list_endpoint_configs(NameContains=endpoint)["EndpointConfigs"]
    assert [c["EndpointConfigName"] for c in configs] == [endpoint_config_name(endpoint, run)]
    described = sagemaker.describe_endpoint(EndpointName=endpoint)
    assert (described["EndpointStatus"], described["EndpointConfigName"]) == (
        "InService",
        deployed["endpoint_config_name"],
    )


def test_sagemaker_deploy_of_a_later_run_updates_the_endpoint(sagemaker_config, local_aws):
    endpoint, first, second = (
        f"dep-{uuid.uuid4().hex[:8]}",
        f"run-{uuid.uuid4().hex[:8]}",
        f"run-{uuid.uuid4().hex[:8]}",
    )
    served = deploy(_best(first), {"serving_endpoint_config_name": None}, endpoint_name=endpoint, run_id=first,
                    config=sagemaker_config, check_interval=0)  # fmt: skip
    # moto 5.2.5 has no UpdateEndpoint (it answers 500): the request leaves validated by botocore and reaches the
    # server; on AWS the endpoint switches blue/green. The run's model and endpoint config are made first.
    with pytest.raises(ClientError, match=r"calling the UpdateEndpoint operation"):
        deploy(_best(second), {"serving_endpoint_config_name": served["endpoint_config_name"]}, endpoint_name=endpoint,
               run_id=second, config=sagemaker_config, check_interval=0)  # fmt: skip
    sagemaker = boto3.client("sagemaker", endpoint_url=local_aws)
    config = sagemaker.describe_endpoint_config(EndpointConfigName=endpoint_config_name(endpoint, second))
    assert config["ProductionVariants"][0]["ModelName"] == _best(second)["training_job_name"]
    assert sagemaker.describe_endpoint(EndpointName=endpoint)["EndpointConfigName"] == served["endpoint_config_name"]
