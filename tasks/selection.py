"""Model selection: the most accurate training job of a sweep, or of a tuning job.

Each job's test accuracy is the last `test:accuracy` in its FinalMetricDataList (the metric the sweep write-up
defined, in percent), as SageMaker reports it. The per-epoch history, parameter count and timings come from
the `metrics.json` the training script leaves in the job's `output.tar.gz` (SageMaker uploads the output data
dir there). The highest accuracy wins; a tie goes to the model with fewer parameters.
Accuracies returned are fractions (0.9714), as in metrics.json.

The winner's model.tar.gz is published under its SHA-256 only if it holds exactly the files the job made: the
training script names each file's SHA-256 in the job's own log (training/contract.py), which only the job's role
may write. A model.tar.gz put there by anyone else fails selection, naming the job and the object.

Imported by the DAG at parse time: airflow hooks are imported inside the functions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Iterable, Mapping

from tasks.config import PipelineConfig
from tasks.training_jobs import ACCURACY_METRIC

log = logging.getLogger(__name__)

TRAINING_LOG_GROUP = "/aws/sagemaker/TrainingJobs"  # SageMaker's, where each host of a job logs to a stream of its own


class SelectionError(RuntimeError):
    """No job, or a job without a test accuracy to judge it by; the message names the job."""


def output_metrics(description: Mapping, config: PipelineConfig) -> dict | None:
    """metrics.json from the job's output.tar.gz (next to model.tar.gz), or None when the job left none."""
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    from tasks.archives import members, read_archive

    model_uri = description["ModelArtifacts"]["S3ModelArtifacts"]
    bucket, key = S3Hook.parse_s3_url(f"{model_uri.rsplit('/', 1)[0]}/output.tar.gz")
    body = read_archive(config, bucket, key)
    if body is None:
        return None
    found = members(body, f"s3://{bucket}/{key}", wanted={"metrics.json"})  # at the root, as "metrics.json" or "./"
    return json.loads(found["metrics.json"]) if "metrics.json" in found else None


def trial(description: Mapping, metrics: Mapping | None) -> dict:
    """One row of the sweep: a job's name, artifact, accuracy and what its metrics.json tells of it."""
    from tasks.trials import summarize_trial

    name = description["TrainingJobName"]
    final = {item["MetricName"]: float(item["Value"]) for item in description.get("FinalMetricDataList", [])}
    if ACCURACY_METRIC in final:
        accuracy = round(final[ACCURACY_METRIC] / 100, 6)  # a fraction, as in metrics.json
    elif metrics and "test_accuracy" in metrics:
        # SageMaker leaves a metric out when its regex never matched a log line it kept; metrics.json still knows.
        accuracy = float(metrics["test_accuracy"])
    else:
        raise SelectionError(
            f"training job {name} reported no {ACCURACY_METRIC} (its FinalMetricDataList has "
            f"{', '.join(sorted(final)) or 'nothing'}) and left no metrics.json in its output.tar.gz"
        )
    return {
        **(summarize_trial(metrics, name) if metrics else {}),
        "training_job_name": name,
        "hidden_channels": int(description["HyperParameters"]["hidden_channels"]),
        # As the job had them, without SageMaker's own (the code's location, the entry point)
        "hyperparameters": {k: v for k, v in description["HyperParameters"].items() if not k.startswith("sagemaker_")},
        "test_accuracy": accuracy,
        "model_data_url": description["ModelArtifacts"]["S3ModelArtifacts"],
        "parameters": metrics.get("parameters") if metrics else None,
        "training_seconds": description.get("TrainingTimeInSeconds"),
    }


def tuner_trial(job: Mapping, config: PipelineConfig) -> dict:
    """One row of a tuning job's trials (a HyperParameterTrainingJobSummary): a completed job's row as a sweep's, with
    what the tuner saw of it (its tuned values, its objective, whether the tuner stopped it early)."""
    from tasks.hooks import sagemaker_hook
    from tasks.tuning import stopped_early

    name, status = job["TrainingJobName"], job["TrainingJobStatus"]
    objective = (job.get("FinalHyperParameterTuningJobObjectiveMetric") or {}).get("Value")
    tuner = {
        "tuned": dict(job.get("TunedHyperParameters") or {}),
        "status": status,
        "stopped_early": stopped_early(job),
        "objective": None if objective is None else round(objective / 100, 6),
    }
    description = sagemaker_hook(config).describe_training_job(name)
    if status == "Completed":
        return {**trial(description, output_metrics(description, config)), **tuner}
    return {
        "training_job_name": name,
        "hidden_channels": int(description["HyperParameters"]["hidden_channels"]),
        "hyperparameters": {k: v for k, v in description["HyperParameters"].items() if not k.startswith("sagemaker_")},
        "test_accuracy": tuner["objective"],
        "model_data_url": None,  # a job stopped or failed left no model to serve
        "parameters": None,
        "failure": job.get("FailureReason"),
        **tuner,
    }


def best_of(trials: Iterable[Mapping]) -> Mapping:
    """Highest test accuracy among the jobs that left a model; among equals the fewest parameters (unknown counts
    last), then fewest channels."""
    trials = [t for t in trials if t.get("model_data_url") and t.get("test_accuracy") is not None]
    if not trials:
        raise SelectionError("no training job completed with a model to select")
    return min(
        trials,
        key=lambda t: (
            -t["test_accuracy"],
            t["parameters"] if t["parameters"] is not None else math.inf,
            t["hidden_channels"],
        ),
    )


def most_accurate(trainings: Iterable[Mapping], *, config: PipelineConfig, tuning: Mapping | None = None) -> dict:
    """Judge a sweep's training operators' results (``{"Training": DescribeTrainingJob}`` each), or the jobs of a
    tuning job (``tuning``: the tuning operator's ``{"Tuning": DescribeHyperParameterTuningJob}``); return the best.

    The answer (small, for XCom): the best job's name, hidden_channels, test accuracy (a fraction), parameter
    count and model artifact URI, ``trials``, every job's row of the trial table, and for a tuning job its name.
    """
    from tasks.tuning import tuner_jobs

    if tuning:
        trials = [tuner_trial(job, config) for job in tuner_jobs(tuning["Tuning"], config)]
    else:
        trials = []
        for training in trainings:
            description = training["Training"]
            trials.append(trial(description, output_metrics(description, config)))
        trials.sort(key=lambda t: t["hidden_channels"])
    best = best_of(trials)
    best = {**best, **publish_model(best["model_data_url"], config, best["training_job_name"])}
    if tuning:
        best["tuning_job_name"] = tuning["Tuning"]["HyperParameterTuningJobName"]
    log_report({**best, "trials": trials})
    return {**best, "trials": trials}


def publish_model(model_data_url: str, config: PipelineConfig, job_name: str) -> dict:
    """Copy the model.tar.gz of training job ``job_name`` to ``<s3_root>/models/<sha256>/model.tar.gz``, the address
    everything after selection uses: SageMaker models, endpoints, the champion. The model and the inference code
    packed in it then run only as the SHA-256 its key names, whatever is written later where the job left it. It is
    published only if it holds exactly the files the job made (``made_files``); SelectionError otherwise."""
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    from tasks.archives import ArchiveError, members, read_archive
    from tasks.s3 import put_content_addressed

    bucket, key = S3Hook.parse_s3_url(model_data_url)
    try:
        body = read_archive(config, bucket, key)
        if body is None:
            raise SelectionError(f"training job {job_name} left no model at {model_data_url}")
        held = {name: hashlib.sha256(data).hexdigest() for name, data in members(body, model_data_url).items()}
    except ArchiveError as error:
        raise SelectionError(f"training job {job_name}: {error}") from None
    made = made_files(config, job_name)
    if held != made:
        differ = sorted(name for name in held.keys() | made.keys() if held.get(name) != made.get(name))
        raise SelectionError(
            f"{model_data_url} does not hold the files training job {job_name} made (its log names "
            f"their SHA-256); these differ: {', '.join(differ)}. Not published."
        )
    published = put_content_addressed(config, "models", "model.tar.gz", body)
    log.info("Model %s published as %s", model_data_url, published)
    return {"model_data_url": published, "training_model_data_url": model_data_url}


def made_files(config: PipelineConfig, job_name: str) -> dict[str, str]:
    """The files training job ``job_name`` made (relative path → SHA-256), as its first host's log names them."""
    from tasks.hooks import hook
    from training.contract import MODEL_FILES_LINE

    logs = hook(config, "logs")
    streams = logs.conn.describe_log_streams(logGroupName=TRAINING_LOG_GROUP, logStreamNamePrefix=f"{job_name}/algo-1-")
    for stream in streams["logStreams"]:
        for event in logs.get_log_events(TRAINING_LOG_GROUP, stream["logStreamName"]):
            if MODEL_FILES_LINE in event["message"]:
                try:
                    return json.loads(event["message"].split(MODEL_FILES_LINE, 1)[1])
                except ValueError:
                    raise SelectionError(f"training job {job_name}: its log's model files line is not JSON") from None
    raise SelectionError(
        f"training job {job_name}: its log names no model files ({MODEL_FILES_LINE!r}), so nothing "
        "tells its model.tar.gz from another: not published"
    )


def log_report(best: Mapping) -> None:
    """The trial table, as the sweep write-up's notebook showed it, and the verdict."""
    from tasks.trials import format_trial_table

    log.info("Sweep of %d training jobs:\n%s", len(best["trials"]), format_trial_table(best["trials"]))
    log.info(
        "Best: %s (hidden_channels %d): test accuracy %.2f%%, %s parameters, model %s",
        best["training_job_name"],
        best["hidden_channels"],
        100 * best["test_accuracy"],
        best["parameters"] if best["parameters"] is not None else "unknown",
        best["model_data_url"],
    )
