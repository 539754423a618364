"""Serving the selected model: the CreateModel / CreateEndpointConfig / CreateEndpoint requests, for both backends.

The sagemaker backend sends these requests with the provider's operators (the endpoint operator updates an
endpoint that exists already); the local backend deploys the same artifact with tasks.local_endpoints, a local
server speaking the SageMaker container contract. Model and endpoint config names are unique per run, so an
update never touches what serves now until the endpoint switches to it.

Imported by the DAG at parse time: sagemaker is imported inside the functions.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from tasks.config import PipelineConfig
from tasks.training_jobs import FRAMEWORK_VERSION, PY_VERSION, sagemaker_name

log = logging.getLogger(__name__)

VARIANT_NAME = "AllTraffic"
ENDPOINT_INSTANCE_TYPE = "ml.m5.large"


def endpoint_config_name(endpoint_name: str, run_id: str) -> str:
    """The endpoint config a run deploys: the endpoint's name (shortened if need be) and a digest of the run."""
    return sagemaker_name(endpoint_name, unique_by=f"{endpoint_name}/{run_id}")


def inference_image_uri(region: str, instance_type: str = ENDPOINT_INSTANCE_TYPE) -> str:
    """The SageMaker PyTorch inference image matching the training image's framework version, offline."""
    from sagemaker.core import image_uris

    return image_uris.retrieve(
        framework="pytorch",
        region=region,
        version=FRAMEWORK_VERSION,
        py_version=PY_VERSION,
        instance_type=instance_type,
        image_scope="inference",
    )


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


def deploy_local(best: Mapping, *, endpoint_name: str, run_id: str, config: PipelineConfig) -> dict:
    """Create the local endpoint, or switch it (blue/green) to ``best``'s model; returns where it answers."""
    from tasks.local_endpoints import create_or_update_endpoint

    deployment = create_or_update_endpoint(
        endpoint_name, best["model_data_url"], endpoint_config_name(endpoint_name, run_id), config
    )
    log.info(
        "Endpoint %s serves %s (hidden_channels %s); call it with boto3's sagemaker-runtime at endpoint_url %s",
        endpoint_name, best["training_job_name"], best["hidden_channels"], deployment["runtime_url"],
    )  # fmt: skip
    return deployment
