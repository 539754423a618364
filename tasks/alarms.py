"""The endpoint's CloudWatch alarms: 5XX errors per minute and p99 model latency over 5 minutes.

Created before an update, they guard it: UpdateEndpoint names them in its AutoRollbackConfiguration, and SageMaker
(or the local SageMaker service) rolls the update back when one fires while the new model takes traffic. After a
passed monitoring check they stay, watching the endpoint.
"""

from __future__ import annotations

import logging

from tasks.config import PipelineConfig
from tasks.names import ENDPOINT_NAMESPACE, endpoint_dimensions

log = logging.getLogger(__name__)


def alarm_names(endpoint_name: str) -> list[str]:
    return [f"{endpoint_name}-invocation-5xx-errors", f"{endpoint_name}-model-latency-p99"]


def put_alarms(
    config: PipelineConfig,
    endpoint_name: str,
    *,
    max_5xx_errors: int = 0,
    max_p99_latency_ms: float = 200.0,
    alarm_actions: list[str] | None = None,
) -> list[str]:
    """Create or update the endpoint's alarms; returns their names."""
    from tasks.hooks import hook

    cloudwatch = hook(config, "cloudwatch").conn
    common = {
        "Namespace": ENDPOINT_NAMESPACE,
        "Dimensions": endpoint_dimensions(endpoint_name),
        "EvaluationPeriods": 1,
        "ComparisonOperator": "GreaterThanThreshold",
        "TreatMissingData": "notBreaching",  # an idle endpoint is a healthy one
        "AlarmActions": alarm_actions or [],
    }
    errors, latency = alarm_names(endpoint_name)
    alarms = {
        errors: {
            "MetricName": "Invocation5XXErrors",
            "Statistic": "Sum",
            "Period": 60,
            "Threshold": float(max_5xx_errors),
            "AlarmDescription": f"Endpoint {endpoint_name} answered more than {max_5xx_errors} 5XX errors in a minute",
        },
        latency: {
            "MetricName": "ModelLatency",
            "ExtendedStatistic": "p99",
            "Period": 300,
            "Threshold": max_p99_latency_ms * 1000,  # ModelLatency is in microseconds
            "AlarmDescription": f"Endpoint {endpoint_name}: p99 model latency above {max_p99_latency_ms:g} ms",
        },
    }
    for name, alarm in alarms.items():
        cloudwatch.put_metric_alarm(AlarmName=name, **common, **alarm)
    log.info("Alarms for endpoint %s: %s", endpoint_name, ", ".join(alarms))
    return list(alarms)
