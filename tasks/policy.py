"""The run's policy: the defaults and bounds of the DAGs' forms, and the waits, traffic and alarms that a run's params
make. Each value is defined here once; the modules that act on them import it.

Light: the DAGs import it as they parse, so it imports nothing but Airflow's configuration. Every function takes
the run's params (or parts of them) and decides nothing else.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Mapping

from airflow.sdk.configuration import conf

# -- the gate and approval ----------------------------------------------------------------------------------------

DEFAULT_MIN_TEST_ACCURACY = 0.9
# Retraining the same network moves test accuracy by a few tenths of a point by chance alone; refusing a model for
# that would freeze the endpoint on one lucky model.
DEFAULT_TOLERANCE = 0.005
APPROVAL_MODES = ("auto", "manual")  # the sweep's `approval` param
# The form's approval_timeout (minutes): how long a run waits for a person's answer. The run's own timeout makes
# room for the longest wait (DAGRUN_TIMEOUT).
DEFAULT_TIMEOUT_MINUTES, MAX_TIMEOUT_MINUTES = 24 * 60, 7 * 24 * 60

# -- training and tuning ------------------------------------------------------------------------------------------

MAX_RUNTIME_SECONDS = 2 * 3600  # each training job's MaxRuntimeInSeconds
STRATEGIES = ("Bayesian", "Random", "Grid", "Hyperband")  # the tuning job's strategies, as the form offers them

# -- deployment: blue/green traffic and its waits -----------------------------------------------------------------

ENDPOINT_INSTANCE_TYPE = "ml.m5.large"  # the endpoint's instances
TRANSFORM_INSTANCE_TYPE = "ml.m5.large"  # the batch transform's, unless its form names another
# Data capture: the share of invocations whose input and output the endpoint keeps (the form's capture_percentage).
DEFAULT_CAPTURE_PERCENT = 100
TRAFFIC_SHIFTS = ("all_at_once", "canary", "linear")
# The form's bounds on the traffic params. A step of 10-50% of the fleet is what SageMaker allows a linear shift
# (and a canary at most 50%): ten steps at most, each held at most MAX_TRAFFIC_WAIT_SECONDS.
MIN_TRAFFIC_PERCENT, MAX_TRAFFIC_PERCENT = 10, 50
MAX_TRAFFIC_WAIT_SECONDS = 600
MAX_BAKE_SECONDS = 1800
# How long a new fleet may take to come up, and the margin of each wait on the endpoint: SageMaker's smallest
# MaximumExecutionTimeoutInSeconds, ample for one model.
MAX_UPDATE_SECONDS = 600
MAX_EXECUTION_SECONDS = 28_800  # the API's upper bound
# The deploy task's execution_timeout. The form bounds the traffic params (tasks.params) so that the longest deploy
# they allow (deploy_seconds) fits in it: a timeout that ended the task mid-update would leave the update running
# unwatched by the task (the run's teardown then undoes it: tasks.unchecked.roll_back_unchecked).
DEPLOY_TIMEOUT_SECONDS = 3 * 3600
# The bake time's default: the monitoring check runs in it, so it outlasts the check (on AWS, CloudWatch's metrics
# take minutes to arrive; the local stack's take a second and it sets a shorter one).
DEFAULT_BAKE_SECONDS = conf.getint("mnist_pipeline", "bake_seconds", fallback=600)
if not 0 <= DEFAULT_BAKE_SECONDS <= MAX_BAKE_SECONDS:  # else every run would be refused for its default
    raise ValueError(f"[mnist_pipeline] bake_seconds {DEFAULT_BAKE_SECONDS} is outside the form's 0-{MAX_BAKE_SECONDS}")


def traffic_of(params: Mapping) -> dict:
    """``deployment_config``'s traffic arguments from a run's params (the form's traffic fields)."""
    return {
        "traffic_shift": params["traffic_shift"],
        "percent": params["traffic_percent"],
        "wait_seconds": params["traffic_wait_seconds"],
        "bake_seconds": params["bake_seconds"],
    }


def traffic_steps(traffic_shift: str, percent: int) -> int:
    """How many times the traffic moves: once all at once, twice for a canary, once per ``percent`` linearly."""
    if traffic_shift not in TRAFFIC_SHIFTS:
        raise ValueError(f"traffic_shift {traffic_shift!r} is not one of {', '.join(TRAFFIC_SHIFTS)}")
    return {"all_at_once": 1, "canary": 2, "linear": -(-100 // max(percent, 1))}[traffic_shift]


def update_seconds(
    traffic_shift: str = "all_at_once", *, percent: int = 20, wait_seconds: int = 0, bake_seconds: int = 0
) -> int:
    """The longest a blue/green update with these settings may run: its new fleet launched, each step but the last
    held ``wait_seconds``, the last one baked. It is the update's MaximumExecutionTimeoutInSeconds: SageMaker rolls
    back an update still running then, so every wait on the update ends within it."""
    waits = (traffic_steps(traffic_shift, percent) - 1) * wait_seconds
    return min(MAX_EXECUTION_SECONDS, MAX_UPDATE_SECONDS + waits + bake_seconds)


def settle_timeout(params: Mapping) -> int:
    """How long the monitoring check and the undoing of an unchecked deployment wait for a run's update to end: the
    longest it may run, after which SageMaker has rolled it back."""
    return update_seconds(**traffic_of(params))


def wait_timeout(update_seconds: int | None) -> int:
    """How long the deploy waits for a change of the endpoint: an update's MaximumExecutionTimeoutInSeconds (None:
    a CreateEndpoint, three fleets' launch), with a poll's margin."""
    if update_seconds is None:
        return MAX_UPDATE_SECONDS * 3
    return update_seconds + MAX_UPDATE_SECONDS


def deploy_seconds(params: Mapping) -> int:
    """The longest the deploy task may run with a run's ``params``: an earlier update settling first, then this
    run's update, waited for until it ends at the latest, with a poll's margin (``deploy``'s own waits)."""
    return wait_timeout(None) + wait_timeout(settle_timeout(params))


# -- the monitoring check and the endpoint's alarms ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """What a deployment must meet; the DAG exposes each as a param. None leaves a figure reported but unchecked."""

    min_live_accuracy: float = 0.9
    # Live accuracy on held-out images may fall this far below the model's test accuracy, no further.
    max_accuracy_drop: float = 0.05
    # Failed smoke requests / sent. The load sends only valid requests: its own 4xx are errors too.
    max_error_rate: float = 0.0
    max_p99_latency_ms: float = 1000.0  # client side, round trip included
    max_model_latency_ms: float = 200.0  # CloudWatch ModelLatency Average over the window
    # The endpoint's 5XX rate (CloudWatch Invocation5XXErrors / Invocations: everyone's requests), judged only over
    # at least min_rate_requests invocations; the errors alarm holds the same rate per minute. The load's own
    # errors fail it at max_error_rate already: this catches failures the load did not meet, without letting a
    # few bad requests from anyone veto a deployment.
    max_5xx_rate: float = 0.05
    min_rate_requests: int = 100
    # Under a smoke load the CPU is busy by design, and SageMaker counts 100% per core: not checked by default.
    max_cpu_utilization: float | None = None
    max_memory_utilization: float | None = 90.0
    # The alarm created on a pass: p99 ModelLatency over 5 minutes above this (CloudWatch evaluates percentiles).
    alarm_p99_model_latency_ms: float = 250.0

    @classmethod
    def from_params(cls, params: Mapping) -> Thresholds:
        """The thresholds among ``params`` (a DAG run's params, say); defaults for the rest."""
        return cls(**{field.name: params[field.name] for field in dataclasses.fields(cls) if field.name in params})


# The thresholds that the endpoint's alarms hold too, as the check names them (tasks.alarms.put_alarms' keywords).
ALARM_THRESHOLDS = ("max_5xx_rate", "min_rate_requests", "alarm_p99_model_latency_ms")


def alarm_thresholds(thresholds: Thresholds) -> dict:
    """The endpoint's alarms' thresholds (``tasks.alarms.put_alarms``' keywords) from the check's."""
    return {name: getattr(thresholds, name) for name in ALARM_THRESHOLDS}


# -- the drift check ----------------------------------------------------------------------------------------------

# The form's bounds: how few requests a window needs to be judged, and how many one check reads at most. The
# thresholds hold no clean window of 500 requests or more past them (data_checks.drift.MIN_REQUESTS, pinned to this
# by tests/test_drift_stats.py; that module imports numpy, too heavy for the form, which the DAG reads as it parses).
MIN_REQUESTS_BOUNDS = (500, 100_000)
DEFAULT_MIN_REQUESTS = 500
MAX_REQUESTS_BOUNDS = (100, 1_000_000)
DEFAULT_MAX_REQUESTS = 200_000

# -- the sweep DAG's tasks and run --------------------------------------------------------------------------------

# Seconds between status polls of SageMaker jobs and endpoints (the local stack polls every 2).
SAGEMAKER_CHECK_INTERVAL = conf.getint("mnist_pipeline", "sagemaker_check_interval", fallback=30)
# Stream each job's CloudWatch log into its task's log (the provider's training operator, reading the job's status
# every interval above while it does, not every 30 s).
PRINT_TRAINING_LOG = conf.getboolean("mnist_pipeline", "print_training_log", fallback=True)
# How long a failed task waits before its retry (a training job a crash ended is started again under a new name).
RETRY_DELAY = datetime.timedelta(seconds=conf.getint("mnist_pipeline", "retry_delay_seconds", fallback=60))
# A task's bound unless it has its own below.
TASK_TIMEOUT = datetime.timedelta(minutes=30)
# The retry wait of the batch predictions' and the drift check's tasks, whose retries restart no training job.
QUICK_RETRY_DELAY = datetime.timedelta(seconds=30)
# The first date of every DAG's schedule; no run before the DAG is deployed is caught up.
START_DATE = datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC)


def dag_defaults(retry_delay: datetime.timedelta = QUICK_RETRY_DELAY) -> dict:
    """The @dag keywords every DAG of the pipeline shares: its start date, no catch-up, and each task's owner, two
    retries ``retry_delay`` apart and the TASK_TIMEOUT bound (a task with its own timeout sets it itself)."""
    return {
        "start_date": START_DATE,
        "catchup": False,
        "default_args": {
            "owner": "mlops",
            "retries": 2,
            "retry_delay": retry_delay,
            "execution_timeout": TASK_TIMEOUT,
        },
    }


# A training job may run MaxRuntimeInSeconds after waiting for its instances; a tuning job runs its jobs a few at a
# time; deploy and check wait out traffic shifts and the bake, whose fields the form bounds so that the longest
# update fits the deploy's timeout (tasks.params checks it as the DAG parses).
TRAIN_TIMEOUT = datetime.timedelta(seconds=MAX_RUNTIME_SECONDS) + datetime.timedelta(hours=1)
TUNE_TIMEOUT = datetime.timedelta(hours=11)
DEPLOY_TIMEOUT = datetime.timedelta(seconds=DEPLOY_TIMEOUT_SECONDS)
# A run may wait for a person's approval as long as the form allows, on top of the rest.
DAGRUN_TIMEOUT = datetime.timedelta(hours=12) + datetime.timedelta(minutes=MAX_TIMEOUT_MINUTES)
# A run still going after this long (from when it was queued) alerts the topic, well before the timeout ends it.
DEADLINE = datetime.timedelta(seconds=conf.getint("mnist_pipeline", "deadline_seconds", fallback=4 * 3600))
