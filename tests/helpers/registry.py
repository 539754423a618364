"""Model versions registered as the DAG registers them, for the tests of what the registry decides."""

from __future__ import annotations

import contextlib

import boto3


def register(
    config,
    sagemaker_url: str,
    group: str,
    model_data_url: str,
    accuracy: float,
    run_id: str = "run",
    dataset_uri: str | None = None,
) -> str:
    """A version of ``model_data_url`` in ``group`` (tasks.registry.registration's request, PendingManualApproval),
    trained on ``dataset_uri``; its ARN."""
    from tasks.registry import registration

    best = {
        "model_data_url": model_data_url,
        "test_accuracy": accuracy,
        "hidden_channels": 10,
        "training_job_name": f"{run_id}-hc10",
        "per_class_accuracy": [accuracy] * 10,
    }
    dataset_uri = dataset_uri or f"{config.s3_root}/datasets/mnist/{'0' * 64}/"
    version = registration(best, dataset_uri, run_id, config)
    sagemaker = boto3.client("sagemaker", endpoint_url=sagemaker_url)
    with contextlib.suppress(sagemaker.exceptions.ClientError):  # made for an earlier version
        sagemaker.create_model_package_group(ModelPackageGroupName=group)
    return sagemaker.create_model_package(ModelPackageGroupName=group, **version["extras"])["ModelPackageArn"]
