"""Serving the selected model: create the endpoint, or update it blue/green, on either backend.

One request builder (`sagemaker_deploy_requests`: CreateModel / CreateEndpointConfig / CreateEndpoint) and one
entry point, `deploy`: the sagemaker backend sends those requests through the provider's SageMakerHook, the local
backend serves the same artifact with tasks.local_endpoints (a local server speaking the SageMaker container
contract). Model and endpoint config names derive from the run id: unique per run, the same on a retry, so a
retried or re-run deploy finds what its first try made instead of making it twice. Endpoint configs are never
deleted: the monitoring check rolls back to the previous one.

Imported by the DAG at parse time: sagemaker and the provider's hooks are imported inside the functions.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from tasks.config import PipelineConfig
from tasks.training_jobs import pytorch_image_uri, sagemaker_name

log = logging.getLogger(__name__)

VARIANT_NAME = "AllTraffic"
ENDPOINT_INSTANCE_TYPE = "ml.m5.large"


def endpoint_config_name(endpoint_name: str, run_id: str) -> str:
    """The endpoint config a run deploys: the endpoint's name (shortened if need be) and a digest of the run."""
    return sagemaker_name(endpoint_name, unique_by=f"{endpoint_name}/{run_id}")


def inference_image_uri(region: str, instance_type: str = ENDPOINT_INSTANCE_TYPE) -> str:
    """The SageMaker PyTorch inference image matching the training image's framework version, offline."""
    return pytorch_image_uri(region, instance_type, scope="inference")


def sagemaker_deploy_requests(
    best: Mapping, *, endpoint_name: str, run_id: str, config: PipelineConfig
) -> dict[str, dict]:
    """The three requests that serve ``best`` (selection's answer) on ``endpoint_name``."""
    model_name = best["training_job_name"]  # unique per run and a record of where the model came from
    config_name = endpoint_config_name(endpoint_name, run_id)
    tags = [{"Key": "project", "Value": "mnist-pipeline"}, {"Key": "run_id", "Value": run_id}]
    return {
        "model": {
            "ModelName": model_name,
            "PrimaryContainer": {
                "Image": inference_image_uri(config.region),
                "ModelDataUrl": best["model_data_url"],
                # The handler ships inside model.tar.gz as code/inference.py (the inference toolkit's layout).
                "Environment": {
                    "SAGEMAKER_PROGRAM": "inference.py",
                    "SAGEMAKER_SUBMIT_DIRECTORY": "/opt/ml/model/code",
                    "SAGEMAKER_REGION": config.region,
                    "SAGEMAKER_CONTAINER_LOG_LEVEL": "20",
                },
            },
            "ExecutionRoleArn": config.role_arn,
            "Tags": tags,
        },
        "endpoint_config": {
            "EndpointConfigName": config_name,
            "ProductionVariants": [
                {
                    "VariantName": VARIANT_NAME,
                    "ModelName": model_name,
                    "InitialInstanceCount": 1,
                    "InstanceType": ENDPOINT_INSTANCE_TYPE,
                    "InitialVariantWeight": 1.0,
                }
            ],
            "Tags": tags,
        },
        "endpoint": {"EndpointName": endpoint_name, "EndpointConfigName": config_name, "Tags": tags},
    }


def wanted(decision: Mapping, enabled: bool) -> bool:
    """Whether this run deploys: the `deploy` param is on and the gate let the model through. Logs why not."""
    if not enabled:
        log.info("Deployment skipped: the deploy param is off for this run")
    elif not decision["deploy"]:
        log.info("Deployment skipped: the gate refused the model: %s", decision["reason"])
    return enabled and decision["deploy"]


def deploy(
    best: Mapping,
    decision: Mapping,
    *,
    endpoint_name: str,
    run_id: str,
    config: PipelineConfig,
    check_interval: int = 30,
) -> dict:
    """Serve ``best`` (selection's answer) on ``endpoint_name``, which the gate's ``decision`` let through.

    Returns the deployment, what the monitoring check and its rollback need, with the same keys for both backends:
    endpoint_name, endpoint_config_name, model_data_url, previous_endpoint_config_name, created, runtime_url (the
    local runtime's address; None on SageMaker, where the AWS connection says where the runtime is).
    """
    if config.backend == "local":
        return deploy_local(best, endpoint_name=endpoint_name, run_id=run_id, config=config)
    return deploy_sagemaker(
        best,
        endpoint_name=endpoint_name,
        run_id=run_id,
        config=config,
        previous_endpoint_config_name=decision["serving_endpoint_config_name"],
        check_interval=check_interval,
    )


def deploy_local(best: Mapping, *, endpoint_name: str, run_id: str, config: PipelineConfig) -> dict:
    """Create the local endpoint, or switch it (blue/green) to ``best``'s model; returns where it answers.

    A retry finds the endpoint serving this run's config already and leaves it so.
    """
    from tasks.local_endpoints import create_or_update_endpoint

    deployment = create_or_update_endpoint(
        endpoint_name, best["model_data_url"], endpoint_config_name(endpoint_name, run_id), config,
        metrics_interval=config.metrics_interval,
    )  # fmt: skip
    log.info(
        "Endpoint %s serves %s (hidden_channels %s); call it with boto3's sagemaker-runtime at endpoint_url %s",
        endpoint_name, best["training_job_name"], best["hidden_channels"], deployment["runtime_url"],
    )  # fmt: skip
    return deployment


def _exists(describe, name: str) -> bool:
    from botocore.exceptions import ClientError

    try:
        describe(name)
    except ClientError as error:
        # SageMaker answers a missing model, config or endpoint with a ValidationException "Could not find ...".
        if "Could not find" in str(error):
            return False
        raise
    return True


def deploy_sagemaker(
    best: Mapping,
    *,
    endpoint_name: str,
    run_id: str,
    config: PipelineConfig,
    previous_endpoint_config_name: str | None,
    check_interval: int = 30,
) -> dict:
    """CreateModel and CreateEndpointConfig unless this run made them already, then CreateEndpoint, or
    UpdateEndpoint (blue/green on SageMaker: the old config serves until the new one is InService) unless the
    endpoint serves this run's config already. Returns once the endpoint serves it; fails naming what serves instead.

    ``previous_endpoint_config_name``: what served before this run (the gate saw it), for the rollback.
    """
    from airflow.providers.amazon.aws.hooks.sagemaker import SageMakerHook

    from tasks.gate import serving_endpoint_config

    hook = SageMakerHook(aws_conn_id=config.aws_conn_id, region_name=config.region)
    requests = sagemaker_deploy_requests(best, endpoint_name=endpoint_name, run_id=run_id, config=config)
    model_name = requests["model"]["ModelName"]
    config_name = requests["endpoint_config"]["EndpointConfigName"]
    if _exists(hook.describe_model, model_name):
        log.info("Model %s exists already: made by an earlier try of this run", model_name)
    else:
        hook.create_model(requests["model"])
    if _exists(hook.describe_endpoint_config, config_name):
        log.info("Endpoint config %s exists already: made by an earlier try of this run", config_name)
    else:
        hook.create_endpoint_config(requests["endpoint_config"])

    serving = serving_endpoint_config(config, endpoint_name)
    if serving is None:
        log.info("Creating endpoint %s with config %s", endpoint_name, config_name)
        hook.create_endpoint(requests["endpoint"], wait_for_completion=False)
    elif serving != config_name:
        log.info("Updating endpoint %s from config %s to %s", endpoint_name, serving, config_name)
        hook.update_endpoint(
            {"EndpointName": endpoint_name, "EndpointConfigName": config_name}, wait_for_completion=False
        )
    else:
        log.info("Endpoint %s serves config %s already", endpoint_name, config_name)
    # Also when an earlier try's request is still under way. Raises on Failed, with SageMaker's reason.
    described = hook.check_status(endpoint_name, "EndpointStatus", hook.describe_endpoint, check_interval,
                                  non_terminal_states=hook.endpoint_non_terminal_states)  # fmt: skip
    if described["EndpointConfigName"] != config_name:  # a failed update: SageMaker went back to the old config
        raise RuntimeError(
            f"endpoint {endpoint_name} serves config {described['EndpointConfigName']}, not {config_name}: "
            f"{described.get('FailureReason') or 'the update did not take'}"
        )
    log.info("Endpoint %s serves %s (hidden_channels %s) with config %s",
             endpoint_name, model_name, best["hidden_channels"], config_name)  # fmt: skip
    return {
        "endpoint_name": endpoint_name,
        "endpoint_config_name": config_name,
        "model_data_url": best["model_data_url"],
        "previous_endpoint_config_name": previous_endpoint_config_name,
        "created": previous_endpoint_config_name is None,
        "runtime_url": None,
    }
