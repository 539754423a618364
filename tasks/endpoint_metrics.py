"""What the endpoint's CloudWatch metrics say over the smoke load's window.

The monitoring check (tasks.monitoring) reads them with `get_metric_data`, polling until the load's invocations
have arrived, since metrics land late. Percentile statistics are not asked of CloudWatch: the local CloudWatch
(moto) cannot answer them, and the load (tasks.smoke_load) measured p50/p99 already.
"""

from __future__ import annotations

import datetime
import time

from tasks.config import PipelineConfig
from tasks.names import ENDPOINT_NAMESPACE, INSTANCE_NAMESPACE, endpoint_dimensions

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


def cloudwatch_client(config: PipelineConfig):
    """The boto3 CloudWatch client of the AWS connection."""
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
    paginator = cloudwatch_client(config).get_paginator("get_metric_data")
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
