"""
# MNIST sweep: train, select, gate, register, deploy, check

Trains MNIST classifiers on SageMaker, picks the most accurate, and serves it on an endpoint.

**Chain:** download MNIST (checksums verified) → validate it (great-expectations, fail closed) → upload it to S3
(content-addressed; the `mnist_dataset` asset) → **search**: `sweep` trains one job per `hidden_channels` value in
parallel, `tune` runs one SageMaker hyperparameter tuning job over the ranges of the Tuning section → select the best
by test accuracy → **gate** against the champion → **register** it as a version of the model registry group named
after the endpoint → (approval `manual`: **review** by a person) → deploy (create, or update blue/green) →
**monitoring check** (smoke load and CloudWatch figures; a failure rolls back) → report.

**The champion** is the latest Approved version the endpoint serves. With approval `auto`, a version that passes
its check is Approved (and becomes the `mnist_champion` asset, which schedules `mnist_batch_predict`); one that
fails is Rejected. With `manual`, the run waits for a person in this UI (Browse → Required Actions, or the `review`
task): Approve deploys and checks the version, Reject rejects it, no answer within `approval_timeout` leaves it
PendingManualApproval (then `mnist-pipeline approve VERSION` and a `deploy_only` run serve it).

**Where it runs** is the AWS connection's business (`aws_conn_id` in the `mnist_pipeline` configuration): every step
talks SageMaker, S3 and CloudWatch through the Amazon provider, to AWS or to the local SageMaker service and local
AWS that `mnist-pipeline up` starts. Every field of the form has bounds; the README says more.
"""

from __future__ import annotations

import copy
import datetime

from airflow.sdk import chain, dag, task
from airflow.sdk.configuration import conf
from airflow.sdk.definitions.deadline import AsyncCallback, DeadlineAlert, DeadlineReference

from tasks.assets import CHAMPION, DATASET, DRIFT
from tasks.dag_tasks import config_of, configuration
from tasks.deployment import DEPLOY_TIMEOUT_SECONDS
from tasks.monitoring import Thresholds
from tasks.names import DAG_ID
from tasks.notifications import PipelineNotifier, deadline_missed
from tasks.params import PARAMS
from tasks.registry import RegisterModelVersionOperator
from tasks.review import MAX_TIMEOUT_MINUTES, ReviewOperator
from tasks.training_jobs import MAX_RUNTIME_SECONDS
from tasks.training_operator import TrainingOperator
from tasks.tuning import TuningOperator

# Seconds between status polls of SageMaker jobs and endpoints (the local stack polls every 2).
SAGEMAKER_CHECK_INTERVAL = conf.getint("mnist_pipeline", "sagemaker_check_interval", fallback=30)
# Stream each job's CloudWatch log into its task's log (TrainingOperator: the provider's, reading the job's status
# every interval above while it does, not every 30 s).
PRINT_TRAINING_LOG = conf.getboolean("mnist_pipeline", "print_training_log", fallback=True)
# How long a failed task waits before its retry (a training job a crash ended is started again under a new name).
RETRY_DELAY = datetime.timedelta(seconds=conf.getint("mnist_pipeline", "retry_delay_seconds", fallback=60))
# A training job may run MaxRuntimeInSeconds after waiting for its instances; a tuning job runs its jobs a few at a
# time; deploy and check wait out traffic shifts and the bake, whose fields the form bounds so that the longest
# update fits the deploy's timeout (tasks.params checks it as this file parses).
TRAIN_TIMEOUT = datetime.timedelta(seconds=MAX_RUNTIME_SECONDS) + datetime.timedelta(hours=1)
TUNE_TIMEOUT = datetime.timedelta(hours=11)
DEPLOY_TIMEOUT = CHECK_TIMEOUT = datetime.timedelta(seconds=DEPLOY_TIMEOUT_SECONDS)
# A run may wait for a person's approval as long as the form allows, on top of the rest.
DAGRUN_TIMEOUT = datetime.timedelta(hours=12) + datetime.timedelta(minutes=MAX_TIMEOUT_MINUTES)
# A run still going after this long (from when it was queued) alerts the topic, well before the timeout ends it.
DEADLINE = datetime.timedelta(seconds=conf.getint("mnist_pipeline", "deadline_seconds", fallback=4 * 3600))


def _schedule():
    """The configuration's schedule; with retrain_on_drift, a drift that mnist_drift finds also starts a run."""
    from tasks.config import load_config

    config = load_config()
    cron = None if config.schedule.strip().lower() in ("", "none") else config.schedule.strip()
    if not config.retrains_on_drift:
        return cron
    if cron is None:
        return DRIFT
    from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable

    return AssetOrTimeSchedule(timetable=CronTriggerTimetable(cron, timezone="UTC"), assets=DRIFT)


def _refusing(build, *args, **kwargs):
    """``build(...)``, its RequestRefused a failure without retry: the same params would be refused again."""
    from airflow.sdk.exceptions import AirflowFailException

    from tasks.training_jobs import RequestRefused

    try:
        return build(*args, **kwargs)
    except RequestRefused as refused:
        raise AirflowFailException(str(refused)) from refused


@task.branch
def plan(params: dict) -> list[str]:
    """A deploy-only run trains nothing: it goes straight to choosing what to serve."""
    return ["candidate"] if params["deploy_only"] else ["download", "candidate"]


@task
def download(settings: dict, params: dict) -> str:
    from airflow.sdk.exceptions import AirflowFailException

    from tasks.mnist_data import MirrorPolicy, MirrorRefused, download_mnist

    config = config_of(settings)
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

    config = config_of(settings)
    # The run's artifacts directory, where its report links to these Data Docs.
    report_dir = run_directory(config, run_id) / "validation"
    return validate_mnist(data_dir, report_dir, config.expected_counts, config.mnist_reference)


@task(outlets=[DATASET])
def upload(settings: dict, data_dir: str, outlet_events) -> str:
    from tasks.mnist_data import upload_dataset

    uri = upload_dataset(data_dir, config_of(settings))
    outlet_events[DATASET].extra = {"uri": uri}
    return uri


@task.branch
def choose_search(params: dict) -> str:
    return "tuning_request" if params["search"] == "tune" else "training_requests"


@task
def training_requests(settings: dict, dataset_uri: str, params: dict, dag_run) -> list[dict]:
    from tasks.training_jobs import sweep_requests

    return _refusing(
        sweep_requests,
        params,
        config=config_of(settings),
        dag_id=dag_run.dag_id,
        run_id=dag_run.run_id,
        dataset_uri=dataset_uri,
    )


@task
def tuning_request(settings: dict, dataset_uri: str, params: dict, dag_run) -> dict:
    from tasks.tuning import tuning_request

    return _refusing(
        tuning_request,
        params,
        config=config_of(settings),
        dag_id=dag_run.dag_id,
        run_id=dag_run.run_id,
        dataset_uri=dataset_uri,
    )


@task(trigger_rule="none_failed_min_one_success")  # after the sweep's jobs or the tuner, whichever ran
def select_best(settings: dict, trained, tuned) -> dict:
    from airflow.sdk.exceptions import AirflowSkipException

    from tasks.selection import select_best

    trained = list(trained)
    if not trained and tuned is None:
        raise AirflowSkipException("No training ran (a deploy-only run): nothing to select")
    return select_best(trained, config=config_of(settings), tuning=tuned)


@task
def gate(settings: dict, best: dict, params: dict) -> dict:
    from tasks.gate import gate

    return gate(
        config_of(settings),
        params["endpoint_name"],
        best["test_accuracy"],
        min_test_accuracy=params["min_test_accuracy"],
        tolerance=params["accuracy_tolerance"],
    )


@task.branch
def choose_register(decision: dict) -> str | None:
    """What the gate lets through is registered; a refused model is not."""
    return "registration" if decision["deploy"] else None


@task(multiple_outputs=True)
def registration(settings: dict, best: dict, dataset_uri: str, run_id: str) -> dict:
    from tasks.registry import registration

    return registration(best, dataset_uri, run_id, config_of(settings))


@task.branch
def choose_review(params: dict) -> str | None:
    """With approval manual a person decides in the UI; with auto, the monitoring check does."""
    return "review" if params["approval"] == "manual" else None


@task(trigger_rule="none_failed")
def candidate(settings: dict, registered: str | None, params: dict) -> dict:
    """What this run serves: its own version (approval auto), or one a person approved since the champion."""
    from tasks.registry import choose_model

    return choose_model(
        config_of(settings),
        params["endpoint_name"],
        enabled=params["deploy"],
        approval=params["approval"],
        registered=registered,
    )


@task(execution_timeout=DEPLOY_TIMEOUT, on_failure_callback=PipelineNotifier("deploy_failed"))
def deploy(settings: dict, choice: dict, params: dict, run_id: str) -> dict:
    from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

    from tasks.deployment import RolledBack, deploy, traffic_of
    from tasks.monitoring import alarm_thresholds

    if not choice["deploy"]:
        raise AirflowSkipException(f"Nothing to deploy: {choice['reason']}")
    alarms = alarm_thresholds(Thresholds.from_params(params))
    try:
        return deploy(
            choice["model"],
            previous_endpoint_config_name=choice["previous_endpoint_config_name"],
            endpoint_name=params["endpoint_name"],
            run_id=run_id,
            config=config_of(settings),
            check_interval=SAGEMAKER_CHECK_INTERVAL,
            traffic=traffic_of(params),
            alarm_thresholds=alarms,
            capture_percent=params["capture_percentage"],
        )
    except RolledBack as error:  # the previous model serves: a retry would only roll out the same model again
        raise AirflowFailException(str(error)) from error


@task(execution_timeout=CHECK_TIMEOUT, on_failure_callback=PipelineNotifier("check_failed"), outlets=[CHAMPION])
def monitor(settings: dict, deployment: dict, choice: dict, params: dict, ti, outlet_events) -> dict:
    """The monitoring check; passed, its version is Approved: the champion, and an event of the champion asset."""
    from tasks.deployment import traffic_of, update_seconds
    from tasks.monitoring import MonitoringCheckFailed, check_endpoint

    model = choice["model"]
    try:
        checked = check_endpoint(
            config_of(settings),
            deployment,
            model["dataset_uri"],  # its test files: held out from training
            model["test_accuracy"],
            thresholds=Thresholds.from_params(params),
            samples=params["smoke_requests"],
            metrics_timeout=params["metrics_timeout"],
            check_interval=SAGEMAKER_CHECK_INTERVAL,
            settle_timeout=update_seconds(**traffic_of(params)),  # every wait on the update ends within it
            version=model["model_package_arn"],
        )
    except MonitoringCheckFailed as failed:
        ti.xcom_push("return_value", failed.result)  # what the check saw, for the report; the task still fails
        raise
    outlet_events[CHAMPION].extra = {
        "endpoint_name": deployment["endpoint_name"],
        **{key: model[key] for key in ("model_package_arn", "version", "model_data_url", "test_accuracy")},
    }
    return checked


# Before its report, the teardown may wait out an update a failed deploy left running, then undo it.
@task(execution_timeout=DEPLOY_TIMEOUT)
def report(
    settings: dict, best, validation, decision, reviewed, choice, deployment, monitoring, params: dict, run_id: str
) -> dict | None:
    """The run's report, whatever happened (tasks the run did not get to are None); first, the undoing of a
    deployment whose check never finished, or of what a deploy that returned nothing left on the endpoint."""
    from airflow.sdk.exceptions import AirflowSkipException

    from tasks.deployment import traffic_of, update_seconds
    from tasks.monitoring import undo_unchecked
    from tasks.report import build_report

    if best is None and choice is None:
        raise AirflowSkipException("Nothing was selected or deployed (an earlier task failed): nothing to report")
    config = config_of(settings)
    # A model deployed and never checked (the check's task killed, or crashed; or the deploy's, after its request)
    # does not stay serving.
    version = ((choice or {}).get("model") or {}).get("model_package_arn")
    undone = undo_unchecked(
        config,
        deployment,
        monitoring,
        choice=choice,
        endpoint_name=params["endpoint_name"],
        run_id=run_id,
        check_interval=SAGEMAKER_CHECK_INTERVAL,
        settle_timeout=update_seconds(**traffic_of(params)),
        version=version,
    )
    monitoring = undone or monitoring
    return build_report(
        run_id,
        best,
        validation=validation,
        gate=decision,
        choice=choice,
        deployment=deployment,
        monitoring=monitoring,
        approval=reviewed,
        config=config,
    )


@dag(
    dag_id=DAG_ID,
    doc_md=__doc__,
    schedule=_schedule(),
    start_date=datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC),
    catchup=False,
    max_active_runs=1,  # two runs must not race on one endpoint
    # Every wait has a bound: each task its execution_timeout (30 minutes unless its own is set below), the run its
    # dagrun_timeout. A timed-out training or tuning task stops its job (on_kill).
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
    # Its own copy: a run's conf (dag.test) sets the values of the Param objects, which must not become the next
    # parse's defaults in the same process.
    params=copy.deepcopy(PARAMS),
)
def mnist_sweep():
    settings = configuration()
    aws = {"aws_conn_id": settings["aws_conn_id"], "region_name": settings["region"]}
    start = plan()
    data_dir = download(settings)
    validation = validate(settings, data_dir)
    dataset_uri = upload(settings, data_dir)
    search = choose_search()

    requests = training_requests(settings, dataset_uri)
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
    tuning = tuning_request(settings, dataset_uri)
    tune = TuningOperator(
        task_id="tune", config=tuning, **aws, check_interval=SAGEMAKER_CHECK_INTERVAL, execution_timeout=TUNE_TIMEOUT
    )
    best = select_best(settings, train.output, tune.output)

    decision = gate(settings, best)
    # Every model the gate lets through becomes a version in the registry group named after its endpoint.
    version = registration(settings, best, dataset_uri)
    register = RegisterModelVersionOperator(
        task_id="register",
        package_group_name="{{ params.endpoint_name }}",
        image_uri=version["image_uri"],
        model_url=version["model_url"],
        extras=version["extras"],
        **aws,
    )
    # Approval manual: a person answers in the UI (Browse → Required Actions); the task waits holding no slot.
    review = ReviewOperator(
        task_id="review",
        settings=settings,
        model_package_arn=register.output,
        best=best,
        validation=validation,
        gate=decision,
        notifiers=[PipelineNotifier("approval_waiting")],
    )
    choice = candidate(settings, register.output)
    deployment = deploy(settings, choice)
    checked = monitor(settings, deployment, choice)
    # A teardown: it runs whatever happened, and a failed check still fails the run.
    report(settings, best, validation, decision, review.output, choice, deployment, checked).as_teardown()

    chain(start, [data_dir, choice])
    chain(validation, dataset_uri, search, [requests, tuning])
    chain(decision, choose_register(decision), version, register, choose_review(), review, choice)


mnist_sweep()
