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

# The providers' modules that the pipeline's operators and notifier subclass (tasks/operators.py,
# tasks/notifications.py). The DAG processor imports the Airflow modules a DAG file names once, before it forks each
# parse of the file ([dag_processor] parsing_pre_import_modules): named here, they are not imported again in every
# parse. tests/test_dag_parse.py fails if a parse imports any of them itself.
import airflow.providers.amazon.aws.notifications.sns
import airflow.providers.amazon.aws.operators.sagemaker
import airflow.providers.standard.operators.hitl  # noqa: F401
from airflow.sdk import chain, dag, task
from airflow.sdk.definitions.deadline import AsyncCallback, DeadlineAlert, DeadlineReference

from tasks.assets import CHAMPION, DATASET
from tasks.dag_tasks import config_of, configuration, sweep_schedule
from tasks.names import DAG_ID
from tasks.notifications import PipelineNotifier, deadline_missed
from tasks.operators import RegisterModelVersionOperator, ReviewOperator, TrainingOperator, TuningOperator
from tasks.params import PARAMS
from tasks.policy import (
    DAGRUN_TIMEOUT,
    DEADLINE,
    DEPLOY_TIMEOUT,
    PRINT_TRAINING_LOG,
    RETRY_DELAY,
    SAGEMAKER_CHECK_INTERVAL,
    TRAIN_TIMEOUT,
    TUNE_TIMEOUT,
    dag_defaults,
)


@task.skip_if(lambda context: context["params"]["deploy_only"], "A deploy-only run trains nothing")
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


@task
def training_requests(settings: dict, dataset_uri: str, params: dict, dag_run) -> list[dict]:
    from tasks.search import training_jobs

    config = config_of(settings)
    return training_jobs(params, config=config, dag_id=dag_run.dag_id, run_id=dag_run.run_id, dataset_uri=dataset_uri)


@task(trigger_rule="none_failed_min_one_success")  # after the sweep's jobs or the tuner, whichever ran
def select_best(settings: dict, trained, tuned) -> dict:
    from airflow.sdk.exceptions import AirflowSkipException

    from tasks.selection import most_accurate

    trained = list(trained)
    if not trained and tuned is None:  # a deploy-only run: its trigger rule may not have skipped it already
        raise AirflowSkipException("No training ran (a deploy-only run): nothing to select")
    return most_accurate(trained, config=config_of(settings), tuning=tuned)


@task
def gate(settings: dict, best: dict, params: dict) -> dict:
    from tasks.gate import judge

    return judge(
        config_of(settings),
        params["endpoint_name"],
        best["test_accuracy"],
        min_test_accuracy=params["min_test_accuracy"],
        tolerance=params["accuracy_tolerance"],
    )


@task(trigger_rule="none_failed")  # after a refusal, a person's review or a deploy-only run too
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

    from tasks.deployment import RolledBack, roll_out
    from tasks.policy import Thresholds, alarm_thresholds, traffic_of

    if not choice["deploy"]:
        raise AirflowSkipException(f"Nothing to deploy: {choice['reason']}")
    try:
        return roll_out(
            choice["model"],
            previous_endpoint_config_name=choice["previous_endpoint_config_name"],
            endpoint_name=params["endpoint_name"],
            run_id=run_id,
            config=config_of(settings),
            check_interval=SAGEMAKER_CHECK_INTERVAL,
            traffic=traffic_of(params),
            alarm_thresholds=alarm_thresholds(Thresholds.from_params(params)),
            capture_percent=params["capture_percentage"],
        )
    except RolledBack as error:  # the previous model serves: a retry would only roll out the same model again
        raise AirflowFailException(str(error)) from error


@task(execution_timeout=DEPLOY_TIMEOUT, on_failure_callback=PipelineNotifier("check_failed"), outlets=[CHAMPION])
def monitor(settings: dict, deployment: dict, choice: dict, params: dict, ti, outlet_events) -> dict:
    """The monitoring check; passed, its version is Approved: the champion, and an event of the champion asset."""
    from tasks.monitoring import MonitoringCheckFailed, check_endpoint
    from tasks.policy import Thresholds, settle_timeout

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
            settle_timeout=settle_timeout(params),
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


@task(execution_timeout=DEPLOY_TIMEOUT)  # it may wait out an update that a failed deploy left running
def undo_unchecked(settings: dict, choice, deployment, monitoring, params: dict, run_id: str) -> dict | None:
    """A model deployed and never checked (the check's task killed or crashed; or the deploy's, after its request)
    does not stay serving: rolled back, its version Rejected. None when there was nothing to undo."""
    from tasks.policy import settle_timeout
    from tasks.unchecked import roll_back_unchecked

    return roll_back_unchecked(
        config_of(settings),
        deployment,
        monitoring,
        choice=choice,
        endpoint_name=params["endpoint_name"],
        run_id=run_id,
        check_interval=SAGEMAKER_CHECK_INTERVAL,
        settle_timeout=settle_timeout(params),
        version=((choice or {}).get("model") or {}).get("model_package_arn"),
    )


@task
def report(settings: dict, best, validation, decision, reviewed, choice, deployment, monitoring, undone, run_id: str):
    """The run's report, whatever happened (tasks the run did not get to are None)."""
    from airflow.sdk.exceptions import AirflowSkipException

    from tasks.report import build_report

    if best is None and choice is None:
        raise AirflowSkipException("Nothing was selected or deployed (an earlier task failed): nothing to report")
    return build_report(
        run_id,
        best,
        validation=validation,
        gate=decision,
        choice=choice,
        deployment=deployment,
        monitoring=undone or monitoring,
        approval=reviewed,
        config=config_of(settings),
    )


@dag(
    dag_id=DAG_ID,
    doc_md=__doc__,
    schedule=sweep_schedule(),
    max_active_runs=1,  # two runs must not race on one endpoint
    # Every wait has a bound: each task its execution_timeout, the run its dagrun_timeout. A timed-out training or
    # tuning task stops its job (on_kill).
    **dag_defaults(retry_delay=RETRY_DELAY),
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

    # The data: downloaded (skipped by a deploy-only run, and with it everything up to the registry), validated,
    # uploaded.
    data_dir = download(settings)
    validation = validate(settings, data_dir)
    dataset_uri = upload(settings, data_dir)

    # The search: the sweep's training jobs, mapped (none with search tune), or one tuning job (skipped with sweep).
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
    tune = TuningOperator(
        task_id="tune",
        settings=settings,
        dataset_uri=dataset_uri,
        **aws,
        check_interval=SAGEMAKER_CHECK_INTERVAL,
        execution_timeout=TUNE_TIMEOUT,
    )
    best = select_best(settings, train.output, tune.output)

    # The gate against the champion; what it lets through becomes a version in the registry group named after the
    # endpoint, and with approval manual a person answers in the UI (Browse → Required Actions), the task holding
    # no slot as it waits.
    decision = gate(settings, best)
    register = RegisterModelVersionOperator(
        task_id="register",
        package_group_name="{{ params.endpoint_name }}",
        settings=settings,
        best=best,
        gate=decision,
        dataset_uri=dataset_uri,
        **aws,
    )
    review = ReviewOperator(
        task_id="review",
        settings=settings,
        model_package_arn=register.output,
        best=best,
        validation=validation,
        gate=decision,
        notifiers=[PipelineNotifier("approval_waiting")],
    )

    # What serves next, deployed blue/green and checked; then, whatever happened, the undoing of a deployment left
    # unchecked and the report. Both are teardowns: a failed check still fails the run.
    choice = candidate(settings, register.output)
    deployment = deploy(settings, choice)
    checked = monitor(settings, deployment, choice)
    undone = undo_unchecked(settings, choice, deployment, checked).as_teardown()
    report(settings, best, validation, decision, review.output, choice, deployment, checked, undone).as_teardown()

    chain(review, choice)


mnist_sweep()
