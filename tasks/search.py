"""The form's search as SageMaker requests: the sweep's training jobs, or one hyperparameter tuning job.

A request the service would refuse (its resources, its name) fails its task without a retry: the same params would
be refused again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

from tasks.config import PipelineConfig


@contextlib.contextmanager
def refusal_fails() -> Iterator[None]:
    from airflow.sdk.exceptions import AirflowFailException

    from tasks.training_jobs import RequestRefused

    try:
        yield
    except RequestRefused as refused:
        raise AirflowFailException(str(refused)) from refused


def training_jobs(params: Mapping, *, config: PipelineConfig, dag_id: str, run_id: str, dataset_uri: str) -> list[dict]:
    """With search `sweep`, one CreateTrainingJob request per hidden_channels value; with `tune`, none (the tuning
    job runs the training jobs), so that the sweep's operator maps over nothing and is skipped."""
    from tasks.training_jobs import sweep_requests

    if params["search"] != "sweep":
        return []
    with refusal_fails():
        return sweep_requests(params, config=config, dag_id=dag_id, run_id=run_id, dataset_uri=dataset_uri)


def tuning_job(params: Mapping, *, config: PipelineConfig, dag_id: str, run_id: str, dataset_uri: str) -> dict:
    """With search `tune`, the CreateHyperParameterTuningJob request over the form's ranges."""
    from tasks.tuning import tuning_request

    with refusal_fails():
        return tuning_request(params, config=config, dag_id=dag_id, run_id=run_id, dataset_uri=dataset_uri)
