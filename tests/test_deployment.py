"""The deploy requests: valid for SageMaker's API model, names unique per run, the artifact's handler named."""

import re

import botocore.session
from botocore.validate import validate_parameters

from tasks.config import load_config
from tasks.deployment import endpoint_config_name, sagemaker_deploy_requests

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
