"""The model registry: every model the gate lets through becomes a version of the model package group named after
its endpoint, with where it came from and how good it is. The monitoring check's verdict is its approval:
Approved once it passed (it serves), Rejected when it failed (it was rolled back).

The version is created by the provider's SageMakerRegisterModelVersionOperator (the DAG's `register` task) from
the request built here; the approval is UpdateModelPackage through the provider's hook. The DAG imports this module
at parse time: light, the provider's operator aside.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping

from airflow.providers.amazon.aws.operators.sagemaker import SageMakerRegisterModelVersionOperator

from tasks.config import PipelineConfig
from tasks.hooks import sagemaker_hook

log = logging.getLogger(__name__)

# What the endpoint's handlers take (inference/inference.py) and answer.
CONTENT_TYPES = ["application/json", "application/x-npy", "text/csv", "image/png", "image/jpeg"]
RESPONSE_TYPES = ["application/json"]
METADATA_VALUE_LIMIT = 256  # CustomerMetadataProperties' longest value


class RegisterModelVersionOperator(SageMakerRegisterModelVersionOperator):
    """The provider's operator, its CreateModelPackage extras (the version's metadata) rendered from XCom too."""

    template_fields = (*SageMakerRegisterModelVersionOperator.template_fields, "extras")


def registration(best: Mapping, dataset_uri: str, run_id: str, config: PipelineConfig) -> dict:
    """The model version of ``best`` (selection's answer), as SageMakerRegisterModelVersionOperator takes it:
    ``{"image_uri", "model_url", "extras"}`` (extras: the rest of CreateModelPackage)."""
    from tasks.deployment import ENDPOINT_INSTANCE_TYPE, inference_container

    container = inference_container(best["model_data_url"], config)
    hyperparameters = json.dumps(best.get("hyperparameters") or {"hidden_channels": best["hidden_channels"]})
    metadata = {
        "test_accuracy": f"{best['test_accuracy']:.6f}",
        "hidden_channels": str(best["hidden_channels"]),
        "training_job": best["training_job_name"],
        "run_id": run_id,
        "dataset": dataset_uri,
        "dataset_sha256": dataset_uri.rstrip("/").rsplit("/", 1)[-1],  # its content address
        "parameters": str(best.get("parameters")),
        "per_class_accuracy": json.dumps(best.get("per_class_accuracy")),  # digits 0-9, from its metrics.json
        "hyperparameters": hyperparameters[:METADATA_VALUE_LIMIT],
    }
    extras = {
        "ModelPackageDescription": f"hidden_channels {best['hidden_channels']}, test accuracy "
        f"{100 * best['test_accuracy']:.2f}%, from {run_id}"[:1024],
        "InferenceSpecification": {
            "Containers": [container],
            "SupportedContentTypes": CONTENT_TYPES,
            "SupportedResponseMIMETypes": RESPONSE_TYPES,
            "SupportedRealtimeInferenceInstanceTypes": [ENDPOINT_INSTANCE_TYPE],
        },
        "CustomerMetadataProperties": {k: v[:METADATA_VALUE_LIMIT] for k, v in metadata.items()},
    }
    return {"image_uri": container["Image"], "model_url": best["model_data_url"], "extras": extras}


def record_verdict(config: PipelineConfig, package_arn: str | None, passed: bool, reason: str) -> None:
    """Approve the version whose check passed, reject the one whose check failed."""
    if not package_arn:
        return
    status = "Approved" if passed else "Rejected"
    sagemaker_hook(config).conn.update_model_package(
        ModelPackageArn=package_arn, ModelApprovalStatus=status, ApprovalDescription=reason[:1024]
    )
    log.info("Model version %s: %s (%s)", package_arn, status, reason)
