"""The model registry: every model the gate lets through becomes a version of the model package group named after
its endpoint, with where it came from and how good it is; the registry says which model is the champion and which
is approved to serve next.

- **The champion** of an endpoint is the latest Approved version whose model the endpoint serves now (models are
  content-addressed, so "serves" is an exact comparison of the artifact's S3 URI). Nothing else decides the gate.
- **Approval.** A version is registered PendingManualApproval. With approval `auto` the monitoring check is its
  verdict: Approved once it passed (it serves), Rejected when it failed (it was rolled back). With `manual` the run
  asks a person in the Airflow UI (tasks/review.py): approved there, it is deployed and checked as with `auto`.
  Approved outside the UI (``mnist-pipeline approve VERSION``, or the registry on AWS), the next run, or a
  deploy-only run, serves the latest Approved version newer than the champion (``approved_to_serve``).

The version is created by the provider's SageMakerRegisterModelVersionOperator (the DAG's `register` task,
tasks.operators) from the request built here; everything else goes through the provider's SageMakerHook.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping

from tasks.config import PipelineConfig
from tasks.hooks import sagemaker_hook
from tasks.policy import APPROVAL_MODES, ENDPOINT_INSTANCE_TYPE

log = logging.getLogger(__name__)

APPROVED, PENDING, REJECTED = "Approved", "PendingManualApproval", "Rejected"
# What the endpoint's handlers take (inference/inference.py) and answer.
CONTENT_TYPES = ["application/json", "application/x-npy", "text/csv", "image/png", "image/jpeg"]
RESPONSE_TYPES = ["application/json"]
METADATA_VALUE_LIMIT = 256  # CustomerMetadataProperties' longest value
VERSION_ARN = re.compile(r"arn:aws[a-z-]*:sagemaker:[^:]+:\d{12}:model-package/[^/]+/\d+")


class VersionNotFound(LookupError):
    """No such version in the group; the message names what was asked for and where it was looked up."""


def registration(best: Mapping, dataset_uri: str, run_id: str, config: PipelineConfig) -> dict:
    """The model version of ``best`` (selection's answer), as SageMakerRegisterModelVersionOperator takes it:
    ``{"image_uri", "model_url", "extras"}`` (extras: the rest of CreateModelPackage).

    Its ModelMetrics point at the model's quality statistics (test accuracy, per digit too), written to S3 under
    their SHA-256 next to the model."""
    from tasks.deployment import inference_container
    from tasks.s3 import put_content_addressed

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
        # Its mean probability for its own answers on the test set, which the drift check holds served inputs to.
        "test_confidence": json.dumps(best.get("test_confidence")),
        "hyperparameters": hyperparameters[:METADATA_VALUE_LIMIT],
    }
    statistics = {  # the shape of SageMaker Model Monitor's model quality statistics
        "version": 0.0,
        "multiclass_classification_metrics": {
            "accuracy": {"value": best["test_accuracy"]},
            "recall_by_class": {str(d): a for d, a in enumerate(best.get("per_class_accuracy") or [])},
        },
    }
    statistics_uri = put_content_addressed(
        config, "model-quality", "statistics.json", json.dumps(statistics, sort_keys=True).encode()
    )
    extras = {
        "ModelPackageDescription": f"hidden_channels {best['hidden_channels']}, test accuracy "
        f"{100 * best['test_accuracy']:.2f}%, from {run_id}"[:1024],
        "InferenceSpecification": {
            "Containers": [container],
            "SupportedContentTypes": CONTENT_TYPES,
            "SupportedResponseMIMETypes": RESPONSE_TYPES,
            "SupportedRealtimeInferenceInstanceTypes": [ENDPOINT_INSTANCE_TYPE],
            "SupportedTransformInstanceTypes": [ENDPOINT_INSTANCE_TYPE],
        },
        "ModelMetrics": {"ModelQuality": {"Statistics": {"ContentType": "application/json", "S3Uri": statistics_uri}}},
        "CustomerMetadataProperties": {k: v[:METADATA_VALUE_LIMIT] for k, v in metadata.items()},
    }
    return {"image_uri": container["Image"], "model_url": best["model_data_url"], "extras": extras}


# -- reading the registry ----------------------------------------------------------------------------------------


def versions(config: PipelineConfig, group: str, status: str | None = None) -> list[dict]:
    """The group's versions, newest first (an absent group has none), only ``status`` ones when given."""
    paginator = sagemaker_hook(config).conn.get_paginator("list_model_packages")
    filters = {"ModelApprovalStatus": status} if status else {}
    pages = paginator.paginate(ModelPackageGroupName=group, SortBy="CreationTime", SortOrder="Descending", **filters)
    summaries = [summary for page in pages for summary in page["ModelPackageSummaryList"]]
    return sorted(summaries, key=lambda summary: summary["ModelPackageVersion"], reverse=True)


def describe(config: PipelineConfig, arn: str) -> dict:
    return sagemaker_hook(config).conn.describe_model_package(ModelPackageName=arn)


def as_model(description: Mapping) -> dict:
    """A version as the deployment and its check take a model (the keys of selection's answer they read), plus where
    it stands in the registry."""
    metadata = description.get("CustomerMetadataProperties") or {}
    container = description["InferenceSpecification"]["Containers"][0]
    return {
        "model_package_arn": description["ModelPackageArn"],
        "version": description["ModelPackageVersion"],
        "approval": description["ModelApprovalStatus"],
        "approval_description": description.get("ApprovalDescription", ""),  # who decided, when, why
        "model_data_url": container["ModelDataUrl"],
        "test_accuracy": float(metadata["test_accuracy"]),
        "hidden_channels": int(metadata["hidden_channels"]),
        "training_job_name": metadata["training_job"],
        "dataset_uri": metadata["dataset"],
        "run_id": metadata.get("run_id"),
        # None for a version registered before the metric existed: the drift check then judges no confidence.
        "test_confidence": _fraction(metadata.get("test_confidence")),
    }


def _fraction(text: str | None) -> float | None:
    """A metadata value that should hold a fraction; None where it is missing or is not one (metadata can be edited
    by anyone who may update the version)."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if 0.0 <= value <= 1.0 else None


def served_model(config: PipelineConfig, endpoint_config_name: str) -> str:
    """The model artifact (S3 URI) that ``endpoint_config_name`` serves."""
    hook = sagemaker_hook(config)
    variant = hook.describe_endpoint_config(endpoint_config_name)["ProductionVariants"][0]
    model = hook.describe_model(variant["ModelName"])
    return (model.get("PrimaryContainer") or model["Containers"][0])["ModelDataUrl"]


def champion(config: PipelineConfig, endpoint_name: str) -> dict | None:
    """The latest Approved version that ``endpoint_name`` serves (``as_model``, plus ``endpoint_config_name``), or
    None: no endpoint, or it serves a model no Approved version names (deployed by hand, or before the registry)."""
    from tasks.deployment import serving_endpoint_config

    serving = serving_endpoint_config(config, endpoint_name)
    if serving is None:
        return None
    artifact = served_model(config, serving)
    for summary in versions(config, endpoint_name, APPROVED):
        description = describe(config, summary["ModelPackageArn"])
        if description["InferenceSpecification"]["Containers"][0]["ModelDataUrl"] == artifact:
            return {**as_model(description), "endpoint_config_name": serving}
    log.warning(
        "Endpoint %s serves %s, which no Approved version of group %s names: it has no champion",
        endpoint_name,
        artifact,
        endpoint_name,
    )
    return None


def approved_to_serve(config: PipelineConfig, endpoint_name: str, current: Mapping | None) -> dict | None:
    """The latest Approved version, when it is newer than the champion ``current`` (approved by a person since, and
    not served yet); None when there is none."""
    approved = versions(config, endpoint_name, APPROVED)
    if not approved or (current and approved[0]["ModelPackageVersion"] <= current["version"]):
        return None
    return as_model(describe(config, approved[0]["ModelPackageArn"]))


def pending(config: PipelineConfig, endpoint_name: str) -> list[dict]:
    """The versions awaiting a person's approval, newest first (summaries)."""
    return versions(config, endpoint_name, PENDING)


def find_version(config: PipelineConfig, group: str, version: str) -> dict:
    """A version of ``group`` by its number (``3``) or its ARN; VersionNotFound otherwise."""
    from botocore.exceptions import ClientError

    spec = version.strip()
    if spec.isdigit():
        found = [s for s in versions(config, group) if s["ModelPackageVersion"] == int(spec)]
        if not found:
            raise VersionNotFound(f"model package group {group} has no version {spec}")
        spec = found[0]["ModelPackageArn"]
    elif not VERSION_ARN.fullmatch(spec):
        raise VersionNotFound(f"{version!r} is neither a version number nor a model package version ARN")
    try:
        return describe(config, spec)
    except ClientError as error:
        raise VersionNotFound(f"{spec}: {error.response['Error']['Message']}") from None


# -- what serves next --------------------------------------------------------------------------------------------


def choose_model(
    config: PipelineConfig, endpoint_name: str, *, enabled: bool, approval: str, registered: str | None
) -> dict:
    """What this run deploys, from the registry: ``{"deploy", "reason", "model", "previous_endpoint_config_name"}``
    (``model``: ``as_model``'s, or None).

    With approval ``auto``, the version this run ``registered`` (the gate let it through). With ``manual``, that
    version once a person approved it (in the Airflow UI as the run waited, or outside it meanwhile). Otherwise, or
    when the gate refused this run's model, the latest version a person Approved since the champion was deployed,
    if any; else nothing, and the reason says where this run's version stands (Rejected, or awaiting a person)."""
    from tasks.deployment import serving_endpoint_config

    if approval not in APPROVAL_MODES:
        raise ValueError(f"approval must be one of {', '.join(APPROVAL_MODES)}, not {approval!r}")
    if not enabled:
        return {"deploy": False, "reason": "the deploy param is off for this run", "model": None}
    current = champion(config, endpoint_name)
    own = as_model(describe(config, registered)) if registered else None
    model, reason = None, ""
    if own and approval == "auto":
        model, reason = own, f"this run's model, version {own['version']}, which the gate let through"
    elif own and own["approval"] == APPROVED:  # by a person: in the UI as the run waited, or outside it meanwhile
        model = own
        reason = f"this run's model, version {own['version']}, approved by a person ({own['approval_description']})"
    elif model := approved_to_serve(config, endpoint_name, current):
        reason = f"version {model['version']} (from run {model['run_id']}), approved since the champion was deployed"
    elif own and own["approval"] == REJECTED:
        reason = f"version {own['version']} was rejected ({own['approval_description']})"
    elif own:
        reason = f"version {own['version']} awaits a person's approval (mnist-pipeline approve {own['version']})"
    else:
        reason = "this run registered no version, and none was approved since the champion was deployed"
    log.info("Deployment to %s: %s", endpoint_name, reason)
    return {
        "deploy": model is not None,
        "reason": reason,
        "model": model,
        # What serves now: the rollback target, fixed before this run changes anything (a retry must not lose it).
        "previous_endpoint_config_name": serving_endpoint_config(config, endpoint_name),
    }


# -- approval ----------------------------------------------------------------------------------------------------


def set_approval(config: PipelineConfig, arn: str, status: str, reason: str) -> None:
    sagemaker_hook(config).conn.update_model_package(
        ModelPackageArn=arn, ModelApprovalStatus=status, ApprovalDescription=reason[:1024]
    )
    log.info("Model version %s: %s (%s)", arn, status, reason)


def record_verdict(config: PipelineConfig, package_arn: str | None, passed: bool, reason: str) -> None:
    """The monitoring check's verdict: a passed version is Approved (one a person approved already keeps their
    words), a failed one Rejected, so that no later run serves it again."""
    if not package_arn:
        return
    if passed and describe(config, package_arn)["ModelApprovalStatus"] == APPROVED:
        log.info("Model version %s passed its check; a person approved it already", package_arn)
        return
    set_approval(config, package_arn, APPROVED if passed else REJECTED, reason)
