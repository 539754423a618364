"""The endpoint's CloudWatch alarms: the 5XX error rate per minute and p99 model latency over 5 minutes.

Created before an update, they guard it: UpdateEndpoint names them in its AutoRollbackConfiguration, and SageMaker
(or the local SageMaker service) rolls the update back when one fires while the new model takes traffic. After a
passed monitoring check they stay, watching the endpoint.

The errors alarm watches a rate, not a count: anyone can send a request that fails, so a few failed requests must
not roll a good model back. It is metric math over the minute's Invocation5XXErrors and Invocations, and a minute
with fewer than ``min_rate_requests`` invocations counts as rate 0 (too few requests to tell a failing model from a few
bad callers); a minute with none has no data, which is not breaching.
"""

from __future__ import annotations

import logging

from tasks.config import PipelineConfig
from tasks.names import ENDPOINT_NAMESPACE, endpoint_dimensions

log = logging.getLogger(__name__)

ERRORS_PERIOD_SECONDS = 60
LATENCY_PERIOD_SECONDS = 300


def alarm_names(endpoint_name: str) -> list[str]:
    return [f"{endpoint_name}-invocation-5xx-errors", f"{endpoint_name}-model-latency-p99"]


def error_rate_expression(min_rate_requests: int) -> str:
    """The metric math of the errors alarm, over its queries ``errors`` and ``invocations``: FILL, since a minute
    may have invocations and no error datapoint; IF, so that a minute under ``min_rate_requests`` decides nothing and a
    rate never divides by zero."""
    return f"IF(invocations >= {int(min_rate_requests)}, FILL(errors, 0) / invocations, 0)"


def alarm_requests(
    endpoint_name: str,
    *,
    max_5xx_rate: float,
    min_rate_requests: int,
    alarm_p99_model_latency_ms: float,
    alarm_actions: list[str] | None = None,
) -> dict[str, dict]:
    """The PutMetricAlarm requests of the endpoint's alarms, by alarm name (the thresholds are the monitoring
    check's, under their names and with their defaults there: tasks.policy.Thresholds)."""
    common = {
        "EvaluationPeriods": 1,
        "ComparisonOperator": "GreaterThanThreshold",
        "TreatMissingData": "notBreaching",  # an idle endpoint is a healthy one
        "AlarmActions": alarm_actions or [],
    }

    def query(query_id: str, metric_name: str) -> dict:
        metric = {
            "Namespace": ENDPOINT_NAMESPACE,
            "MetricName": metric_name,
            "Dimensions": endpoint_dimensions(endpoint_name),
        }
        return {
            "Id": query_id,
            "MetricStat": {"Metric": metric, "Period": ERRORS_PERIOD_SECONDS, "Stat": "Sum"},
            "ReturnData": False,
        }

    errors, latency = alarm_names(endpoint_name)
    return {
        errors: {
            "AlarmName": errors,
            **common,
            "Metrics": [
                query("errors", "Invocation5XXErrors"),
                query("invocations", "Invocations"),
                {
                    "Id": "error_rate",
                    "Expression": error_rate_expression(min_rate_requests),
                    "Label": "5XX error rate",
                    "ReturnData": True,
                },
            ],
            "Threshold": float(max_5xx_rate),
            "AlarmDescription": f"Endpoint {endpoint_name}: more than {max_5xx_rate:.2%} of a minute's invocations "
            f"answered 5XX, in a minute of at least {min_rate_requests} invocations",
        },
        latency: {
            "AlarmName": latency,
            **common,
            "Namespace": ENDPOINT_NAMESPACE,
            "Dimensions": endpoint_dimensions(endpoint_name),
            "MetricName": "ModelLatency",
            "ExtendedStatistic": "p99",
            "Period": LATENCY_PERIOD_SECONDS,
            "Threshold": alarm_p99_model_latency_ms * 1000,  # ModelLatency is in microseconds
            "AlarmDescription": f"Endpoint {endpoint_name}: p99 model latency above {alarm_p99_model_latency_ms:g} ms",
        },
    }


def put_alarms(config: PipelineConfig, endpoint_name: str, **thresholds) -> list[str]:
    """Create or update the endpoint's alarms (``thresholds``: ``alarm_requests``' keywords); returns their names."""
    from tasks.hooks import hook

    cloudwatch = hook(config, "cloudwatch").conn
    requests = alarm_requests(endpoint_name, **thresholds)
    for request in requests.values():
        cloudwatch.put_metric_alarm(**request)
    log.info("Alarms for endpoint %s: %s", endpoint_name, ", ".join(requests))
    return list(requests)
