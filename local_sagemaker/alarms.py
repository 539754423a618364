"""CloudWatch alarms evaluated by the service itself, for UpdateEndpoint's AutoRollbackConfiguration.

The local CloudWatch (moto) stores alarms but never evaluates them, and cannot compute percentiles. So while a new
fleet takes traffic, the service reads each named alarm's definition from CloudWatch and evaluates it over the
invocations the runtime saw the new fleet answer: the alarm's metric (Invocations, Invocation4XXErrors,
Invocation5XXErrors, ModelLatency, OverheadLatency of ``AWS/SageMaker`` for this endpoint), its statistic or
extended statistic (``p99`` and the like), over its latest period, against its threshold and comparison. Any
other metric is asked of CloudWatch (GetMetricStatistics) over the same window. An alarm that fires is set to
ALARM in CloudWatch, with the reason, as CloudWatch would.

An alarm on metric math (``Metrics``: metric queries and expressions, the one with ``ReturnData`` its value) is
evaluated the same way, query by query, then its expressions: the arithmetic operators, comparisons, ``IF`` and
``FILL``, which an error rate over a minimum of requests needs. The expressions are parsed, never run as code, and
an alarm using anything else is refused at UpdateEndpoint, naming it, rather than evaluated wrongly.
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
from local_sagemaker.routing import Sample

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
STATISTICS = ("SampleCount", "Sum", "Average", "Minimum", "Maximum")
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


# --- metric math ----------------------------------------------------------------------------------------------------

# The functions of CloudWatch's metric math evaluated here, with their number of arguments: IF(condition, value if
# true, value if false), FILL(value, value where it has no data). Names are case-sensitive, as CloudWatch's are.
FUNCTIONS = {"IF": 3, "FILL": 2}
ARITHMETIC = {
    "+": lambda left, right: left + right,
    "-": lambda left, right: left - right,
    "*": lambda left, right: left * right,
    # CloudWatch returns no datapoint where a division has a zero divisor.
    "/": lambda left, right: None if right == 0 else left / right,
}
RELATIONS = {
    "<": lambda left, right: left < right,
    "<=": lambda left, right: left <= right,
    ">": lambda left, right: left > right,
    ">=": lambda left, right: left >= right,
    "==": lambda left, right: left == right,
    "!=": lambda left, right: left != right,
}
# Metric math CloudWatch has and this service does not evaluate: named in the refusal rather than "unknown name".
LOGICAL_OPERATORS = ("AND", "OR", "NOT")
_TOKEN = re.compile(
    r"\s*(?:(?P<number>(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)|(?P<name>[A-Za-z_][A-Za-z0-9_]*)"
    r"|(?P<operator><=|>=|==|!=|[-+*/(),<>]))"
)


class MetricMathError(ValueError):
    """An expression this service cannot evaluate, or that is not metric math at all; the message names why."""


def tokenize(expression: str) -> list[tuple[str, str, int]]:
    """``expression`` as (kind, text, position) tokens; MetricMathError at the first character no token starts."""
    tokens, position = [], 0
    while position < len(expression):
        match = _TOKEN.match(expression, position)
        if match is None:
            rest = expression[position:].lstrip()
            if not rest:  # trailing blanks
                break
            at = len(expression) - len(rest)
            raise MetricMathError(
                f"{rest[0]!r} at position {at} is not metric math this service evaluates "
                f"(operators + - * / < <= > >= == !=, functions {', '.join(FUNCTIONS)})"
            )
        kind = match.lastgroup
        tokens.append((kind, match[kind], match.start(kind)))
        position = match.end()
    return tokens


class _Parser:
    """Recursive descent over the tokens, lowest precedence first: comparison, then + -, then * /, then a unary
    minus, then numbers, query ids, function calls and parentheses. The tree is nested tuples."""

    def __init__(self, expression: str):
        self.tokens = tokenize(expression)
        self.index = 0

    def parse(self):
        if not self.tokens:
            raise MetricMathError("the expression is empty")
        node = self.comparison()
        if self.index < len(self.tokens):
            raise self.unexpected(self.tokens[self.index])
        return node

    @staticmethod
    def unexpected(token: tuple[str, str, int]) -> MetricMathError:
        _, text, position = token
        if text in LOGICAL_OPERATORS:
            return MetricMathError(f"the logical operator {text} is not evaluated by this service")
        return MetricMathError(f"unexpected {text!r} at position {position}")

    def peek(self) -> str | None:
        return self.tokens[self.index][1] if self.index < len(self.tokens) else None

    def take(self) -> tuple[str, str, int]:
        if self.index >= len(self.tokens):
            raise MetricMathError("the expression ends too early")
        self.index += 1
        return self.tokens[self.index - 1]

    def expect(self, text: str) -> None:
        kind, found, position = self.take()
        if found in LOGICAL_OPERATORS:
            raise self.unexpected((kind, found, position))
        if found != text:
            raise MetricMathError(f"expected {text!r} at position {position}, found {found!r}")

    def comparison(self):
        node = self.additive()
        if self.peek() in RELATIONS:
            node = ("relation", self.take()[1], node, self.additive())
            if self.peek() in RELATIONS:
                raise MetricMathError(
                    f"comparisons do not chain: {self.peek()!r} at position {self.tokens[self.index][2]}"
                )
        return node

    def additive(self):
        node = self.term()
        while self.peek() in ("+", "-"):
            node = ("arithmetic", self.take()[1], node, self.term())
        return node

    def term(self):
        node = self.unary()
        while self.peek() in ("*", "/"):
            node = ("arithmetic", self.take()[1], node, self.unary())
        return node

    def unary(self):
        if self.peek() == "-":
            self.take()
            return ("arithmetic", "-", ("number", 0.0), self.unary())
        return self.primary()

    def primary(self):
        kind, text, position = self.take()
        if kind == "number":
            return ("number", float(text))
        if text == "(":
            node = self.comparison()
            self.expect(")")
            return node
        if kind != "name" or text in LOGICAL_OPERATORS:
            raise self.unexpected((kind, text, position))
        if self.peek() == "(":
            if text not in FUNCTIONS:
                raise MetricMathError(f"function {text} is not evaluated by this service (only {', '.join(FUNCTIONS)})")
            self.take()
            arguments = [self.comparison()]
            while self.peek() == ",":
                self.take()
                arguments.append(self.comparison())
            self.expect(")")
            if len(arguments) != FUNCTIONS[text]:
                raise MetricMathError(f"{text} takes {FUNCTIONS[text]} arguments, not {len(arguments)}")
            return ("call", text, arguments)
        return ("id", text)


def parse_expression(expression: str):
    """The parsed tree of a metric math ``expression``; MetricMathError naming what this service does not evaluate."""
    return _Parser(expression).parse()


def names_in(node) -> set[str]:
    """The query ids an expression tree refers to."""
    if node[0] == "id":
        return {node[1]}
    if node[0] == "number":
        return set()
    children = node[2] if node[0] == "call" else node[2:]
    return set().union(*(names_in(child) for child in children))


def evaluate_expression(node, value_of: Callable[[str], float | None]) -> float | None:
    """The value of an expression tree, ``value_of`` giving each query's (None: no data). No data stays no data
    through arithmetic and comparisons; FILL gives it a value; IF takes the branch its condition picks."""
    kind = node[0]
    if kind == "number":
        return node[1]
    if kind == "id":
        return value_of(node[1])
    if kind == "call" and node[1] == "FILL":
        value = evaluate_expression(node[2][0], value_of)
        return evaluate_expression(node[2][1], value_of) if value is None else value
    if kind == "call":  # IF
        condition = evaluate_expression(node[2][0], value_of)
        if condition is None:
            return None
        return evaluate_expression(node[2][1] if condition != 0 else node[2][2], value_of)
    left, right = evaluate_expression(node[2], value_of), evaluate_expression(node[3], value_of)
    if left is None or right is None:
        return None
    if kind == "relation":
        return float(RELATIONS[node[1]](left, right))
    return ARITHMETIC[node[1]](left, right)


def metric_math(alarm: dict) -> tuple[dict[str, object], str]:
    """A metric-math alarm's expressions, parsed (query id → tree), and the id of the query whose value the alarm
    compares (its one ``ReturnData``). ValidationException, naming the alarm and the query, for anything this
    service does not evaluate, or that CloudWatch would refuse: an id used twice, a query that is neither a
    metric nor an expression, an expression naming no query of the alarm, a cycle."""
    name = alarm["AlarmName"]
    queries = alarm["Metrics"]
    ids = [query.get("Id") for query in queries]
    if len(set(ids)) != len(ids):
        raise ValidationException(f"Alarm {name}: its metric query ids are not unique: {ids}")
    parsed: dict[str, object] = {}
    for query in queries:
        if ("Expression" in query) == ("MetricStat" in query):
            raise ValidationException(
                f"Alarm {name}: metric query {query['Id']} must have exactly one of MetricStat and Expression"
            )
        if "MetricStat" in query:
            stat = query["MetricStat"].get("Stat", "")
            if stat not in STATISTICS and not PERCENTILE.fullmatch(stat):
                raise ValidationException(
                    f"Alarm {name}: metric query {query['Id']}: statistic {stat!r} is not evaluated by this service"
                )
            continue
        try:
            parsed[query["Id"]] = tree = parse_expression(query["Expression"])
        except MetricMathError as error:
            raise ValidationException(
                f"Alarm {name}: expression {query['Id']} ({query['Expression']}): {error}"
            ) from None
        if unknown := names_in(tree) - set(ids):
            raise ValidationException(
                f"Alarm {name}: expression {query['Id']} names {', '.join(sorted(unknown))}, "
                "which no metric query of the alarm is"
            )
    returned = [query["Id"] for query in queries if query.get("ReturnData", True)]
    if len(returned) != 1:
        raise ValidationException(
            f"Alarm {name}: exactly one metric query must have ReturnData true, not {len(returned)}: {returned}"
        )

    def visit(query_id: str, path: tuple[str, ...]) -> None:
        if query_id in path:
            raise ValidationException(
                f"Alarm {name}: its expressions refer to each other in a cycle: {' -> '.join((*path, query_id))}"
            )
        for child in names_in(parsed[query_id]) & parsed.keys():  # expressions it uses; metrics end a path
            visit(child, (*path, query_id))

    for query_id in parsed:
        visit(query_id, ())
    return parsed, returned[0]


# --- the alarms of an update ----------------------------------------------------------------------------------------


def describe(names: list[str]) -> list[dict]:
    """The alarms' definitions from CloudWatch; ValidationException naming any that does not exist, or that this
    service cannot evaluate."""
    if not names:
        return []
    found = aws.client("cloudwatch").describe_alarms(AlarmNames=names)["MetricAlarms"]
    missing = set(names) - {alarm["AlarmName"] for alarm in found}
    if missing:
        raise ValidationException(f"AutoRollbackConfiguration names alarms that do not exist: {sorted(missing)}")
    for alarm in found:
        if alarm.get("Metrics"):
            metric_math(alarm)
        if alarm.get("ComparisonOperator") not in COMPARISONS:
            raise ValidationException(
                f"Alarm {alarm['AlarmName']}: comparison {alarm.get('ComparisonOperator')} is not evaluated here"
            )
    return found


def in_alarm(names: list[str], since: float) -> str | None:
    """The reason, when one of the alarms ``names`` went into ALARM at ``since`` (epoch seconds) or later."""
    if not names:
        return None
    for alarm in aws.client("cloudwatch").describe_alarms(AlarmNames=names, StateValue="ALARM")["MetricAlarms"]:
        # Filtered here as well: the local CloudWatch ignores StateValue when AlarmNames is given, and an alarm
        # merely created or updated since (state OK) must not roll an update back. CloudWatch keeps whole seconds.
        if alarm["StateValue"] == "ALARM" and alarm["StateUpdatedTimestamp"].timestamp() >= since - 1:
            return f"Alarm {alarm['AlarmName']} is in ALARM: {alarm.get('StateReason', '')}"
    return None


def _own_metric(metric: dict, endpoint: str) -> bool:
    dimensions = {d["Name"]: d["Value"] for d in metric.get("Dimensions", [])}
    return (
        metric.get("Namespace") == NAMESPACE
        and metric.get("MetricName") in INVOCATION_METRICS
        and dimensions.get("EndpointName") == endpoint
    )


def _from_cloudwatch(metric: dict, stat: str, period: int, start: float) -> float | None:
    end = datetime.datetime.now(datetime.UTC)
    begin = max(datetime.datetime.fromtimestamp(start, datetime.UTC), end - datetime.timedelta(seconds=period))
    points = aws.client("cloudwatch").get_metric_statistics(
        Namespace=metric["Namespace"],
        MetricName=metric["MetricName"],
        Dimensions=metric.get("Dimensions", []),
        StartTime=begin,
        EndTime=end,
        Period=max(60, int(period)),
        Statistics=[stat],
    )["Datapoints"]
    values = [point[stat] for point in points if stat in point]
    return statistic(values, "Maximum" if stat != "Sum" else "Sum") if values else None


def metric_value(
    metric: dict, stat: str, period: int, endpoint: str, samples: Callable[[float], list[Sample]], since: float
) -> float | None:
    """``stat`` of ``metric`` (Namespace, MetricName, Dimensions) over its latest ``period``, no earlier than
    ``since``: from the new fleet's invocations when it is one of this endpoint's, else from CloudWatch."""
    start = max(since, time.time() - period)
    if _own_metric(metric, endpoint):
        extract = INVOCATION_METRICS[metric["MetricName"]]
        return statistic([value for sample in samples(start) if (value := extract(sample)) is not None], stat)
    if PERCENTILE.fullmatch(stat):
        log.warning("A percentile of %s cannot be read from the local CloudWatch; not evaluated", metric["MetricName"])
        return None
    return _from_cloudwatch(metric, stat, period, start)


def math_value(alarm: dict, endpoint: str, samples: Callable[[float], list[Sample]], since: float):
    """A metric-math alarm's value and how it came about (each query's value, for the reason)."""
    trees, returned = metric_math(alarm)
    queries = {query["Id"]: query for query in alarm["Metrics"]}
    values: dict[str, float | None] = {}

    def value_of(query_id: str) -> float | None:
        if query_id not in values:
            query = queries[query_id]
            if query_id in trees:
                values[query_id] = evaluate_expression(trees[query_id], value_of)
            else:
                stat = query["MetricStat"]
                values[query_id] = metric_value(stat["Metric"], stat["Stat"], stat["Period"], endpoint, samples, since)
        return values[query_id]

    value = value_of(returned)
    inputs = ", ".join(
        f"{key} {'no data' if values[key] is None else f'{values[key]:g}'}"
        for key in queries
        if key in values and key != returned
    )
    label = queries[returned].get("Label") or returned
    described = f"{label} ({queries[returned].get('Expression', returned)}; {inputs})"
    return value, described


def evaluate(alarm: dict, endpoint: str, samples: Callable[[float], list[Sample]], since: float) -> str | None:
    """The reason ``alarm`` fires over the window since ``since`` (no earlier than its period ago), else None."""
    if alarm.get("Metrics"):
        value, described = math_value(alarm, endpoint, samples, since)
    else:
        stat = alarm.get("ExtendedStatistic") or alarm.get("Statistic")
        value = metric_value(alarm, stat, alarm["Period"], endpoint, samples, since)
        described = f"{alarm['MetricName']} {stat}"
    if value is None:
        if alarm.get("TreatMissingData") != "breaching":
            return None
        reason = f"no {described} data, treated as breaching"
    elif COMPARISONS[alarm["ComparisonOperator"]](value, alarm["Threshold"]):
        reason = f"{described} {value:g} {alarm['ComparisonOperator']} {alarm['Threshold']:g}"
    else:
        return None
    message = f"Alarm {alarm['AlarmName']} fired: {reason}"
    try:
        aws.client("cloudwatch").set_alarm_state(
            AlarmName=alarm["AlarmName"], StateValue="ALARM", StateReason=message[:1023]
        )
    except Exception as error:  # the rollback matters, the alarm's state in CloudWatch less
        log.warning("Could not set alarm %s to ALARM: %s", alarm["AlarmName"], error)
    return message
