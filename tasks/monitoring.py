"""The monitoring check after a deployment: smoke load, CloudWatch metrics, then champion and alarms, or rollback.

1. Send held-out MNIST test images through the endpoint and measure the load itself (tasks.smoke_load).
2. Read the endpoint's CloudWatch metrics over the load's window (tasks.endpoint_metrics).
3. Judge on what the check can attribute: its own load (its requests, its errors, 4xx included, its accuracy and
   latency), and the endpoint's 5XX rate, which decides only over a minimum of invocations. Anyone can send the
   endpoint a request that fails: a 4XX is the caller's error, and a few 5XX among few requests cannot tell a
   failing model from a few bad callers, so those are reported and decide nothing.
4. Pass: wait for the bake to end (an alarm may still roll the update back), then approve the model's registry
   version (it is the champion from now on: tasks.registry) and create or update the endpoint's alarms (5XX
   error rate, p99 model latency).
   Fail: roll back, reject the version, and fail the task, without retries, naming every failed threshold with its
   observed value.
   During the bake, setting the update's rollback alarm to ALARM makes SageMaker itself switch back to the old
   fleet, still running (the way to stop a blue/green update); after it, UpdateEndpoint back to the previous
   config, or DeleteEndpoint when this deployment created the endpoint.

`deployment` is what the deploy step returns (tasks.deployment.deploy): endpoint_name, endpoint_config_name,
model_data_url, previous_endpoint_config_name, created, deployment_config, baking. A deployment the check never
judged is undone at the end of the run (tasks.unchecked), through this module's ``undo``.
"""

from __future__ import annotations

import dataclasses
import logging

from airflow.sdk.exceptions import AirflowFailException, AirflowTaskTimeout

from tasks.alarms import put_alarms
from tasks.config import PipelineConfig
from tasks.deployment import baking, updating_to, wait_settled
from tasks.endpoint_metrics import METRICS_POLL_SECONDS, cloudwatch_client, error_rate, wait_for_metrics
from tasks.hooks import sagemaker_hook
from tasks.policy import Thresholds, alarm_thresholds
from tasks.smoke_load import load_test_images, smoke_load, unretried_runtime_client

log = logging.getLogger(__name__)


class MonitoringCheckFailed(AirflowFailException):
    """The new deployment failed its check and was rolled back. No retry: a retry would check the old model.

    ``result``: what the check returns on a pass, with ``rollback`` (what the rollback did), for the report.
    """

    def __init__(self, message: str, result: dict | None = None):
        super().__init__(message)
        self.result = result


# --- the verdict ---------------------------------------------------------------------------------------------------


def evaluate(load: dict, metrics: dict, thresholds: Thresholds, test_accuracy: float | None = None) -> list[str]:
    """Every failed threshold, each naming the observed value and the limit; empty when the deployment passes."""
    failures = []

    def below(name: str, observed: float | None, limit: float | None, fmt: str = ".4f") -> None:
        if limit is not None and observed is not None and observed < limit:
            failures.append(f"{name} {observed:{fmt}} < {limit:{fmt}}")

    def above(name: str, observed: float | None, limit: float | None, fmt: str = ".4g") -> None:
        if limit is not None and observed is not None and observed > limit:
            failures.append(f"{name} {observed:{fmt}} > {limit:{fmt}}")

    below("live accuracy", load["live_accuracy"], thresholds.min_live_accuracy)
    if test_accuracy is not None:
        below("live accuracy vs test accuracy", load["live_accuracy"], test_accuracy - thresholds.max_accuracy_drop)
    above("smoke error rate", load["error_rate"], thresholds.max_error_rate)
    above("smoke p99 latency ms", load["p99_ms"], thresholds.max_p99_latency_ms)
    if (metrics["invocations"] or 0) < load["requests"]:
        failures.append(
            f"CloudWatch Invocations {metrics['invocations'] or 0:g} < {load['requests']} requests sent "
            f"(after waiting {metrics['waited_s']} s)"
        )
    rate, invocations = error_rate(metrics), metrics["invocations"] or 0
    if rate is not None and invocations >= thresholds.min_rate_requests and rate > thresholds.max_5xx_rate:
        failures.append(
            f"CloudWatch 5XX rate {rate:.4g} > {thresholds.max_5xx_rate:.4g} "
            f"({metrics['invocation_5xx_errors']:g} of {invocations:g} invocations)"
        )
    latency = metrics["model_latency_average_us"]
    above("CloudWatch ModelLatency average ms", latency and latency / 1000, thresholds.max_model_latency_ms)
    above("CloudWatch CPUUtilization", metrics["cpu_utilization"], thresholds.max_cpu_utilization)
    above("CloudWatch MemoryUtilization", metrics["memory_utilization"], thresholds.max_memory_utilization)
    return failures


def unjudged(metrics: dict, thresholds: Thresholds) -> list[str]:
    """The figures reported and not judged, each saying why (``evaluate``'s reasons for leaving them out)."""
    notes = []
    if client_errors := metrics["invocation_4xx_errors"]:
        notes.append(
            f"CloudWatch Invocation4XXErrors {client_errors:g}: client errors (the load's own count among its errors)"
        )
    invocations = metrics["invocations"] or 0
    if metrics["invocation_5xx_errors"] and 0 < invocations < thresholds.min_rate_requests:
        notes.append(
            f"CloudWatch 5XX rate {error_rate(metrics):.4g} ({metrics['invocation_5xx_errors']:g} of "
            f"{invocations:g} invocations): too few invocations to judge (at least "
            f"{thresholds.min_rate_requests})"
        )
    return notes


# --- pass: alarms; fail: rollback -----------------------------------------------------------------------------------


def rollback(config: PipelineConfig, deployment: dict, check_interval: int = 15) -> dict:
    """Undo ``deployment``: back to its previous endpoint config, or delete the endpoint it created.

    Returns ``{"action": "restored" | "deleted" | "none", "endpoint_name", "endpoint_config_name"}``.
    """
    name, failed = deployment["endpoint_name"], deployment["endpoint_config_name"]
    from tasks.deployment import serving_endpoint_config

    hook = sagemaker_hook(config)
    serving = serving_endpoint_config(config, name)
    previous = deployment.get("previous_endpoint_config_name")
    if serving != failed:
        log.info("Endpoint %s does not serve %s (it serves %s): nothing to roll back", name, failed, serving)
        return {"action": "none", "endpoint_name": name, "endpoint_config_name": serving}
    if previous:
        # UpdateEndpoint is blue/green: the failed config serves until the previous one is up.
        try:
            hook.update_endpoint({"EndpointName": name, "EndpointConfigName": previous}, check_interval=check_interval)
        except Exception as error:
            raise RuntimeError(
                f"UpdateEndpoint of {name} back to endpoint config {previous} failed: {error}"
            ) from error
        log.info("Endpoint %s rolled back from %s to %s", name, failed, previous)
        return {"action": "restored", "endpoint_name": name, "endpoint_config_name": previous}
    hook.conn.delete_endpoint(EndpointName=name)
    log.info("Endpoint %s deleted: the failed deployment %s created it", name, failed)
    return {"action": "deleted", "endpoint_name": name, "endpoint_config_name": None}


# --- the check -----------------------------------------------------------------------------------------------------


def ready_for_check(config: PipelineConfig, deployment: dict) -> str | None:
    """Why the endpoint cannot be checked now (None: it serves the deployment's config, baking or InService)."""
    described = sagemaker_hook(config).describe_endpoint(deployment["endpoint_name"])
    if baking(described, deployment["endpoint_config_name"]):
        return None
    if described["EndpointStatus"] != "InService":
        return f"endpoint status {described['EndpointStatus']} (not InService)"
    if described["EndpointConfigName"] != deployment["endpoint_config_name"]:
        return (
            f"the endpoint serves {described['EndpointConfigName']}, not {deployment['endpoint_config_name']}: "
            f"{described.get('FailureReason') or 'the update was undone'}"
        )
    return None


def stop_update(config: PipelineConfig, deployment: dict, reason: str, timeout: float, delay: float) -> dict | None:
    """Roll back an update still under way (its traffic moving, or baking) by setting its rollback alarm to ALARM,
    as an operator stops a blue/green update on SageMaker; returns the rollback's outcome, or None when the update
    was no longer under way."""
    name, failed = deployment["endpoint_name"], deployment["endpoint_config_name"]
    alarms = ((deployment.get("deployment_config") or {}).get("AutoRollbackConfiguration") or {}).get("Alarms")
    if not alarms or not updating_to(sagemaker_hook(config).describe_endpoint(name), failed):
        return None
    cloudwatch_client(config).set_alarm_state(
        AlarmName=alarms[0]["AlarmName"], StateValue="ALARM", StateReason=reason[:1023]
    )
    log.info("Alarm %s set to ALARM: endpoint %s rolls back from %s", alarms[0]["AlarmName"], name, failed)
    described = wait_settled(config, name, timeout, delay)
    if described["EndpointConfigName"] == failed:  # the bake ended first: the update had completed
        return None
    return {
        "action": "restored",
        "endpoint_name": name,
        "endpoint_config_name": described["EndpointConfigName"],
        "by": f"alarm {alarms[0]['AlarmName']}",
    }


def undo(config: PipelineConfig, deployment: dict, reason: str, settle_timeout: float, check_interval: int) -> dict:
    """Undo ``deployment``: stop its update while it bakes (``stop_update``), else ``rollback``."""
    return stop_update(config, deployment, reason, settle_timeout, check_interval) or rollback(
        config, deployment, check_interval
    )


def rollback_outcome(undone: dict) -> str:
    return {
        "restored": f"rolled back to endpoint config {undone['endpoint_config_name']}, which serves again"
        + (f" (the update stopped by its {undone['by']})" if undone.get("by") else ""),
        "deleted": "the endpoint, which this deployment created, was deleted",
        "none": f"nothing to roll back: the endpoint serves {undone['endpoint_config_name']}",
    }[undone["action"]]


def check_endpoint(
    config: PipelineConfig,
    deployment: dict,
    test_data: str,
    test_accuracy: float,
    *,
    thresholds: Thresholds | None = None,
    samples: int = 200,
    concurrency: int = 4,
    metrics_timeout: float = 300.0,
    poll_interval: float = METRICS_POLL_SECONDS,
    check_interval: int = 15,
    alarm_actions: list[str] | None = None,
    settle_timeout: float = 3600.0,
    version: str | None = None,
) -> dict:
    """The monitoring check of a fresh deployment (module docstring). ``test_data``: a directory or S3 prefix with
    the MNIST test files; ``test_accuracy``: the deployed model's; ``version``: its model registry version, which the
    verdict approves (it becomes the champion) or rejects.

    Returns the check's figures (small, for the report); raises MonitoringCheckFailed after rolling back.
    ``settle_timeout`` bounds each wait for the endpoint to finish an update or a rollback.
    """
    from tasks.registry import record_verdict

    thresholds = thresholds or Thresholds()
    name, config_name = deployment["endpoint_name"], deployment["endpoint_config_name"]
    result = {"endpoint_name": name, "endpoint_config_name": config_name, "thresholds": dataclasses.asdict(thresholds)}
    load = metrics = None
    try:
        if not_ready := ready_for_check(config, deployment):
            failures = [not_ready]
        else:
            images, labels = load_test_images(config, test_data, samples)
            client = unretried_runtime_client(config, max_connections=concurrency)
            load = smoke_load(client, name, images, labels, concurrency)
            log.info("Smoke load of endpoint %s: %s", name, load)
            metrics = wait_for_metrics(config, name, load, metrics_timeout, poll_interval)
            log.info("CloudWatch figures of endpoint %s: %s", name, metrics)
            failures = evaluate(load, metrics, thresholds, test_accuracy)
            result["notes"] = unjudged(metrics, thresholds)
            if not failures and deployment.get("baking"):
                log.info("Endpoint %s passed its check while baking: waiting for the bake to end", name)
                described = wait_settled(config, name, settle_timeout, check_interval)
                if described["EndpointConfigName"] != config_name:
                    failures = [f"the update rolled back during its bake: {described.get('FailureReason', '')}"]
            if not failures and (serving := ready_for_check(config, deployment)):
                failures = [f"before its model became champion: {serving}"]  # it changed under the check
    except (Exception, AirflowTaskTimeout) as error:  # an unchecked model does not stay serving, timed out neither
        log.exception("The monitoring check of endpoint %s could not finish", name)
        failures = [f"the check could not finish: {type(error).__name__}: {error}"]
    result.update(load=load, cloudwatch=metrics, failures=failures, passed=not failures)

    if failures:
        verdict = f"Monitoring check of endpoint {name} (config {config_name}) failed: {'; '.join(failures)}"
        try:
            undone = undo(config, deployment, verdict, settle_timeout, check_interval)
        except Exception as error:
            result["rollback"] = {"action": "failed", "error": str(error)}
            raise MonitoringCheckFailed(
                f"{verdict}. Rollback FAILED, {config_name} may still serve: {error}", result
            ) from error
        finally:  # rolled back or not, the version must never be served again
            record_verdict(config, version, passed=False, reason=verdict)
        result["rollback"] = undone
        raise MonitoringCheckFailed(f"{verdict}. {rollback_outcome(undone).capitalize()}.", result)

    record_verdict(
        config,
        version,
        passed=True,
        reason=f"passed its monitoring check on {name} ({config_name}): live accuracy {load['live_accuracy']:.4f}",
    )
    result["champion"] = version
    result["alarms"] = put_alarms(config, name, **alarm_thresholds(thresholds), alarm_actions=alarm_actions)
    log.info("Endpoint %s passed its monitoring check: %s", name, config_name)
    return result
