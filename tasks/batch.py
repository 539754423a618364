"""Batch predictions: a registry version's model over every image file under an S3 prefix, by SageMaker Batch
Transform (the provider's SageMakerTransformOperator), then a summary of what it predicted.

A transform job takes one content type, so the files under the prefix are grouped by kind (.npy, .csv, .json, .png,
.jpg/.jpeg) and each kind gets a job of its own over a manifest (S3DataType ManifestFile) that lists its files; the
jobs write `<file>.out` under one output prefix per run. CSV rows are one image each (SplitType Line, many rows per
request); any other file is one request (an .npy or JSON file may hold many images).

The jobs run under tasks.operators.TransformOperator.
"""

from __future__ import annotations

import collections
import json
import logging
import posixpath
from collections.abc import Iterable, Mapping

from tasks.config import PipelineConfig
from tasks.hooks import s3_hook, sagemaker_hook
from tasks.names import PRECISION_VARIABLE
from tasks.training_jobs import check_instance_type, sagemaker_name

log = logging.getLogger(__name__)

# File kind → (content type, split type, batch strategy) of its transform job.
KINDS = {
    "npy": ("application/x-npy", "None", "SingleRecord"),
    "csv": ("text/csv", "Line", "MultiRecord"),
    "json": ("application/json", "None", "SingleRecord"),
    "png": ("image/png", "None", "SingleRecord"),
    "jpeg": ("image/jpeg", "None", "SingleRecord"),
}
EXTENSIONS = {".npy": "npy", ".csv": "csv", ".json": "json", ".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg"}


class VersionNotApproved(ValueError):
    """The version asked for (or named by the champion's asset event) is not Approved; the message names it."""


class NothingToPredict(ValueError):
    """No file of a kind the model takes under the input prefix; the message names the prefix."""


def default_input_uri(config: PipelineConfig) -> str:
    return f"{config.s3_root}/batch/input/"


def output_uri(config: PipelineConfig, run_id: str) -> str:
    return f"{config.s3_root}/batch/{sagemaker_name(run_id, unique_by=run_id)}/"


def model_to_predict_with(
    config: PipelineConfig, endpoint_name: str, model: str | None, triggered_by: Iterable[Mapping]
) -> dict:
    """The registry version to predict with: ``model`` (a version number of the endpoint's group, or an ARN) when
    given, else the one the champion asset event that triggered this run names, else the champion. Only an Approved
    version predicts (VersionNotApproved otherwise): one Rejected since, or still waiting for a person, is refused
    however it was named. Makes its SageMaker model (CreateModel from the version: its ModelPackageName) unless it
    exists; returns the version (tasks.registry.as_model) and ``model_name``."""
    from botocore.exceptions import ClientError

    from tasks.registry import APPROVED, as_model, champion, describe, find_version

    events = [event for event in triggered_by if event.get("model_package_arn")]
    if model:
        version = as_model(find_version(config, endpoint_name, model))
    elif events:
        version = as_model(describe(config, events[-1]["model_package_arn"]))
    elif current := champion(config, endpoint_name):
        version = current
    else:
        raise LookupError(
            f"endpoint {endpoint_name} has no champion (no Approved version serves it): give the "
            f"model param a version of registry group {endpoint_name}"
        )
    group = version["model_package_arn"].rsplit("/", 2)[-2]
    if version["approval"] != APPROVED:
        source = "the model param" if model else "the champion asset event" if events else "the registry"
        raise VersionNotApproved(
            f"version {version['version']} of {group} ({version['model_package_arn']}), named by "
            f"{source}, is {version['approval']}: batch predictions use {APPROVED} versions "
            "only"
        )
    name = sagemaker_name(group, f"v{version['version']}")
    hook = sagemaker_hook(config)
    try:
        hook.describe_model(name)
    except ClientError:
        hook.create_model(
            {
                "ModelName": name,
                "PrimaryContainer": {"ModelPackageName": version["model_package_arn"]},
                "ExecutionRoleArn": config.role_arn,
            }
        )
        log.info("Model %s made from version %s", name, version["model_package_arn"])
    return {**version, "model_name": name}


def input_files(config: PipelineConfig, input_uri: str) -> tuple[dict[str, list[str]], list[str]]:
    """The files under ``input_uri`` by kind (keys relative to it), and those of no kind the model takes."""
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    bucket, prefix = S3Hook.parse_s3_url(input_uri)
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    keys = s3_hook(config).list_keys(bucket_name=bucket, prefix=prefix) or []
    kinds: dict[str, list[str]] = collections.defaultdict(list)
    skipped = []
    for key in sorted(keys):
        relative = key[len(prefix) :]
        if not relative or relative.endswith("/"):
            continue
        kind = EXTENSIONS.get(posixpath.splitext(relative)[1].lower())
        (kinds[kind] if kind else skipped).append(relative)
    return dict(kinds), skipped


def transform_jobs(
    config: PipelineConfig,
    input_uri: str,
    model: Mapping,
    run_id: str,
    *,
    instance_type: str,
    max_concurrent: int,
    max_payload_mb: int,
    precision: str = "float32",
) -> list[dict]:
    """One CreateTransformJob request per kind of file under ``input_uri``, each over a manifest of its files, its
    model server computing in ``precision``. NothingToPredict when there is none; RequestRefused (nothing written)
    for an ``instance_type`` the configuration does not allow."""
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    from tasks.s3 import put_verified

    check_instance_type(instance_type, config)
    kinds, skipped = input_files(config, input_uri)
    if skipped:
        log.warning("Not predicted (not .npy, .csv, .json, .png or .jpg): %s", ", ".join(skipped[:20]))
    if not kinds:
        raise NothingToPredict(
            f"no .npy, .csv, .json, .png or .jpg file under {input_uri}"
            + (f" ({len(skipped)} other files)" if skipped else "")
        )
    output = output_uri(config, run_id)
    bucket, output_prefix = S3Hook.parse_s3_url(output)
    client = s3_hook(config).conn
    requests = []
    for kind, files in sorted(kinds.items()):
        content_type, split, strategy = KINDS[kind]
        manifest_key = f"{output_prefix.rstrip('/')}/manifests/{kind}.manifest"
        manifest = [{"prefix": input_uri if input_uri.endswith("/") else input_uri + "/"}, *files]
        put_verified(client, bucket, manifest_key, json.dumps(manifest).encode())
        requests.append(
            {
                "TransformJobName": sagemaker_name(run_id, kind, unique_by=run_id),
                "ModelName": model["model_name"],
                "MaxConcurrentTransforms": max_concurrent,
                "MaxPayloadInMB": max_payload_mb,
                "BatchStrategy": strategy,
                "TransformInput": {
                    "DataSource": {
                        "S3DataSource": {"S3DataType": "ManifestFile", "S3Uri": f"s3://{bucket}/{manifest_key}"}
                    },
                    "ContentType": content_type,
                    "SplitType": split,
                },
                "TransformOutput": {
                    "S3OutputPath": f"{output}predictions/",
                    "Accept": "application/json",
                    "AssembleWith": "Line",
                },
                "TransformResources": {"InstanceType": instance_type, "InstanceCount": 1},
                "Environment": {PRECISION_VARIABLE: precision},
                "Tags": [{"Key": "project", "Value": "mnist-pipeline"}, {"Key": "run_id", "Value": run_id}],
            }
        )
    return requests


def _labels(body: bytes, where: str) -> list[int]:
    """The predicted digits of one `.out` object: a JSON answer (``{"predictions": [{"label"}...]}``) per line."""
    labels = []
    for number, line in enumerate(body.splitlines(), 1):
        if line.strip():
            try:
                labels += [prediction["label"] for prediction in json.loads(line)["predictions"]]
            except (ValueError, KeyError, TypeError) as error:
                raise ValueError(f"{where} line {number} is not the model's JSON answer: {error}") from None
    return labels


def predictions_summary(
    config: PipelineConfig, transforms: Iterable[Mapping], model: Mapping, input_uri: str, run_id: str
) -> dict:
    """What the transform jobs predicted: images, the count of each predicted digit, seconds (first job's start to
    the last one's end) and images per second, per kind and in all; written to ``summary.json`` beside the
    predictions, and returned."""
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    from tasks.s3 import put_verified, read_object

    counts = [0] * 10
    jobs, starts, ends = [], [], []
    hook = sagemaker_hook(config)
    for transform in transforms:
        # Described again: the operator's serialized copy keeps times as their repr().
        job = hook.describe_transform_job(transform["Transform"]["TransformJobName"])
        manifest = json.loads(read_object(config, job["TransformInput"]["DataSource"]["S3DataSource"]["S3Uri"]))
        output = job["TransformOutput"]["S3OutputPath"].rstrip("/")
        labels = []
        for name in manifest[1:]:
            where = f"{output}/{name}.out"
            labels += _labels(read_object(config, where), where)
        for label in labels:
            counts[label] += 1
        started, ended = job["TransformStartTime"], job["TransformEndTime"]
        starts.append(started)
        ends.append(ended)
        seconds = (ended - started).total_seconds()
        jobs.append(
            {
                "job": job["TransformJobName"],
                "content_type": job["TransformInput"]["ContentType"],
                "files": len(manifest) - 1,
                "images": len(labels),
                "seconds": round(seconds, 3),
                "precision": job.get("Environment", {}).get(PRECISION_VARIABLE, "float32"),
            }
        )
    images = sum(job["images"] for job in jobs)
    seconds = (max(ends) - min(starts)).total_seconds() if jobs else 0.0
    summary = {
        "run_id": run_id,
        "input_uri": input_uri,
        "model_package_arn": model["model_package_arn"],
        "version": model["version"],
        "images": images,
        "counts": {str(digit): count for digit, count in enumerate(counts)},
        "seconds": round(seconds, 3),
        "images_per_second": round(images / seconds, 1) if seconds > 0 else None,
        "jobs": jobs,
    }
    bucket, prefix = S3Hook.parse_s3_url(output_uri(config, run_id))
    put_verified(s3_hook(config).conn, bucket, f"{prefix.rstrip('/')}/summary.json", json.dumps(summary).encode())
    summary["summary_uri"] = f"s3://{bucket}/{prefix.rstrip('/')}/summary.json"
    log.info(
        "Batch predictions of version %s: %d images in %.1f s (%s images/s); digits %s",
        model["version"],
        images,
        seconds,
        summary["images_per_second"],
        summary["counts"],
    )
    return summary
