"""The monitoring check after a deployment: smoke load, CloudWatch metrics, then champion and alarms, or rollback.

1. While the new model bakes (an update: all traffic on it, the old fleet kept under the endpoint's alarms), or
   once a new endpoint is InService, send held-out MNIST test images through the real client (boto3
   `sagemaker-runtime` `invoke_endpoint`, wherever the AWS connection points) and measure live accuracy, errors
   and latency percentiles from the load itself.
2. Read the endpoint's CloudWatch metrics over the load's window (`get_metric_data`), polling until the load's
   invocations have arrived, since metrics land late. Percentile statistics are not asked of CloudWatch: the
   local CloudWatch (moto) cannot answer them, and the load measured p50/p99 already.
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
model_data_url, previous_endpoint_config_name, created, deployment_config, baking. A deploy that returned nothing
(it failed, or its timeout ended it, after its CreateEndpoint or UpdateEndpoint) is found from the endpoint's own
state at the end of the run, and undone when what serves, or what the endpoint is updating to, is this run's.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from airflow.sdk.exceptions import AirflowFailException, AirflowTaskTimeout

from tasks.alarms import alarm_names, put_alarms
from tasks.config import PipelineConfig
from tasks.deployment import baking, updating_to, wait_settled
from tasks.hooks import s3_hook, sagemaker_hook
from tasks.names import ENDPOINT_NAMESPACE, INSTANCE_NAMESPACE, endpoint_dimensions
from tasks.policy import Thresholds, alarm_thresholds

log = logging.getLogger(__name__)

# What the check reads from CloudWatch: result key -> (namespace, metric, statistic). Latencies are microseconds.
CLOUDWATCH_METRICS = {
    "invocations": (ENDPOINT_NAMESPACE, "Invocations", "Sum"),
    "invocation_4xx_errors": (ENDPOINT_NAMESPACE, "Invocation4XXErrors", "Sum"),
    "invocation_5xx_errors": (ENDPOINT_NAMESPACE, "Invocation5XXErrors", "Sum"),
    "model_latency_average_us": (ENDPOINT_NAMESPACE, "ModelLatency", "Average"),
    "model_latency_maximum_us": (ENDPOINT_NAMESPACE, "ModelLatency", "Maximum"),
    "cpu_utilization": (INSTANCE_NAMESPACE, "CPUUtilization", "Maximum"),
    "memory_utilization": (INSTANCE_NAMESPACE, "MemoryUtilization", "Maximum"),
}


# Between CloudWatch reads while the load's datapoints arrive: endpoint servers flush theirs once a burst ends.
METRICS_POLL_SECONDS = 1.0


class MonitoringCheckFailed(AirflowFailException):
    """The new deployment failed its check and was rolled back. No retry: a retry would check the old model.

    ``result``: what the check returns on a pass, with ``rollback`` (what the rollback did), for the report.
    """

    def __init__(self, message: str, result: dict | None = None):
        super().__init__(message)
        self.result = result


# --- the smoke load -----------------------------------------------------------------------------------------------


def load_test_images(config: PipelineConfig, source: str, count: int, seed: int = 0):
    """``count`` random held-out test images and their labels, from a directory or an S3 prefix (the channel). From
    S3 they are read as the training script reads its channel (training/channel.py): against the dataset's manifest,
    the manifest against the SHA-256 its prefix names; and neither file may decompress beyond MNIST's sizes."""
    import numpy as np

    from training.channel import MANIFEST, verify
    from training.mnist_idx import IMAGES_MAGIC, LABELS_MAGIC, MNIST_FILES, read_idx

    names = [MNIST_FILES["test_images"], MNIST_FILES["test_labels"]]
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(source)
        if source.startswith("s3://"):
            from airflow.providers.amazon.aws.hooks.s3 import S3Hook

            from tasks.training_jobs import dataset_digest

            s3 = s3_hook(config)
            bucket, prefix = S3Hook.parse_s3_url(source)
            directory = Path(scratch)
            for name in names:
                s3.download_file(
                    f"{prefix.rstrip('/')}/{name}",
                    bucket,
                    local_path=scratch,
                    preserve_file_name=True,
                    use_autogenerated_subdir=False,
                )
            # A dataset the pipeline uploaded has its manifest, named by its prefix; other test data may have one.
            digest = dataset_digest(source).get("dataset_sha256")
            manifest = f"{prefix.rstrip('/')}/{MANIFEST}"
            if digest or s3.check_for_key(manifest, bucket):
                s3.download_file(
                    manifest, bucket, local_path=scratch, preserve_file_name=True, use_autogenerated_subdir=False
                )
            verify(directory, digest, names)
        images = read_idx(directory / MNIST_FILES["test_images"], IMAGES_MAGIC)
        labels = read_idx(directory / MNIST_FILES["test_labels"], LABELS_MAGIC)
    pick = np.random.default_rng(seed).choice(len(images), size=min(count, len(images)), replace=False)
    return images[pick], labels[pick]


def runtime_client(config: PipelineConfig, max_connections: int = 10):
    """boto3 `sagemaker-runtime` client of the AWS connection (its credentials, and its endpoint for the service).
    No retries: the check must see every failure."""
    from botocore.config import Config

    from tasks.hooks import hook as provider_hook

    hook = provider_hook(config, "sagemaker-runtime")
    extra = Config(retries={"total_max_attempts": 1}, max_pool_connections=max_connections)
    return hook.get_session(region_name=config.region).client(
        "sagemaker-runtime",
        endpoint_url=hook.conn_config.get_service_endpoint_url("sagemaker-runtime"),
        config=hook.config.merge(extra),
        verify=hook.verify,
    )


def smoke_load(client, endpoint_name: str, images, labels, concurrency: int = 4) -> dict:
    """Send each image as one JSON request through ``client``; live accuracy, errors and latency of the load."""
    import numpy as np
    from botocore.exceptions import BotoCoreError, ClientError

    def invoke(index: int) -> tuple[float, int | None, str | None]:
        body = json.dumps({"instances": [images[index].tolist()]})
        started = time.perf_counter()
        try:
            reply = client.invoke_endpoint(
                EndpointName=endpoint_name, Body=body, ContentType="application/json", Accept="application/json"
            )
            label = json.loads(reply["Body"].read())["predictions"][0]["label"]
            return time.perf_counter() - started, label, None
        except (ClientError, BotoCoreError, ValueError, KeyError, IndexError) as error:
            return time.perf_counter() - started, None, f"{type(error).__name__}: {error}"

    started_at = datetime.datetime.now(datetime.UTC)
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(invoke, range(len(images))))
    finished_at = datetime.datetime.now(datetime.UTC)
    latencies = [seconds * 1000 for seconds, _, error in results if error is None]
    p50, p99 = np.percentile(latencies, [50, 99]).tolist() if latencies else (None, None)
    errors = [error for _, _, error in results if error is not None]
    correct = sum(label == int(truth) for (_, label, _), truth in zip(results, labels, strict=True))
    return {
        "requests": len(results),
        "errors": len(errors),
        "error_rate": len(errors) / len(results),
        "error_samples": sorted(set(errors))[:3],
        "live_accuracy": correct / len(results),
        "p50_ms": p50,
        "p99_ms": p99,
        "started_at": started_at.isoformat(),
        "finished_at": finished_at.isoformat(),
    }


# --- CloudWatch ----------------------------------------------------------------------------------------------------


def _cloudwatch(config: PipelineConfig):
    from tasks.hooks import hook

    return hook(config, "cloudwatch").conn


def read_metrics(config: PipelineConfig, endpoint_name: str, start: datetime.datetime, end: datetime.datetime) -> dict:
    """The endpoint's CloudWatch figures over [start, end], one number per metric (None when no data arrived)."""
    # Whole minutes, one period over the window: each query answers a single value for the whole load.
    start = start.replace(second=0, microsecond=0)
    end = end.replace(second=0, microsecond=0) + datetime.timedelta(minutes=1)
    period = int((end - start).total_seconds())
    queries = [
        {
            "Id": key,
            "MetricStat": {
                "Metric": {
                    "Namespace": namespace,
                    "MetricName": metric,
                    "Dimensions": endpoint_dimensions(endpoint_name),
                },
                "Period": period,
                "Stat": stat,
            },
        }
        for key, (namespace, metric, stat) in CLOUDWATCH_METRICS.items()
    ]
    paginator = _cloudwatch(config).get_paginator("get_metric_data")
    values: dict[str, list[float]] = {key: [] for key in CLOUDWATCH_METRICS}
    for page in paginator.paginate(MetricDataQueries=queries, StartTime=start, EndTime=end):
        for result in page["MetricDataResults"]:
            values[result["Id"]].extend(result["Values"])
    figures = {}
    for key, (_, _, stat) in CLOUDWATCH_METRICS.items():
        series = values[key]
        if not series:
            figures[key] = None
        elif stat == "Sum":
            figures[key] = sum(series)
        elif stat == "Maximum":
            figures[key] = max(series)
        else:
            figures[key] = sum(series) / len(series)
    figures["invocation_5xx_rate"] = error_rate(figures)
    return figures


def error_rate(figures: dict) -> float | None:
    """The endpoint's 5XX rate among CloudWatch ``figures`` (None without invocations)."""
    invocations = figures["invocations"] or 0
    return (figures["invocation_5xx_errors"] or 0) / invocations if invocations else None


def wait_for_metrics(
    config: PipelineConfig,
    endpoint_name: str,
    load: dict,
    timeout: float = 300.0,
    poll_interval: float = METRICS_POLL_SECONDS,
) -> dict:
    """Poll CloudWatch until the load's invocations have all arrived there, or ``timeout`` passes."""
    start = datetime.datetime.fromisoformat(load["started_at"])
    deadline = time.monotonic() + timeout
    while True:
        # From the load's start up to now, not to the load's end: the local server stamps its datapoints when it
        # publishes them, up to two publishing intervals after the requests they count (a minute boundary between).
        figures = read_metrics(config, endpoint_name, start, datetime.datetime.now(datetime.UTC))
        if (figures["invocations"] or 0) >= load["requests"] or time.monotonic() > deadline:
            figures["waited_s"] = round(timeout - max(0.0, deadline - time.monotonic()), 1)
            return figures
        time.sleep(poll_interval)


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
    _cloudwatch(config).set_alarm_state(AlarmName=alarms[0]["AlarmName"], StateValue="ALARM", StateReason=reason[:1023])
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


def _rollback_outcome(undone: dict) -> str:
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
            client = runtime_client(config, max_connections=concurrency)
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
        raise MonitoringCheckFailed(f"{verdict}. {_rollback_outcome(undone).capitalize()}.", result)

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
    log.warning("Endpoint %s: %s", name, _rollback_outcome(undone))
    return {
        "endpoint_name": name,
        "endpoint_config_name": config_name,
        "passed": False,
        "failures": [failure],
        "load": None,
        "cloudwatch": None,
        "rollback": undone,
    }
