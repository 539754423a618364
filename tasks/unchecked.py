"""Undoing, at the end of the run, a deployment that its monitoring check never judged.

A deployment whose check never finished (its task killed or crashed, so that its own rollback could not run) is
undone as a failed check is (tasks.monitoring), and its version rejected. A deploy that returned nothing (it
failed, or its timeout ended it, after its CreateEndpoint or UpdateEndpoint) is found from the endpoint's own state,
and undone when what serves, or what the endpoint is updating to, is this run's.
"""

from __future__ import annotations

import logging

from tasks.alarms import alarm_names
from tasks.config import PipelineConfig
from tasks.deployment import baking, updating_to
from tasks.hooks import sagemaker_hook
from tasks.monitoring import rollback_outcome, undo

log = logging.getLogger(__name__)


def unfinished_deployment(
    config: PipelineConfig,
    choice: dict | None,
    endpoint_name: str,
    run_id: str,
    *,
    settle_timeout: float,
    check_interval: int,
) -> dict | None:
    """What a deploy that returned nothing (it failed, or its timeout ended it) left of this run on the endpoint, as
    ``deploy`` would have described it; None when the endpoint serves, and is updating to, nothing of this run's.

    This run's endpoint config is known by its name (the run's: tasks.deployment.endpoint_config_name). What was
    there before is the candidate's ``previous_endpoint_config_name``, fixed before the run changed anything: the
    rollback's target, or none, when this run created the endpoint. An update still launching its fleet does not
    yet say which config it brings, so the endpoint is first polled until it settles or shows one."""
    from botocore.exceptions import ClientError

    from tasks.deployment import BUSY, endpoint_config_name, poll_endpoint

    if not (choice or {}).get("deploy"):
        return None
    ours = endpoint_config_name(endpoint_name, run_id)
    try:
        described = poll_endpoint(
            sagemaker_hook(config),
            endpoint_name,
            lambda d: d["EndpointStatus"] not in BUSY or updating_to(d, ours),
            settle_timeout,
            check_interval,
        )
    except ClientError as error:
        if "Could not find endpoint" in str(error):
            return None
        raise
    if described["EndpointStatus"] == "Deleting" or not (
        updating_to(described, ours) or described["EndpointConfigName"] == ours
    ):
        log.info(
            "Endpoint %s serves %s and is updating to nothing of this run's (%s): nothing to undo",
            endpoint_name,
            described["EndpointConfigName"],
            ours,
        )
        return None
    previous = choice.get("previous_endpoint_config_name")
    return {
        "endpoint_name": endpoint_name,
        "endpoint_config_name": ours,
        "model_data_url": (choice.get("model") or {}).get("model_data_url"),
        "previous_endpoint_config_name": previous,
        "created": previous is None,
        # Every update this pipeline sends is guarded by the endpoint's alarms (tasks.deployment.deploy): setting
        # one to ALARM stops it, and the fleet it replaces serves again.
        "deployment_config": {
            "AutoRollbackConfiguration": {"Alarms": [{"AlarmName": name} for name in alarm_names(endpoint_name)]}
        },
        "baking": baking(described, ours),
    }


def roll_back_unchecked(
    config: PipelineConfig,
    deployment: dict | None,
    monitoring: dict | None,
    *,
    choice: dict | None = None,
    endpoint_name: str | None = None,
    run_id: str | None = None,
    check_interval: int = 15,
    settle_timeout: float = 3600.0,
    version: str | None = None,
) -> dict | None:
    """After the run (its teardown): a deployment whose check never finished (its task killed or crashed, so that
    its own rollback could not run) is undone as a failed check is, and its ``version`` rejected. So is what a
    deploy that returned nothing (``deployment`` None: it failed, or its timeout ended it, after its request) left
    serving or updating on ``endpoint_name`` under this run's config (``unfinished_deployment``, from the
    candidate ``choice`` and the ``run_id``); nothing else on the endpoint is touched. Returns what the check would
    have reported (``passed`` False, the failure, the rollback), or None when there was nothing to undo."""
    if monitoring and (monitoring.get("passed") or monitoring.get("rollback")):
        return None
    if deployment is not None:
        failure = "the monitoring check never finished (its task was killed, or crashed)"
    elif endpoint_name and run_id:
        deployment = unfinished_deployment(
            config, choice, endpoint_name, run_id, settle_timeout=settle_timeout, check_interval=check_interval
        )
        failure = "the deploy task returned nothing (it failed, or its timeout ended it) after it changed the endpoint"
    if deployment is None:
        return None
    name, config_name = deployment["endpoint_name"], deployment["endpoint_config_name"]
    verdict = f"Deployment of endpoint {name} (config {config_name}) was not checked: {failure}"
    log.warning("%s: undoing it", verdict)
    from tasks.registry import record_verdict

    try:
        undone = undo(config, deployment, verdict, settle_timeout, check_interval)
    finally:  # undone or not, the version must never be served again
        record_verdict(config, version, passed=False, reason=verdict)
    log.warning("Endpoint %s: %s", name, rollback_outcome(undone))
    return {
        "endpoint_name": name,
        "endpoint_config_name": config_name,
        "passed": False,
        "failures": [failure],
        "load": None,
        "cloudwatch": None,
        "rollback": undone,
    }
