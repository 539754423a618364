"""
# MNIST hidden_channels sweep

Trains one SageMaker training job per `hidden_channels` value **in parallel**, picks the most accurate model and
serves it on an endpoint: the seed project's sweep, scheduled and repeatable.

**Chain:** download MNIST (checksums verified) → validate it (great-expectations, fail closed) → upload it to
S3 (content-addressed) → build one CreateTrainingJob request per `hidden_channels` value → train (mapped) → select
the best by test accuracy (ties: fewer parameters) → deploy (create or update the endpoint) → report (the trial
table).

**Backends.** Where jobs run comes from the deployment configuration, read when a run starts — environment
`MNIST_PIPELINE_BACKEND` or the Airflow Variable `mnist_pipeline` (`{"backend": "sagemaker", "bucket": ...,
"role_arn": ...}`), never from this file:

- `local` (default): the same requests run on this machine — the training script in subprocesses with the
  SageMaker `SM_*` environment (pool `local_training`, one slot per core), the endpoint as a local server
  speaking the SageMaker container contract, S3 through the AWS connection (`aws_default`).
- `sagemaker`: the Amazon provider's SageMaker operators against your AWS account. Training waits in the
  triggerer when `[operators] default_deferrable` is on.

**Trigger form:** every field has bounds; an invalid value is refused there, and a run started with one through
the API fails at its first task, naming the param. Empty optional fields keep the preset's value.
"""

from __future__ import annotations

import datetime

from airflow.providers.amazon.aws.operators.sagemaker import (
    SageMakerEndpointConfigOperator,
    SageMakerEndpointOperator,
    SageMakerModelOperator,
    SageMakerTrainingOperator,
)
from airflow.sdk import Param, TaskGroup, chain, dag, task
from airflow.sdk.configuration import conf

from tasks.local_backend import TRAINING_POOL

SECTION_SWEEP, SECTION_RESOURCES, SECTION_DATA = "Sweep", "Resources (SageMaker)", "Data and deployment"


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
        pattern=r"^ml\.[a-z0-9]+\.[a-z0-9]+$",
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
        description="URL or directory with the four MNIST files; empty: $MNIST_MIRROR, else the public mirrors.",
        section=SECTION_DATA,
    ),
    "deploy": Param(
        True, type="boolean", title="Deploy", description="Serve the best model on the endpoint.", section=SECTION_DATA
    ),
    "endpoint_name": Param(
        "mnist-classifier",
        type="string",
        pattern=r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$",
        title="Endpoint name",
        description="SageMaker endpoint to create or update: letters, digits and hyphens, at most 63.",
        section=SECTION_DATA,
    ),
}


def _schedule() -> str | None:
    from tasks.config import load_config

    schedule = load_config().schedule.strip()
    return None if schedule.lower() in ("", "none") else schedule


@task(multiple_outputs=True)
def configuration() -> dict:
    """Resolve the deployment configuration once: every task of the run then uses the same backend and bucket."""
    import dataclasses

    from tasks.config import load_config

    return dataclasses.asdict(load_config())


def _config(settings: dict):
    from tasks.config import PipelineConfig

    return PipelineConfig(**settings)


@task
def download(settings: dict, params: dict) -> str:
    from tasks.mnist_data import download_mnist

    return str(download_mnist(mirrors=params["mnist_mirror"], config=_config(settings)))


@task
def validate(settings: dict, data_dir: str, run_id: str) -> dict:
    from pathlib import Path

    from data_checks.mnist_suite import validate_mnist
    from tasks.training_jobs import sagemaker_name

    config = _config(settings)
    report_dir = Path(config.state_dir) / "runs" / sagemaker_name(run_id, unique_by=run_id) / "validation"
    return validate_mnist(data_dir, report_dir, config.expected_counts)


@task
def upload(settings: dict, data_dir: str) -> str:
    from tasks.mnist_data import upload_dataset

    return upload_dataset(data_dir, _config(settings))


@task
def training_requests(settings: dict, dataset_uri: str, params: dict, dag_run) -> list[dict]:
    from tasks.training_jobs import sweep_requests

    config = _config(settings)
    return sweep_requests(params, config=config, dag_id=dag_run.dag_id, run_id=dag_run.run_id, dataset_uri=dataset_uri)


@task.branch
def choose_backend(settings: dict) -> str:
    return f"train_{settings['backend']}"


@task(pool=TRAINING_POOL)
def train_local(settings: dict, request: dict, params: dict) -> dict:
    """One training job here: the request SageMaker would run, run by tasks.local_backend."""
    from tasks.local_backend import run_training_job

    jobs = len(params["hidden_channels"])  # the sweep's jobs share this machine's cores
    return run_training_job(request, config=_config(settings), concurrent_jobs=jobs)


@task(trigger_rule="none_failed_min_one_success")
def select_best(settings: dict, trained_local, trained_sagemaker) -> dict:
    from tasks.selection import select_best

    # Only the backend that ran has results; the other's training task was skipped by the branch.
    trained = trained_local if settings["backend"] == "local" else trained_sagemaker
    return select_best(list(trained), config=_config(settings))


@task.branch
def choose_deploy(settings: dict, params: dict) -> str | None:
    if not params["deploy"]:
        return None
    return "deploy_local" if settings["backend"] == "local" else "deploy_sagemaker.deploy_requests"


@task
def deploy_local(settings: dict, best: dict, params: dict, run_id: str) -> dict:
    from tasks.deployment import deploy_local

    return deploy_local(best, endpoint_name=params["endpoint_name"], run_id=run_id, config=_config(settings))


@task(multiple_outputs=True)
def deploy_requests(settings: dict, best: dict, params: dict, run_id: str) -> dict:
    from tasks.deployment import sagemaker_deploy_requests

    return sagemaker_deploy_requests(
        best, endpoint_name=params["endpoint_name"], run_id=run_id, config=_config(settings)
    )


@task(trigger_rule="none_failed_min_one_success")
def report(best: dict) -> None:
    from tasks.selection import log_report

    log_report(best)


@dag(
    dag_id="mnist_sweep",
    doc_md=__doc__,
    schedule=_schedule(),
    start_date=datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC),
    catchup=False,
    max_active_runs=1,  # two sweeps must not race on one endpoint
    default_args={"owner": "mlops", "retries": 2, "retry_delay": datetime.timedelta(minutes=1)},
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

    trained_local = train_local.partial(settings=settings).expand(request=requests)
    train_sagemaker = SageMakerTrainingOperator.partial(
        task_id="train_sagemaker",
        **aws,
        print_log=True,
        check_interval=conf.getint("mnist_pipeline", "sagemaker_check_interval", fallback=30),
        # A retry finds its failed predecessor's job under the same name: start a new one, suffixed with the time.
        action_if_job_exists="timestamp",
    ).expand(config=requests)
    best = select_best(settings, trained_local, train_sagemaker.output)

    deploy_to = choose_deploy(settings)
    served_local = deploy_local(settings, best)
    with TaskGroup("deploy_sagemaker"):
        sagemaker = deploy_requests(settings, best)
        create_model = SageMakerModelOperator(task_id="create_model", config=sagemaker["model"], **aws)
        create_endpoint_config = SageMakerEndpointConfigOperator(
            task_id="create_endpoint_config", config=sagemaker["endpoint_config"], **aws
        )
        # "create" updates the endpoint instead when it exists (the provider falls back to UpdateEndpoint).
        create_or_update_endpoint = SageMakerEndpointOperator(
            task_id="create_or_update_endpoint", config=sagemaker["endpoint"], operation="create", **aws
        )

    chain(validation, dataset_uri)
    chain(requests, choose_backend(settings), [trained_local, train_sagemaker])
    chain(best, deploy_to, [served_local, sagemaker])
    chain(sagemaker, create_model, create_endpoint_config, create_or_update_endpoint)
    chain([served_local, create_or_update_endpoint], report(best))


mnist_sweep()
