"""Deployment configuration: where data and models live, which AWS connection and role.

Read at run time, never from the DAG file. Where the pipeline runs is the AWS connection's business alone: on
AWS it points at AWS; on a laptop the local stack's connection points SageMaker at the local SageMaker service and
everything else at the local AWS. Each key comes
from the environment (`MNIST_PIPELINE_<KEY>`), else from the Airflow Variable `mnist_pipeline` (a JSON object,
editable in the UI under Admin → Variables), else from the default below.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

from data_checks import OFFICIAL_COUNTS

VARIABLE_NAME = "mnist_pipeline"
PUBLIC_MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",  # The sweep write-ups and torchvision download from here.
    "https://storage.googleapis.com/cvdf-datasets/mnist/",  # CVDF's, TensorFlow's tutorials
    "http://yann.lecun.com/exdb/mnist/",  # the original, often refusing robots: last
)


# The bounds of retrain_interval_hours: an hour to thirty days between drift-triggered retraining runs.
MIN_RETRAIN_HOURS, MAX_RETRAIN_HOURS = 1, 720


def comma_list(setting: str) -> tuple[str, ...]:
    """The entries of a comma-separated setting, stripped, empty ones left out."""
    return tuple(part.strip() for part in setting.split(",") if part.strip())


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    bucket: str = "mnist-pipeline"
    prefix: str = "mnist-sweep"
    region: str = "us-east-1"
    role_arn: str = "arn:aws:iam::000000000000:role/mnist-pipeline-sagemaker"
    aws_conn_id: str = "aws_default"
    # Where run artifacts (reports, Data Docs), the MNIST cache and the local stack are kept on this machine.
    state_dir: str = str(Path.home() / ".local" / "state" / "mnist-pipeline")
    # Schedule of the sweep DAG: a cron string, a preset such as "@weekly", or "none".
    schedule: str = "none"
    # A dataset other than the official MNIST (a private mirror, the tests' small files): an md5sum-format file
    # with its four sums, its "train,test" image counts and its reference class statistics. Empty / the official counts by default.
    mnist_md5sums: str = ""
    mnist_expected_counts: str = ",".join(map(str, OFFICIAL_COUNTS))
    # The class statistics the data is held to (`mnist-pipeline data reference` writes them): the official MNIST's
    # when empty.
    mnist_reference: str = ""
    # The local stack's SageMaker service: cores its training jobs and model servers may use (0: all of this
    # machine's), and seconds between its endpoint servers' CloudWatch puts (a burst's end flushes them at once).
    local_cpus: int = 0
    metrics_interval: int = 10
    # What one trigger-form submission may start, so that a typo cannot start a hundred GPU instances: the instance
    # types (comma-separated) of its training, tuning and batch transform jobs, and the training instances of a whole
    # run (instance_count x the hidden_channels values, or x tune_max_parallel when it tunes).
    allowed_instance_types: str = (
        "ml.m5.large,ml.m5.xlarge,ml.m5.2xlarge,ml.c5.xlarge,ml.c5.2xlarge,ml.g4dn.xlarge,ml.g5.xlarge"
    )
    max_instances_per_run: int = 16
    # Where the trigger form's `mnist_mirror` may point (the administrator's $MNIST_MIRROR always may): URL
    # prefixes, and local directories under these roots (comma-separated; none by default). Each file is capped,
    # and a whole download has a deadline.
    mnist_mirrors_allowed: str = ",".join(PUBLIC_MNIST_MIRRORS)
    mnist_mirror_roots: str = ""
    mnist_max_file_bytes: int = 64 * 1024 * 1024
    mnist_download_seconds: int = 900
    # The SNS topic that failed runs, failed checks, rollbacks and missed deadlines are sent to (empty: none).
    alert_topic_arn: str = ""
    # On AWS, optionally: the KMS key for training outputs and volumes, and the VPC to train in (comma-separated
    # subnet and security group ids; both or neither).
    kms_key_id: str = ""
    subnets: str = ""
    security_group_ids: str = ""
    # The drift check (dags/mnist_drift.py): its schedule (a cron string, a preset, or "none"); whether a drift it
    # finds schedules a retraining run of the sweep ("true" or "false"); and at most how often (hours, 1-720).
    drift_schedule: str = "@hourly"
    retrain_on_drift: str = "false"
    retrain_interval_hours: int = 24

    def __post_init__(self):
        if not self.bucket:
            raise ValueError("mnist_pipeline bucket must not be empty")
        if self.retrain_on_drift.strip().lower() not in ("true", "false"):
            raise ConfigError(f"mnist_pipeline retrain_on_drift must be true or false, got {self.retrain_on_drift!r}")
        if not MIN_RETRAIN_HOURS <= self.retrain_interval_hours <= MAX_RETRAIN_HOURS:
            raise ConfigError(
                f"mnist_pipeline retrain_interval_hours must be {MIN_RETRAIN_HOURS}-{MAX_RETRAIN_HOURS}, "
                f"got {self.retrain_interval_hours}"
            )

    @property
    def retrains_on_drift(self) -> bool:
        return self.retrain_on_drift.strip().lower() == "true"

    @property
    def s3_root(self) -> str:
        return f"s3://{self.bucket}/{self.prefix.strip('/')}"

    @property
    def expected_counts(self) -> tuple[int, int]:
        train, test = (int(n) for n in self.mnist_expected_counts.split(","))
        return train, test

    @property
    def instance_types(self) -> tuple[str, ...]:
        return comma_list(self.allowed_instance_types)

    @property
    def vpc_subnets(self) -> tuple[str, ...]:
        return comma_list(self.subnets)

    @property
    def vpc_security_groups(self) -> tuple[str, ...]:
        return comma_list(self.security_group_ids)

    @property
    def cpus(self) -> int:
        return self.local_cpus or len(os.sched_getaffinity(0))


class ConfigError(ValueError):
    """The configuration cannot be read as it stands; the message names the setting and what is wrong."""


def _airflow_variable() -> dict:
    """The Variable's settings ({} when it is not set). Unreadable, malformed or naming an unknown key, it is an
    error: falling back to the defaults could run a deployment meant for AWS on this machine, or the reverse."""
    # Only a process that already runs Airflow (a task, the DAG tests) has Variables to ask; importing Airflow
    # just to look would cost the CLI seconds and reconfigure its logging.
    if "airflow" not in sys.modules:
        return {}
    from airflow.sdk import Variable

    try:
        value = Variable.get(VARIABLE_NAME, default=None)
    except Exception as error:
        raise ConfigError(
            f"cannot read the Airflow Variable {VARIABLE_NAME}: {type(error).__name__}: {error}"
        ) from error
    if value is None:
        return {}
    try:
        settings = json.loads(value) if isinstance(value, str) else value
    except ValueError as error:
        raise ConfigError(f"the Airflow Variable {VARIABLE_NAME} is not JSON: {error}") from None
    if not isinstance(settings, dict):
        raise ConfigError(
            f"the Airflow Variable {VARIABLE_NAME} must be a JSON object of settings, got {type(settings).__name__}"
        )
    unknown = sorted(set(settings) - {field.name for field in dataclasses.fields(PipelineConfig)})
    if unknown:
        raise ConfigError(f"the Airflow Variable {VARIABLE_NAME} names unknown settings: {', '.join(unknown)}")
    return settings


def load_config(**overrides) -> PipelineConfig:
    """The configuration in force now: environment, then the Airflow Variable, then defaults."""
    fields = {f.name: f for f in dataclasses.fields(PipelineConfig)}
    values = {}
    variable = None
    for name, field in fields.items():
        source = f"MNIST_PIPELINE_{name.upper()}"
        raw = os.environ.get(source)
        if raw is None:
            if variable is None:
                variable = _airflow_variable()
            raw, source = variable.get(name), f"the Airflow Variable {VARIABLE_NAME}'s {name}"
        if raw is not None:
            try:
                values[name] = int(raw) if field.type == "int" else str(raw)
            except (TypeError, ValueError):
                raise ConfigError(f"{source} must be a whole number, got {raw!r}") from None
    values.update(overrides)
    return PipelineConfig(**values)
