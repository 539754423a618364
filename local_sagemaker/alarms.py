"""CloudWatch alarms evaluated by the service itself, for UpdateEndpoint's AutoRollbackConfiguration.

The local CloudWatch (moto) stores alarms but never evaluates them, and cannot compute percentiles. So while a new
fleet takes traffic, the service reads each named alarm's definition from CloudWatch and evaluates it over the
invocations the runtime saw the new fleet answer: the alarm's metric (Invocations, Invocation4XXErrors,
Invocation5XXErrors, ModelLatency, OverheadLatency of ``AWS/SageMaker`` for this endpoint), its statistic or
extended statistic (``p99`` and the like), over its latest period, against its threshold and comparison. Any
other metric is asked of CloudWatch (GetMetricStatistics) over the same window. An alarm that fires is set to
ALARM in CloudWatch, with the reason, as CloudWatch would.
"""

from __future__ import annotations

import datetime
import logging
import math
import re
import time
from collections.abc import Callable

from local_sagemaker import aws
from local_sagemaker.protocol import ValidationException
from local_sagemaker.runtime import Sample

log = logging.getLogger(__name__)

NAMESPACE = "AWS/SageMaker"
# Metric → its value for one invocation (None: the invocation has none, e.g. no ModelLatency for a refused body).
INVOCATION_METRICS: dict[str, Callable[[Sample], float | None]] = {
    "Invocations": lambda sample: 1.0,
    "Invocation4XXErrors": lambda sample: float(400 <= sample.status < 500),
    "Invocation5XXErrors": lambda sample: float(sample.status >= 500),
    "ModelLatency": lambda sample: sample.model_us,
    "OverheadLatency": lambda sample: sample.overhead_us,
}
PERCENTILE = re.compile(r"p(\d{1,2}(?:\.\d+)?|100)")
COMPARISONS = {
    "GreaterThanThreshold": lambda value, threshold: value > threshold,
    "GreaterThanOrEqualToThreshold": lambda value, threshold: value >= threshold,
    "LessThanThreshold": lambda value, threshold: value < threshold,
    "LessThanOrEqualToThreshold": lambda value, threshold: value <= threshold,
}


def statistic(values: list[float], name: str) -> float | None:
    """CloudWatch's statistic ``name`` (SampleCount, Sum, Average, Minimum, Maximum, pNN) of ``values``."""
    if not values:
        return None
    if name == "SampleCount":
        return float(len(values))
    if name == "Sum":
        return sum(values)
    if name == "Average":
        return sum(values) / len(values)
    if name == "Minimum":
        return min(values)
    if name == "Maximum":
        return max(values)
    if match := PERCENTILE.fullmatch(name):
        ordered = sorted(values)  # nearest rank, as CloudWatch computes percentiles over raw samples
        rank = max(1, math.ceil(float(match[1]) / 100 * len(ordered)))
        return ordered[rank - 1]
    raise ValueError(f"statistic {name!r} is not one this service evaluates")


def describe(names: list[str]) -> list[dict]:
    """The alarms' definitions from CloudWatch; ValidationException naming any that does not exist."""
    if not names:
        return []
    found = aws.client("cloudwatch").describe_alarms(AlarmNames=names)["MetricAlarms"]
    missing = set(names) - {alarm["AlarmName"] for alarm in found}
    if missing:
        raise ValidationException(f"AutoRollbackConfiguration names alarms that do not exist: {sorted(missing)}")
    for alarm in found:
        if alarm.get("Metrics"):
            raise ValidationException(f"Alarm {alarm['AlarmName']}: metric-math alarms are not evaluated here")
        if alarm.get("ComparisonOperator") not in COMPARISONS:
            raise ValidationException(f"Alarm {alarm['AlarmName']}: comparison {alarm.get('ComparisonOperator')} "
                                      "is not evaluated here")  # fmt: skip
    return found


def in_alarm(names: list[str], since: float) -> str | None:
    """The reason, when one of the alarms ``names`` went into ALARM at ``since`` (epoch seconds) or later."""
    if not names:
        return None
    for alarm in aws.client("cloudwatch").describe_alarms(AlarmNames=names, StateValue="ALARM")["MetricAlarms"]:
        if alarm["StateUpdatedTimestamp"].timestamp() >= since - 1:  # CloudWatch keeps whole seconds here
            return f"Alarm {alarm['AlarmName']} is in ALARM: {alarm.get('StateReason', '')}"
    return None


def _own_metric(alarm: dict, endpoint: str) -> bool:
    dimensions = {d["Name"]: d["Value"] for d in alarm.get("Dimensions", [])}
    return (
        alarm.get("Namespace") == NAMESPACE
        and alarm.get("MetricName") in INVOCATION_METRICS
        and dimensions.get("EndpointName") == endpoint
    )


def _from_cloudwatch(alarm: dict, stat: str, start: float) -> float | None:
    end = datetime.datetime.now(datetime.UTC)
    begin = max(datetime.datetime.fromtimestamp(start, datetime.UTC), end - datetime.timedelta(seconds=alarm["Period"]))
    points = aws.client("cloudwatch").get_metric_statistics(
        Namespace=alarm["Namespace"], MetricName=alarm["MetricName"], Dimensions=alarm.get("Dimensions", []),
        StartTime=begin, EndTime=end, Period=max(60, int(alarm["Period"])), Statistics=[stat],
    )["Datapoints"]  # fmt: skip
    values = [point[stat] for point in points if stat in point]
    return statistic(values, "Maximum" if stat != "Sum" else "Sum") if values else None


def evaluate(alarm: dict, endpoint: str, samples: Callable[[float], list[Sample]], since: float) -> str | None:
    """The reason ``alarm`` fires over the window since ``since`` (no earlier than its period ago), else None."""
    stat = alarm.get("ExtendedStatistic") or alarm.get("Statistic")
    start = max(since, time.time() - alarm["Period"])
    if _own_metric(alarm, endpoint):
        extract = INVOCATION_METRICS[alarm["MetricName"]]
        values = [value for sample in samples(start) if (value := extract(sample)) is not None]
        value = statistic(values, stat)
    elif PERCENTILE.fullmatch(stat):
        log.warning("Alarm %s: a percentile of %s cannot be read from the local CloudWatch; not evaluated",
                    alarm["AlarmName"], alarm["MetricName"])  # fmt: skip
        return None
    else:
        value = _from_cloudwatch(alarm, stat, start)
    if value is None:
        if alarm.get("TreatMissingData") != "breaching":
            return None
        reason = f"no {alarm['MetricName']} data, treated as breaching"
    elif COMPARISONS[alarm["ComparisonOperator"]](value, alarm["Threshold"]):
        reason = f"{alarm['MetricName']} {stat} {value:g} {alarm['ComparisonOperator']} {alarm['Threshold']:g}"
    else:
        return None
    message = f"Alarm {alarm['AlarmName']} fired: {reason}"
    try:
        aws.client("cloudwatch").set_alarm_state(AlarmName=alarm["AlarmName"], StateValue="ALARM",
                                                 StateReason=message[:1023])  # fmt: skip
    except Exception as error:  # the rollback matters, the alarm's state in CloudWatch less
        log.warning("Could not set alarm %s to ALARM: %s", alarm["AlarmName"], error)
    return message
