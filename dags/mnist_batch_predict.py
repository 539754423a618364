"""
# MNIST batch predictions

Classifies every image file under an S3 prefix with a model version from the registry, by SageMaker Batch
Transform: .npy, .csv (a 784-pixel image per row), .json, .png or .jpg files, one transform job per kind, in
parallel, each writing `<file>.out` (the model's JSON answers, a line each) under the run's output prefix. Then a
summary: images, the count of each predicted digit, seconds and images per second (`summary.json` beside the
predictions, and the `summarize` task's return value).

**When:** each time `mnist_sweep` makes a new champion (the `mnist_champion` asset: this run then predicts with the
version that event names), and whenever triggered by hand. **Model:** empty, the champion; else a version number of
the endpoint's registry group, or a version's ARN; an Approved version only.
"""

from __future__ import annotations

import copy
import datetime

# The providers' modules that the pipeline's operators subclass (tasks/operators.py). The DAG processor imports the
# Airflow modules a DAG file names once, before it forks each parse of the file ([dag_processor]
# parsing_pre_import_modules): named here, they are not imported again in every parse. tests/test_dag_parse.py fails
# if a parse imports any of them itself.
import airflow.providers.amazon.aws.operators.sagemaker
import airflow.providers.standard.operators.hitl  # noqa: F401
from airflow.sdk import dag, task

from tasks.assets import CHAMPION
from tasks.dag_tasks import config_of, configuration
from tasks.names import BATCH_DAG_ID
from tasks.operators import TransformOperator
from tasks.params import BATCH_PARAMS
from tasks.policy import SAGEMAKER_CHECK_INTERVAL, dag_defaults

TRANSFORM_TIMEOUT = datetime.timedelta(hours=2)


@task
def resolve_model(settings: dict, params: dict, triggering_asset_events) -> dict:
    """The version to predict with, and its SageMaker model (made from the version unless it exists)."""
    from airflow.sdk.exceptions import AirflowFailException

    from tasks.batch import VersionNotApproved, model_to_predict_with
    from tasks.registry import VersionNotFound

    events = [event.extra for event in triggering_asset_events[CHAMPION]] if triggering_asset_events else []
    try:
        return model_to_predict_with(config_of(settings), params["endpoint_name"], params["model"], events)
    except (VersionNotFound, VersionNotApproved, LookupError) as refused:  # asking again finds the same registry
        raise AirflowFailException(str(refused)) from refused


@task
def transform_requests(settings: dict, model: dict, params: dict, run_id: str, dag_run) -> list[dict]:
    from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

    from tasks.batch import NothingToPredict, default_input_uri, transform_jobs
    from tasks.training_jobs import RequestRefused

    config = config_of(settings)
    input_uri = params["input_uri"] or default_input_uri(config)
    try:
        return transform_jobs(
            config,
            input_uri,
            model,
            run_id,
            instance_type=params["instance_type"],
            max_concurrent=params["max_concurrent_transforms"],
            max_payload_mb=params["max_payload_mb"],
            precision=params["precision"],
        )
    except RequestRefused as refused:  # the same params would be refused again
        raise AirflowFailException(str(refused)) from refused
    except NothingToPredict as nothing:
        if dag_run.run_type == "asset_triggered" and not params["input_uri"]:
            raise AirflowSkipException(f"A new champion, and nothing to predict yet: {nothing}") from nothing
        raise AirflowFailException(str(nothing)) from nothing


@task
def summarize(settings: dict, transformed, model: dict, params: dict, run_id: str) -> dict:
    from tasks.batch import default_input_uri, predictions_summary

    config = config_of(settings)
    return predictions_summary(
        config, list(transformed), model, params["input_uri"] or default_input_uri(config), run_id
    )


@dag(
    dag_id=BATCH_DAG_ID,
    doc_md=__doc__,
    schedule=[CHAMPION],
    **dag_defaults(),
    max_active_runs=1,
    dagrun_timeout=datetime.timedelta(hours=6),
    tags=["mnist", "sagemaker", "batch-transform"],
    # Its own copy: a run's conf (dag.test) sets the values of the Param objects, which must not become the next
    # parse's defaults in the same process.
    params=copy.deepcopy(BATCH_PARAMS),
)
def mnist_batch_predict():
    settings = configuration()
    model = resolve_model(settings)
    requests = transform_requests(settings, model)
    transform = TransformOperator.partial(
        task_id="transform",
        aws_conn_id=settings["aws_conn_id"],
        region_name=settings["region"],
        check_interval=SAGEMAKER_CHECK_INTERVAL,
        max_ingestion_time=int(TRANSFORM_TIMEOUT.total_seconds()),
        # A retry follows its predecessor's job when it runs or completed (TransformOperator); after one that failed
        # or was stopped, the name is taken: the new job's is suffixed with the time.
        action_if_job_exists="timestamp",
        execution_timeout=TRANSFORM_TIMEOUT,
        map_index_template="{{ task.config['TransformInput']['ContentType'] }}",
    ).expand(config=requests)
    summarize(settings, transform.output, model)


mnist_batch_predict()
