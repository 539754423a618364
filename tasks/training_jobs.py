"""The CreateTrainingJob requests of a sweep: one per hidden_channels value.

`build_training_job_request` builds the exact request SageMaker takes; the provider's SageMakerTrainingOperator
sends it as is, to AWS or to the local SageMaker service, whichever the AWS connection points at. The training
code travels as SageMaker script mode expects it: a `sourcedir.tar.gz` (the files of training/ at its root, plus
the inference handler) named by the `sagemaker_submit_directory` hyperparameter. The archive is byte-for-byte
reproducible, so its S3 key is its SHA-256 and an unchanged tree is never uploaded twice.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import re
import tarfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from tasks.config import PipelineConfig
from tasks.hooks import sagemaker_hook
from tasks.images import pytorch_image_uri
from tasks.names import MAX_NAME_LENGTH
from tasks.policy import MAX_RUNTIME_SECONDS

log = logging.getLogger(__name__)

# These are the sweep write-up's metrics, matched in the log lines of its training script, which train.py prints
# unchanged. SageMaker keeps the last match of each.
METRIC_DEFINITIONS = (
    {"Name": "train:loss", "Regex": r"Train Loss: (.*?);"},
    {"Name": "test:loss", "Regex": r"Test Average loss: (.*?),"},
    {"Name": "test:accuracy", "Regex": r"Test Accuracy: (.*?)%;"},
)
ACCURACY_METRIC = "test:accuracy"  # the objective: what selection and tuning judge a job by (percent)
TRAINING_CHANNEL = "training"
ENTRY_POINT = "train.py"
VOLUME_SIZE_GB = 10
# Sweep params that become hyperparameters when set; unset (None) leaves the preset's (or the script's) default.
SWEEP_HYPERPARAMETERS = ("epochs", "preset", "optimizer", "lr", "batch_size", "dropout", "kernel_size")


def sagemaker_name(*parts: object, max_length: int = MAX_NAME_LENGTH, unique_by: str = "") -> str:
    """A valid SageMaker name from ``parts``: lower-case letters, digits and single hyphens, at most ``max_length``.

    With ``unique_by`` (a run id) the name ends in 8 hex digits of its SHA-1, so names shortened to fit, or runs
    whose ids differ only in characters SageMaker refuses, still never collide.
    """
    suffix = hashlib.sha1(unique_by.encode()).hexdigest()[:8] if unique_by else ""
    words = [re.sub(r"[^a-z0-9]+", "-", str(part).lower()).strip("-") for part in parts]
    words = [word for word in words if word]
    # Shorten the first part (a run id's slug) rather than what tells the names of one sweep apart.
    room = max_length - len("-".join([*words[1:], suffix])) - (1 if len(words) > 1 or suffix else 0)
    if room < 1:
        raise ValueError(f"cannot fit {parts!r} into a SageMaker name of {max_length} characters")
    words[0] = words[0][:room].strip("-") or "x"
    return "-".join([*words, suffix] if suffix else words)


def training_job_name(run_id: str, hidden_channels: int) -> str:
    """Deterministic per (run, hidden_channels): a retried task asks for the same name; the run id stays legible."""
    return sagemaker_name(run_id, f"hc{hidden_channels}", unique_by=run_id)


def training_image_uri(region: str, instance_type: str) -> str:
    return pytorch_image_uri(region, instance_type, scope="training")


class RequestRefused(ValueError):
    """A run's training requests are outside what the configuration allows; the message names the param."""


def dataset_digest(training_data_uri: str) -> dict[str, str]:
    """The hyperparameter by which the training script checks its channel (training/channel.py): the SHA-256 a
    content-addressed dataset's prefix names (`.../datasets/mnist/<sha256>/`), if it names one."""
    last = training_data_uri.rstrip("/").rsplit("/", 1)[-1]
    return {"dataset_sha256": last} if re.fullmatch(r"[0-9a-f]{64}", last) else {}


def build_training_job_request(
    *,
    job_name: str,
    hyperparameters: Mapping[str, object],
    training_data_uri: str,
    sourcedir_uri: str,
    output_uri: str,
    role_arn: str,
    region: str,
    instance_type: str,
    instance_count: int,
    experiment_name: str,
    trial_name: str,
    tags: Mapping[str, str],
    max_runtime_seconds: int = MAX_RUNTIME_SECONDS,
    kms_key_id: str = "",
    subnets: Sequence[str] = (),
    security_group_ids: Sequence[str] = (),
) -> dict:
    """The CreateTrainingJob request for one job (SageMaker script mode, PyTorch framework image).

    Hyperparameter values become strings (the API takes nothing else); the container passes them to
    `sagemaker_program` as `--key value`, and downloads and unpacks `sagemaker_submit_directory` first. With
    ``kms_key_id`` the outputs and the instances' volumes are encrypted with that key; with ``subnets`` and
    ``security_group_ids`` the job runs in that VPC, without internet access (the data and code come from S3).
    """
    if bool(subnets) != bool(security_group_ids):
        raise RequestRefused("a VPC needs both subnets and security_group_ids (the settings of the same names)")
    request = {
        "TrainingJobName": job_name,
        "AlgorithmSpecification": {
            "TrainingImage": training_image_uri(region, instance_type),
            "TrainingInputMode": "File",
            "MetricDefinitions": [dict(definition) for definition in METRIC_DEFINITIONS],
            "EnableSageMakerMetricsTimeSeries": True,
        },
        "HyperParameters": {
            **{key: str(value) for key, value in hyperparameters.items()},
            **dataset_digest(training_data_uri),
            "sagemaker_program": ENTRY_POINT,
            "sagemaker_submit_directory": sourcedir_uri,
            "sagemaker_region": region,
        },
        "InputDataConfig": [
            {
                "ChannelName": TRAINING_CHANNEL,
                "DataSource": {
                    "S3DataSource": {
                        "S3DataType": "S3Prefix",
                        "S3Uri": training_data_uri,
                        "S3DataDistributionType": "FullyReplicated",
                    }
                },
            }
        ],
        "OutputDataConfig": {"S3OutputPath": output_uri},
        "ResourceConfig": {
            "InstanceType": instance_type,
            "InstanceCount": instance_count,
            "VolumeSizeInGB": VOLUME_SIZE_GB,
        },
        "StoppingCondition": {"MaxRuntimeInSeconds": max_runtime_seconds},
        "RoleArn": role_arn,
        "ExperimentConfig": {"ExperimentName": experiment_name, "TrialName": trial_name},
        "Tags": [{"Key": key, "Value": str(value)} for key, value in tags.items()],
    }
    if kms_key_id:
        request["OutputDataConfig"]["KmsKeyId"] = kms_key_id
        request["ResourceConfig"]["VolumeKmsKeyId"] = kms_key_id
    if subnets:
        request["VpcConfig"] = {"Subnets": list(subnets), "SecurityGroupIds": list(security_group_ids)}
        request["EnableNetworkIsolation"] = True
    return request


def check_instance_type(instance_type: str, config: PipelineConfig) -> None:
    """Refuse an instance type the configuration does not allow (the trigger forms' `instance_type`), naming it."""
    if instance_type not in config.instance_types:
        raise RequestRefused(
            f"instance_type {instance_type} is not allowed here: one of "
            f"{', '.join(config.instance_types)} (the allowed_instance_types setting)"
        )


def check_resources(params: Mapping[str, object], config: PipelineConfig, jobs_at_once: int | None = None) -> None:
    """Refuse an instance type or a number of instances the configuration does not allow, naming the param.
    ``jobs_at_once``: the jobs that run together (a tuner's parallel jobs); a sweep's are its hidden_channels."""
    check_instance_type(str(params["instance_type"]), config)
    count = int(params["instance_count"])
    jobs, what = (
        (jobs_at_once, "tune_max_parallel")
        if jobs_at_once
        else (len(params["hidden_channels"]), "hidden_channels values")
    )
    total = count * jobs
    if total > config.max_instances_per_run:
        raise RequestRefused(
            f"instance_count {count} x {jobs} {what} = {total} instances, over the "
            f"{config.max_instances_per_run} a run may start (the max_instances_per_run setting)"
        )


def sweep_requests(
    params: Mapping[str, object], *, config: PipelineConfig, dag_id: str, run_id: str, dataset_uri: str
) -> list[dict]:
    """The requests of a sweep run: one per ``params["hidden_channels"]`` value, in that order.

    Checks the resources against the configuration, uploads the training code, and makes sure the experiment and
    trial exist (SageMaker only associates a job with existing ones).
    """
    check_resources(params, config)
    sourcedir_uri = upload_sourcedir(config)
    experiment_name = sagemaker_name(dag_id, max_length=120)
    trial_name = sagemaker_name(run_id, max_length=120, unique_by=run_id)
    ensure_experiment(config, experiment_name, trial_name)
    common = {key: params[key] for key in SWEEP_HYPERPARAMETERS if params.get(key) is not None}
    return [
        build_training_job_request(
            job_name=training_job_name(run_id, hidden_channels),
            hyperparameters={"hidden_channels": hidden_channels, **common},
            training_data_uri=dataset_uri,
            sourcedir_uri=sourcedir_uri,
            output_uri=f"{config.s3_root}/training-jobs",
            role_arn=config.role_arn,
            region=config.region,
            instance_type=str(params["instance_type"]),
            instance_count=int(params["instance_count"]),
            experiment_name=experiment_name,
            trial_name=trial_name,
            tags={"project": "mnist-pipeline", "dag_id": dag_id, "run_id": run_id, "hidden_channels": hidden_channels},
            kms_key_id=config.kms_key_id,
            subnets=config.vpc_subnets,
            security_group_ids=config.vpc_security_groups,
        )
        for hidden_channels in params["hidden_channels"]
    ]


def ensure_experiment(config: PipelineConfig, experiment_name: str, trial_name: str) -> None:
    """Create the experiment (the DAG) and the trial (the run) unless they exist, to track the jobs as the sweep
    write-up did with SageMaker Experiments."""
    from botocore.exceptions import ClientError

    client = sagemaker_hook(config).conn
    for describe, create, kwargs in (
        (client.describe_experiment, client.create_experiment, {"ExperimentName": experiment_name}),
        (client.describe_trial, client.create_trial, {"TrialName": trial_name, "ExperimentName": experiment_name}),
    ):
        name_key = next(iter(kwargs))
        try:
            describe(**{name_key: kwargs[name_key]})
            continue  # a retry, or the same DAG's earlier runs
        except ClientError as error:
            if error.response["Error"]["Code"] != "ResourceNotFound":
                raise
        create(**kwargs)


# -- the training code as SageMaker script mode takes it ------------------------------------------------------


def sourcedir_files() -> dict[str, Path]:
    """Archive name → file: every file of training/ at the root, and beside them the inference handler with the
    modules it imports (inference.py, predictor.py, ...), which train.py packs into the model's code/."""
    import inference
    import training
    from inference.artifact import HANDLER_FILES

    root = Path(training.__file__).parent
    files = {
        path.relative_to(root).as_posix(): path
        for path in sorted(root.rglob("*"))
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }
    files.update({name: Path(inference.__file__).parent / name for name in HANDLER_FILES})
    return files


def build_sourcedir(files: Mapping[str, Path] | None = None) -> bytes:
    """sourcedir.tar.gz as bytes, reproducible: sorted entries, fixed owner, mode and times, gzip without mtime."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, path in sorted((files or sourcedir_files()).items()):
            data = path.read_bytes()
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            archive.addfile(info, io.BytesIO(data))
    return gzip.compress(buffer.getvalue(), mtime=0)


def upload_sourcedir(config: PipelineConfig) -> str:
    """Upload sourcedir.tar.gz to ``<s3_root>/code/<sha256>/`` unless it is there intact; return its S3 URI."""
    from tasks.s3 import put_content_addressed

    return put_content_addressed(config, "code", "sourcedir.tar.gz", build_sourcedir())
