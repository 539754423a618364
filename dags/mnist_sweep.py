"""
# MNIST hidden_channels sweep

Trains one SageMaker training job per `hidden_channels` value **in parallel**, picks the most accurate model and
serves it on an endpoint: the seed project's sweep, scheduled and repeatable.

**Chain:** download MNIST (checksums verified) → validate it (great-expectations, fail closed) → upload it to
S3 (content-addressed) → build one CreateTrainingJob request per `hidden_channels` value → train (mapped) → select
the best by test accuracy (ties: fewer parameters) → **gate** → deploy → **monitoring check** → report.

**Safe deployment.** The gate lets the best model through only when its test accuracy reaches
`min_test_accuracy` and the accuracy of the model serving now (the champion) minus `accuracy_tolerance`;
otherwise deployment is skipped, the run succeeds and the report says why. The deployment creates the endpoint or
updates it blue/green, with a model and an endpoint config named after the run. The monitoring check then sends a
smoke load of held-out test images through `sagemaker-runtime` and reads the endpoint's CloudWatch metrics
against the thresholds below; on an update it runs while the new model bakes (all traffic on it, the old one kept
under the alarms), and the run waits for the bake to end before the model becomes champion. Pass: the model becomes the champion and the endpoint's alarms (5XX errors, p99
latency) are created or updated. Fail: the endpoint goes back to the previous model (or is deleted when this run
created it) and the run fails, naming each failed threshold and its observed value. The report is written
whatever happened (a teardown task: the run's state comes from the work before it).

**Where it runs** is the AWS connection's business (`aws_conn_id` in the `mnist_pipeline` configuration), never
this file's: every step talks SageMaker, S3 and CloudWatch through the Amazon provider. Against AWS the connection
points at AWS; on a laptop (`mnist-pipeline up`) it points SageMaker at the local SageMaker service, which really
runs the training jobs and the endpoints, and S3 and CloudWatch at the local AWS.

**Trigger form:** every field has bounds; an invalid value is refused there, and a run started with one through
the API fails at its first task, naming the param. Empty optional fields keep the preset's value.
"""

from __future__ import annotations

import dataclasses
import datetime

from airflow.sdk import Param, chain, dag, task
from airflow.sdk.configuration import conf
from airflow.sdk.definitions.deadline import AsyncCallback, DeadlineAlert, DeadlineReference

from tasks.gate import DEFAULT_MIN_TEST_ACCURACY, DEFAULT_TOLERANCE
from tasks.monitoring import Thresholds
from tasks.names import DAG_ID, DEFAULT_ENDPOINT
from tasks.notifications import PipelineNotifier, deadline_missed
from tasks.registry import RegisterModelVersionOperator
from tasks.training_jobs import MAX_RUNTIME_SECONDS
from tasks.training_operator import TrainingOperator

SECTION_SWEEP, SECTION_RESOURCES, SECTION_DATA = "Sweep", "Resources (SageMaker)", "Data and deployment"
SECTION_GATE, SECTION_CHECK = "Gate", "Monitoring check"
# Seconds between status polls of SageMaker jobs and endpoints (the local stack polls every 2).
SAGEMAKER_CHECK_INTERVAL = conf.getint("mnist_pipeline", "sagemaker_check_interval", fallback=30)
# Stream each job's CloudWatch log into its task's log (TrainingOperator: the provider's, reading the job's status
# every interval above while it does, not every 30 s).
PRINT_TRAINING_LOG = conf.getboolean("mnist_pipeline", "print_training_log", fallback=True)
# The bake time's default: the monitoring check runs in it, so it outlasts the check (on AWS, CloudWatch's
# metrics take minutes to arrive; the local stack's take a second and it sets a shorter one).
DEFAULT_BAKE_SECONDS = conf.getint("mnist_pipeline", "bake_seconds", fallback=600)
# How long a failed task waits before its retry (a training job a crash ended is started again under a new name).
RETRY_DELAY = datetime.timedelta(seconds=conf.getint("mnist_pipeline", "retry_delay_seconds", fallback=60))


def _optional(kind: str, title: str, description: str, **schema) -> Param:
    """A hyperparameter that keeps the preset's value unless set."""
    return Param(None, type=["null", kind], title=title, description=description, section=SECTION_SWEEP, **schema)


PARAMS = {
    "hidden_channels": Param(
        [2, 5, 10, 20, 32],
        type="array",
        items={"type": "integer", "minimum": 1, "maximum": 256},
        minItems=1,
        maxItems=16,
        uniqueItems=True,
        title="hidden_channels values",
        description="One training job per value (1-16 distinct integers, each 1-256), e.g. [2, 5, 10, 20, 32].",
        section=SECTION_SWEEP,
    ),
    "preset": Param(
        "seed",
        type="string",
        enum=["seed", "accurate"],
        title="Recipe",
        description="seed: the seed's CNN and settings (2 epochs, SGD). accurate: BatchNorm CNN, augmentation, "
        "OneCycle (99.5%+ in about 10 epochs).",
        section=SECTION_SWEEP,
    ),
    "epochs": _optional("integer", "Epochs", "Passes over the training set (1-100).", minimum=1, maximum=100),
    "optimizer": _optional("string", "Optimizer", "sgd, adam or adamw.", enum=[None, "sgd", "adam", "adamw"]),
    "lr": _optional("number", "Learning rate", "Peak learning rate (0.00001-10).", minimum=1e-5, maximum=10),
    "batch_size": _optional("integer", "Batch size", "Training batch size (1-4096).", minimum=1, maximum=4096),
    "dropout": _optional("number", "Dropout", "Dropout probability (0-0.9).", minimum=0, maximum=0.9),
    "kernel_size": _optional("integer", "Kernel size", "Convolution kernel size (odd, 3-7).", enum=[None, 3, 5, 7]),
    "instance_type": Param(
        "ml.m5.xlarge",
        type="string",
        pattern=r"^ml\.[a-z0-9]+\.[a-z0-9]+(?!\n)$",  # (?!\n): Python's $ would also match before a final newline
        title="Training instance type",
        description="SageMaker instance type per job, e.g. ml.m5.xlarge or ml.g5.xlarge (GPU). Locally: this machine.",
        section=SECTION_RESOURCES,
    ),
    "instance_count": Param(
        1,
        type="integer",
        minimum=1,
        maximum=8,
        title="Instances per job",
        description="More than one trains with distributed data parallel (locally: that many processes).",
        section=SECTION_RESOURCES,
    ),
    "mnist_mirror": Param(
        None,
        type=["null", "string"],
        maxLength=1000,
        title="MNIST mirror",
        description="URL or directory with the four MNIST files, where the configuration allows one (the public "
        "mirrors by default); empty: $MNIST_MIRROR, else the public mirrors.",
        section=SECTION_DATA,
    ),
    "deploy": Param(
        True,
        type="boolean",
        title="Deploy",
        description="Serve the best model on the endpoint, when the gate lets it through.",
        section=SECTION_DATA,
    ),
    "endpoint_name": Param(
        DEFAULT_ENDPOINT,
        type="string",
        pattern=r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}(?!\n)$",  # matched whole, a trailing newline too
        title="Endpoint name",
        description="SageMaker endpoint to create or update: letters, digits and hyphens, at most 63.",
        section=SECTION_DATA,
    ),
    "traffic_shift": Param(
        "all_at_once",
        type="string",
        enum=["all_at_once", "canary", "linear"],
        title="Traffic shift",
        description="How an update moves traffic to the new model (blue/green): all at once, a canary share first, "
        "or in linear steps. The endpoint's alarms roll it back by themselves when one fires meanwhile.",
        section=SECTION_DATA,
    ),
    "traffic_percent": Param(
        20,
        type="integer",
        minimum=1,
        maximum=100,
        title="Canary size / linear step (%)",
        description="Share of capacity the canary takes first, or each linear step adds (1-100).",
        section=SECTION_DATA,
    ),
    "traffic_wait_seconds": Param(
        10,
        type="integer",
        minimum=0,
        maximum=3600,
        title="Wait between shifts (s)",
        description="How long the canary or each linear step takes traffic before the next (0-3600).",
        section=SECTION_DATA,
    ),
    "bake_seconds": Param(
        DEFAULT_BAKE_SECONDS,
        type="integer",
        minimum=0,
        maximum=3600,
        title="Bake time (s)",
        description="How long the old model is kept, under the alarms, once all traffic has moved: the monitoring "
        "check runs meanwhile, and a failed check switches back to it at once (0-3600).",
        section=SECTION_DATA,
    ),
    "min_test_accuracy": Param(
        DEFAULT_MIN_TEST_ACCURACY,
        type="number",
        minimum=0,
        maximum=1,
        title="Minimum test accuracy",
        description="Deploy only a model with at least this test accuracy (a fraction, 0-1; the seed reaches ~0.96).",
        section=SECTION_GATE,
    ),
    "accuracy_tolerance": Param(
        DEFAULT_TOLERANCE,
        type="number",
        minimum=0,
        maximum=1,
        title="Tolerance against the champion",
        description="Deploy only a model no worse than the serving model's test accuracy minus this (0-1).",
        section=SECTION_GATE,
    ),
}

# The monitoring check: name → (type, title, description, minimum, maximum). Threshold names are the fields of
# tasks.monitoring.Thresholds, whose defaults they take.
# fmt: off
CHECK_PARAMS = {
    "smoke_requests": ("integer", "Smoke requests", "Held-out test images sent, one request each.", 1, 10_000),
    "metrics_timeout": ("integer", "CloudWatch wait (s)", "How long to wait for the load's metrics to arrive.",
                        0, 3600),
    "min_live_accuracy": ("number", "Minimum live accuracy", "Accuracy of the answers to the smoke load.", 0, 1),
    "max_accuracy_drop": ("number", "Maximum accuracy drop",
                          "How far live accuracy may fall below the model's test accuracy.", 0, 1),
    "max_error_rate": ("number", "Maximum error rate", "Failed smoke requests / requests sent.", 0, 1),
    "max_p99_latency_ms": ("number", "Maximum p99 latency (ms)", "Client-side p99 of the smoke load, round trip "
                           "included.", 1, 60_000),
    "max_model_latency_ms": ("number", "Maximum model latency (ms)", "CloudWatch ModelLatency, average over the "
                             "load.", 1, 60_000),
    "max_5xx_errors": ("integer", "Maximum 5XX errors", "CloudWatch Invocation5XXErrors over the load.", 0, 100_000),
    "max_4xx_errors": ("integer", "Maximum 4XX errors", "CloudWatch Invocation4XXErrors over the load.", 0, 100_000),
    "max_cpu_utilization": (["null", "number"], "Maximum CPU utilization (%)", "CloudWatch CPUUtilization, 100 per "
                            "core; empty: not checked (a smoke load keeps the CPU busy by design).", 0, 10_000),
    "max_memory_utilization": (["null", "number"], "Maximum memory utilization (%)", "CloudWatch "
                               "MemoryUtilization; empty: not checked.", 0, 100),
    "alarm_p99_model_latency_ms": ("number", "Alarm: p99 model latency (ms)", "The alarm created on a pass fires "
                                   "when p99 ModelLatency over 5 minutes exceeds this.", 1, 60_000),
}
# fmt: on
CHECK_DEFAULTS = {"smoke_requests": 200, "metrics_timeout": 300, **dataclasses.asdict(Thresholds())}
PARAMS.update(
    {
        name: Param(
            CHECK_DEFAULTS[name],
            type=kind,
            title=title,
            description=f"{description} ({low}-{high})",
            minimum=low,
            maximum=high,
            section=SECTION_CHECK,
        )
        for name, (kind, title, description, low, high) in CHECK_PARAMS.items()
    }
)


# A training job may run MaxRuntimeInSeconds after waiting for its instances; deploy and check wait out traffic
# shifts and the bake (each at most an hour in the trigger form) with room to spare.
TRAIN_TIMEOUT = datetime.timedelta(seconds=MAX_RUNTIME_SECONDS) + datetime.timedelta(hours=1)
DEPLOY_TIMEOUT = CHECK_TIMEOUT = datetime.timedelta(hours=3)
DAGRUN_TIMEOUT = datetime.timedelta(hours=12)
# A run still going after this long (from when it was queued) alerts the topic, well before the timeout ends it.
DEADLINE = datetime.timedelta(seconds=conf.getint("mnist_pipeline", "deadline_seconds", fallback=4 * 3600))


def _schedule() -> str | None:
    from tasks.config import load_config

    schedule = load_config().schedule.strip()
    return None if schedule.lower() in ("", "none") else schedule


@task(multiple_outputs=True)
def configuration() -> dict:
    """Resolve the deployment configuration once: every task of the run then uses the same connection and bucket."""
    from tasks.config import load_config

    return dataclasses.asdict(load_config())


def _config(settings: dict):
    from tasks.config import PipelineConfig

    return PipelineConfig(**settings)


@task
def download(settings: dict, params: dict) -> str:
    from airflow.sdk.exceptions import AirflowFailException

    from tasks.mnist_data import MirrorPolicy, MirrorRefused, download_mnist

    config = _config(settings)
    policy = MirrorPolicy(config)
    try:  # the form's mirror only where the configuration allows one, redirects included
        mirrors = policy.allowed(params["mnist_mirror"])
    except MirrorRefused as refused:
        raise AirflowFailException(str(refused)) from refused
    return str(download_mnist(mirrors=mirrors, config=config, policy=policy))


@task
def validate(settings: dict, data_dir: str, run_id: str) -> dict:
    from data_checks.mnist_suite import validate_mnist
    from tasks.report import run_directory

    config = _config(settings)
    # The run's artifacts directory, where its report links to these Data Docs.
    report_dir = run_directory(config, run_id) / "validation"
    return validate_mnist(data_dir, report_dir, config.expected_counts, config.mnist_reference)


@task
def upload(settings: dict, data_dir: str) -> str:
    from tasks.mnist_data import upload_dataset

    return upload_dataset(data_dir, _config(settings))


@task
def training_requests(settings: dict, dataset_uri: str, params: dict, dag_run) -> list[dict]:
    from airflow.sdk.exceptions import AirflowFailException

    from tasks.training_jobs import RequestRefused, sweep_requests

    config = _config(settings)
    try:
        return sweep_requests(params, config=config, dag_id=dag_run.dag_id, run_id=dag_run.run_id,
                              dataset_uri=dataset_uri)  # fmt: skip
    except RequestRefused as refused:  # the same params would be refused again: no retry
        raise AirflowFailException(str(refused)) from refused


@task
def select_best(settings: dict, trained) -> dict:
    from tasks.selection import select_best

    return select_best(list(trained), config=_config(settings))


@task
def gate(settings: dict, best: dict, params: dict) -> dict:
    from airflow.sdk.exceptions import AirflowFailException

    from tasks.gate import ChampionMismatch, gate

    try:
        return gate(
            _config(settings),
            params["endpoint_name"],
            best["test_accuracy"],
            min_test_accuracy=params["min_test_accuracy"],
            tolerance=params["accuracy_tolerance"],
        )
    except ChampionMismatch as mismatch:  # a person must look: a retry would find the same record
        raise AirflowFailException(str(mismatch)) from mismatch


@task.branch
def choose_deploy(decision: dict, params: dict) -> str | None:
    from tasks.deployment import wanted

    return "registration" if wanted(decision, params["deploy"]) else None


@task(multiple_outputs=True)
def registration(settings: dict, best: dict, dataset_uri: str, run_id: str) -> dict:
    from tasks.registry import registration

    return registration(best, dataset_uri, run_id, _config(settings))


@task(execution_timeout=DEPLOY_TIMEOUT, on_failure_callback=PipelineNotifier("deploy_failed"))
def deploy(settings: dict, best: dict, decision: dict, params: dict, run_id: str) -> dict:
    from airflow.sdk.exceptions import AirflowFailException

    from tasks.deployment import RolledBack, deploy

    traffic = {"traffic_shift": params["traffic_shift"], "percent": params["traffic_percent"],
               "wait_seconds": params["traffic_wait_seconds"], "bake_seconds": params["bake_seconds"]}  # fmt: skip
    alarms = {"max_5xx_errors": params["max_5xx_errors"], "max_p99_latency_ms": params["alarm_p99_model_latency_ms"]}
    try:
        return deploy(best, decision, endpoint_name=params["endpoint_name"], run_id=run_id, config=_config(settings),
                      check_interval=SAGEMAKER_CHECK_INTERVAL, traffic=traffic, alarm_thresholds=alarms)  # fmt: skip
    except RolledBack as error:  # the previous model serves: a retry would only roll out the same model again
        raise AirflowFailException(str(error)) from error


@task(execution_timeout=CHECK_TIMEOUT, on_failure_callback=PipelineNotifier("check_failed"))
def monitor(settings: dict, deployment: dict, best: dict, dataset_uri: str, version: str, params: dict, ti) -> dict:
    from tasks.monitoring import MonitoringCheckFailed, check_endpoint
    from tasks.registry import record_verdict

    config = _config(settings)
    try:
        checked = check_endpoint(
            _config(settings),
            deployment,
            dataset_uri,  # its test files: held out from training
            best["test_accuracy"],
            thresholds=Thresholds.from_params(params),
            samples=params["smoke_requests"],
            metrics_timeout=params["metrics_timeout"],
            check_interval=SAGEMAKER_CHECK_INTERVAL,
            settle_timeout=params["bake_seconds"] + params["traffic_wait_seconds"] * 100 + 600,
        )
    except MonitoringCheckFailed as failed:
        ti.xcom_push("return_value", failed.result)  # what the check saw, for the report; the task still fails
        record_verdict(config, version, passed=False, reason=str(failed))
        raise
    record_verdict(config, version, passed=True, reason=f"passed its monitoring check on {checked['endpoint_name']}")
    return checked


@task
def report(settings: dict, best: dict | None, validation, decision, deployment, monitoring, run_id: str) -> dict | None:
    """The sweep report, whatever happened after the selection (tasks the run did not get to are None); first, the
    undoing of a deployment whose check never finished."""
    from airflow.sdk.exceptions import AirflowSkipException

    from tasks.monitoring import undo_unchecked
    from tasks.report import build_report

    if best is None:
        raise AirflowSkipException("No model was selected (an earlier task failed): nothing to report")
    config = _config(settings)
    # A model deployed and never checked (the check's task killed, or crashed) does not stay serving.
    monitoring = undo_unchecked(config, deployment, monitoring, check_interval=SAGEMAKER_CHECK_INTERVAL) or monitoring
    return build_report(
        run_id, best, validation=validation, gate=decision, deployment=deployment, monitoring=monitoring, config=config
    )


@dag(
    dag_id=DAG_ID,
    doc_md=__doc__,
    schedule=_schedule(),
    start_date=datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC),
    catchup=False,
    max_active_runs=1,  # two sweeps must not race on one endpoint
    # Every wait has a bound: each task its execution_timeout (30 minutes unless its own is set below), the run its
    # dagrun_timeout. A timed-out training task stops its job (TrainingOperator.on_kill).
    default_args={
        "owner": "mlops",
        "retries": 2,
        "retry_delay": RETRY_DELAY,
        "execution_timeout": datetime.timedelta(minutes=30),
    },
    dagrun_timeout=DAGRUN_TIMEOUT,
    # Failures, failed checks, rollbacks and missed deadlines reach people through SNS (`alert_topic_arn`).
    on_failure_callback=PipelineNotifier("run_failed"),
    deadline=DeadlineAlert(
        reference=DeadlineReference.DAGRUN_QUEUED_AT, interval=DEADLINE, callback=AsyncCallback(deadline_missed)
    ),
    tags=["mnist", "sagemaker", "training", "sweep"],
    params=PARAMS,
)
def mnist_sweep():
    settings = configuration()
    data_dir = download(settings)
    validation = validate(settings, data_dir)
    dataset_uri = upload(settings, data_dir)
    requests = training_requests(settings, dataset_uri)
    aws = {"aws_conn_id": settings["aws_conn_id"], "region_name": settings["region"]}

    train = TrainingOperator.partial(
        task_id="train",
        # Each sweep member by its value in the UI, from the moment it runs (not map index 0-4).
        map_index_template="hidden_channels={{ task.config['HyperParameters']['hidden_channels'] }}",
        **aws,
        print_log=PRINT_TRAINING_LOG,
        check_interval=SAGEMAKER_CHECK_INTERVAL,
        # A retry finds its failed predecessor's job under the same name: start a new one, suffixed with the time.
        action_if_job_exists="timestamp",
        execution_timeout=TRAIN_TIMEOUT,
    ).expand(config=requests)
    best = select_best(settings, train.output)

    decision = gate(settings, best)
    # Every model the gate lets through becomes a version in the registry group named after its endpoint.
    version = registration(settings, best, dataset_uri)
    register = RegisterModelVersionOperator(
        task_id="register", package_group_name="{{ params.endpoint_name }}", image_uri=version["image_uri"],
        model_url=version["model_url"], extras=version["extras"], **aws,
    )  # fmt: skip
    deployment = deploy(settings, best, decision)
    checked = monitor(settings, deployment, best, dataset_uri, register.output)
    # A teardown: it runs whatever happened, and a failed check still fails the run.
    report(settings, best, validation, decision, deployment, checked).as_teardown()

    chain(validation, dataset_uri)
    chain(decision, choose_deploy(decision), version, register, deployment)


mnist_sweep()
