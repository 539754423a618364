"""Serving the selected model: create the endpoint, or update it blue/green.

One request builder (`sagemaker_deploy_requests`: CreateModel / CreateEndpointConfig / CreateEndpoint) and one
entry point, `deploy`, which sends them through the provider's SageMakerHook to wherever the AWS connection points
(AWS, or the local SageMaker service). Model and endpoint config names derive from the run id: unique per run, the same on a retry, so a
retried or re-run deploy finds what its first try made instead of making it twice. Endpoint configs are never
deleted: the monitoring check rolls back to the previous one.

How long each wait may last is the run's policy (tasks.policy); this module makes the requests and waits.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

from tasks.config import PipelineConfig
from tasks.hooks import sagemaker_hook
from tasks.images import pytorch_image_uri
from tasks.names import VARIANT_NAME
from tasks.policy import (
    ENDPOINT_INSTANCE_TYPE,
    TRAFFIC_SHIFTS,
    Thresholds,
    update_seconds,
    wait_timeout,
)
from tasks.policy import (
    alarm_thresholds as default_alarm_thresholds,
)
from tasks.training_jobs import sagemaker_name

log = logging.getLogger(__name__)

# Data capture keeps what the endpoint receives and answers under <s3_root>/capture/<endpoint>/<variant>/yyyy/mm/dd/
# hh/, where the drift check (mnist_drift) reads them.
CAPTURE_PREFIX = "capture"
# How capture writes each body: the JSON requests and answers as their text, the rest (.npy, images) in base64.
CAPTURE_CONTENT_TYPES = {"JsonContentTypes": ["application/json"], "CsvContentTypes": ["text/csv"]}


def capture_destination(config: PipelineConfig) -> str:
    return f"{config.s3_root}/{CAPTURE_PREFIX}"


def data_capture_config(config: PipelineConfig, percent: int) -> dict | None:
    """The endpoint config's DataCaptureConfig: inputs and outputs, ``percent`` of the invocations; None for 0."""
    if not percent:
        return None
    capture = {
        "EnableCapture": True,
        "InitialSamplingPercentage": percent,
        "DestinationS3Uri": capture_destination(config),
        "CaptureOptions": [{"CaptureMode": "Input"}, {"CaptureMode": "Output"}],
        "CaptureContentTypeHeader": CAPTURE_CONTENT_TYPES,
    }
    if config.kms_key_id:
        capture["KmsKeyId"] = config.kms_key_id
    return capture


def endpoint_config_name(endpoint_name: str, run_id: str) -> str:
    """The endpoint config a run deploys: the endpoint's name (shortened if need be) and a digest of the run."""
    return sagemaker_name(endpoint_name, unique_by=f"{endpoint_name}/{run_id}")


def inference_image_uri(region: str, instance_type: str = ENDPOINT_INSTANCE_TYPE) -> str:
    """The SageMaker PyTorch inference image matching the training image's framework version, offline."""
    return pytorch_image_uri(region, instance_type, scope="inference")


def inference_container(model_data_url: str, config: PipelineConfig) -> dict:
    """The container that serves a model: SageMaker's PyTorch inference image over its model.tar.gz."""
    return {
        "Image": inference_image_uri(config.region),
        "ModelDataUrl": model_data_url,
        # The handler ships inside model.tar.gz as code/inference.py (the inference toolkit's layout).
        "Environment": {
            "SAGEMAKER_PROGRAM": "inference.py",
            "SAGEMAKER_SUBMIT_DIRECTORY": "/opt/ml/model/code",
            "SAGEMAKER_REGION": config.region,
            "SAGEMAKER_CONTAINER_LOG_LEVEL": "20",
        },
    }


def sagemaker_deploy_requests(
    best: Mapping, *, endpoint_name: str, run_id: str, config: PipelineConfig, capture_percent: int = 0
) -> dict[str, dict]:
    """The three requests that serve ``best`` (selection's answer) on ``endpoint_name``, capturing
    ``capture_percent`` of its invocations."""
    model_name = best["training_job_name"]  # unique per run and a record of where the model came from
    config_name = endpoint_config_name(endpoint_name, run_id)
    tags = [{"Key": "project", "Value": "mnist-pipeline"}, {"Key": "run_id", "Value": run_id}]
    return {
        "model": {
            "ModelName": model_name,
            "PrimaryContainer": inference_container(best["model_data_url"], config),
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
            **({"DataCaptureConfig": capture} if (capture := data_capture_config(config, capture_percent)) else {}),
            "Tags": tags,
        },
        "endpoint": {"EndpointName": endpoint_name, "EndpointConfigName": config_name, "Tags": tags},
    }


# The endpoint statuses of a change under way, which ends by itself.
BUSY = ("Creating", "Updating", "RollingBack", "SystemUpdating")


def deployment_config(
    traffic_shift: str = "all_at_once",
    *,
    percent: int = 20,
    wait_seconds: int = 0,
    bake_seconds: int = 0,
    alarms: list[str] = (),
) -> dict:
    """UpdateEndpoint's DeploymentConfig: blue/green with ``traffic_shift`` (a canary of ``percent`` first, or
    linear steps of ``percent``, each held ``wait_seconds``), the old fleet kept ``bake_seconds`` after the shift,
    and ``alarms`` rolling the update back when one fires meanwhile."""
    if traffic_shift not in TRAFFIC_SHIFTS:
        raise ValueError(f"traffic_shift {traffic_shift!r} is not one of {', '.join(TRAFFIC_SHIFTS)}")
    routing: dict = {"Type": traffic_shift.upper(), "WaitIntervalInSeconds": wait_seconds}
    if traffic_shift == "canary":
        routing["CanarySize"] = {"Type": "CAPACITY_PERCENT", "Value": percent}
    elif traffic_shift == "linear":
        routing["LinearStepSize"] = {"Type": "CAPACITY_PERCENT", "Value": percent}
    config: dict = {
        "BlueGreenUpdatePolicy": {
            "TrafficRoutingConfiguration": routing,
            "TerminationWaitInSeconds": bake_seconds,
            "MaximumExecutionTimeoutInSeconds": update_seconds(
                traffic_shift, percent=percent, wait_seconds=wait_seconds, bake_seconds=bake_seconds
            ),
        }
    }
    if alarms:
        config["AutoRollbackConfiguration"] = {"Alarms": [{"AlarmName": name} for name in alarms]}
    return config


class RolledBack(RuntimeError):
    """The update did not take: SageMaker kept (or went back to) the endpoint's previous config."""


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


def roll_out(
    best: Mapping,
    *,
    previous_endpoint_config_name: str | None,
    endpoint_name: str,
    run_id: str,
    config: PipelineConfig,
    check_interval: int = 30,
    traffic: Mapping | None = None,
    alarm_thresholds: Mapping | None = None,
    capture_percent: int = 0,
) -> dict:
    """Serve ``best`` (selection's answer, or a registry version as tasks.registry.as_model gives it) on
    ``endpoint_name``, where ``previous_endpoint_config_name`` served before this run (what a rollback restores).

    An update moves traffic as ``traffic`` says (``deployment_config``'s arguments; default all at once), guarded
    by the endpoint's alarms, made or updated first with ``alarm_thresholds`` (``put_alarms``' arguments; default:
    the monitoring check's default thresholds).

    CreateModel and CreateEndpointConfig unless this run made them already, then CreateEndpoint, or UpdateEndpoint
    (blue/green: the old config serves until the new one is InService) unless the endpoint serves this run's config
    already. Returns once the endpoint serves it; fails naming what serves instead. Returns what the monitoring
    check and its rollback need: endpoint_name, endpoint_config_name, model_data_url,
    previous_endpoint_config_name and created.
    """
    from tasks.alarms import put_alarms

    hook = sagemaker_hook(config)
    requests = sagemaker_deploy_requests(
        best, endpoint_name=endpoint_name, run_id=run_id, config=config, capture_percent=capture_percent
    )
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
    if serving is not None:  # an update still under way (a run that failed mid-way) must end before another starts
        serving = wait_settled(config, endpoint_name, _deploy_timeout(None), check_interval)["EndpointConfigName"]
    update = None
    if serving is None:
        log.info("Creating endpoint %s with config %s", endpoint_name, config_name)
        hook.create_endpoint(requests["endpoint"], wait_for_completion=False)
    elif serving != config_name:
        if alarm_thresholds is None:
            alarm_thresholds = default_alarm_thresholds(Thresholds())
        alarms = put_alarms(config, endpoint_name, **alarm_thresholds)
        update = deployment_config(**(traffic or {}), alarms=alarms)
        log.info("Updating endpoint %s from config %s to %s: %s", endpoint_name, serving, config_name, update)
        hook.update_endpoint(
            {"EndpointName": endpoint_name, "EndpointConfigName": config_name, "DeploymentConfig": update},
            wait_for_completion=False,
        )
    else:
        log.info("Endpoint %s serves config %s already", endpoint_name, config_name)
    # Also when an earlier try's request is still under way. Raises on Failed, with SageMaker's reason.
    described = wait_deployed(hook, endpoint_name, config_name, check_interval, _deploy_timeout(update))
    if described["EndpointConfigName"] != config_name and not baking(described, config_name):
        # a failed update: SageMaker went back to the old config
        raise RolledBack(
            f"endpoint {endpoint_name} serves config {described['EndpointConfigName']}, not {config_name}: "
            f"{described.get('FailureReason') or 'the update did not take'}"
        )
    log.info(
        "Endpoint %s serves %s (hidden_channels %s) with config %s",
        endpoint_name,
        model_name,
        best["hidden_channels"],
        config_name,
    )
    return {
        "endpoint_name": endpoint_name,
        "endpoint_config_name": config_name,
        "model_data_url": best["model_data_url"],
        "previous_endpoint_config_name": previous_endpoint_config_name,
        "created": previous_endpoint_config_name is None,
        "deployment_config": update,
        # All traffic on the new model while the old fleet is kept under the alarms: the check runs now.
        "baking": baking(described, config_name),
    }


def serving_endpoint_config(config: PipelineConfig, endpoint_name: str) -> str | None:
    """The endpoint config the endpoint serves now (the one to roll back to), or None when there is no endpoint."""
    from botocore.exceptions import ClientError

    try:
        return sagemaker_hook(config).describe_endpoint(endpoint_name)["EndpointConfigName"]
    except ClientError as error:
        # SageMaker answers a missing endpoint with a ValidationException "Could not find endpoint ...".
        if "Could not find endpoint" in str(error):
            return None
        raise


def updating_to(described: Mapping, config_name: str) -> bool:
    """Whether DescribeEndpoint shows an update to ``config_name`` under way: its traffic moving, or baking."""
    pending = described.get("PendingDeploymentSummary") or {}
    return described["EndpointStatus"] == "Updating" and pending.get("EndpointConfigName") == config_name


def baking(described: Mapping, config_name: str) -> bool:
    """Whether DescribeEndpoint shows ``config_name`` taking all traffic in its bake (the old fleet still kept)."""
    pending = described.get("PendingDeploymentSummary") or {}
    statuses = [
        status["Status"]
        for variant in pending.get("ProductionVariants", [])
        for status in variant.get("VariantStatus", [])
    ]
    return (
        described["EndpointStatus"] == "Updating"
        and pending.get("EndpointConfigName") == config_name
        and bool(statuses)
        and all(status == "Baking" for status in statuses)
    )


def _deploy_timeout(update: Mapping | None) -> float:
    return wait_timeout(update and update["BlueGreenUpdatePolicy"]["MaximumExecutionTimeoutInSeconds"])


def poll_endpoint(hook, endpoint_name: str, done, timeout: float, delay: float) -> dict:
    """DescribeEndpoint every ``delay`` seconds until ``done(description)``; returns that description, or raises
    TimeoutError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        described = hook.describe_endpoint(endpoint_name)
        if done(described):
            return described
        if time.monotonic() > deadline:
            raise TimeoutError(f"endpoint {endpoint_name} still {described['EndpointStatus']} after {timeout:.0f} s")
        time.sleep(delay)


def wait_deployed(hook, endpoint_name: str, config_name: str, check_interval: float, timeout: float) -> dict:
    """Poll the endpoint until it settles (InService, on whichever config) or ``config_name`` bakes with all the
    traffic; returns its description. Raises naming SageMaker's reason when it fails, and after ``timeout``."""
    failed = ("Failed", "OutOfService", "Deleting")
    described = poll_endpoint(
        hook,
        endpoint_name,
        lambda d: d["EndpointStatus"] in ("InService", *failed) or baking(d, config_name),
        timeout,
        check_interval,
    )
    if described["EndpointStatus"] in failed:
        raise RuntimeError(
            f"endpoint {endpoint_name} is {described['EndpointStatus']}: "
            f"{described.get('FailureReason', 'no reason given')}"
        )
    return described


def wait_settled(config: PipelineConfig, endpoint_name: str, timeout: float, delay: float = 15) -> dict:
    """Poll the endpoint until it is no longer Creating, Updating or RollingBack; returns its description."""
    return poll_endpoint(
        sagemaker_hook(config), endpoint_name, lambda d: d["EndpointStatus"] not in BUSY, timeout, delay
    )
