"""The CreateHyperParameterTuningJob request of a `tune` run, and the tuner's trials as the selection reads them.

The tuner's training jobs are the sweep's, searched instead of listed: the TrainingJobDefinition is the request
`tasks.training_jobs.build_training_job_request` builds for one sweep job, its hyperparameters made static and the
ranges of the trigger form searched. The objective is the training log's `test:accuracy` (percent), maximized.
The provider's SageMakerTuningOperator (tasks.operators.TuningOperator) sends the request as is, to AWS or to the
local SageMaker service.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping

from tasks.config import PipelineConfig
from tasks.earlier_jobs import TUNING
from tasks.hooks import sagemaker_hook
from tasks.training_jobs import (
    ACCURACY_METRIC,
    SWEEP_HYPERPARAMETERS,
    RequestRefused,
    build_training_job_request,
    check_resources,
    sagemaker_name,
    upload_sourcedir,
)

log = logging.getLogger(__name__)

OBJECTIVE = {"Type": "Maximize", "MetricName": ACCURACY_METRIC}
# What TrainingJobDefinition takes of a CreateTrainingJob request (the rest is the tuner's, or the job's own name).
DEFINITION_KEYS = (
    "AlgorithmSpecification",
    "RoleArn",
    "InputDataConfig",
    "OutputDataConfig",
    "ResourceConfig",
    "StoppingCondition",
    "VpcConfig",
    "EnableNetworkIsolation",
)
# The form's tuning ranges: param → (hyperparameter, range kind, scaling).
RANGES = {
    "tune_lr": ("lr", "Continuous", "Logarithmic"),
    "tune_dropout": ("dropout", "Continuous", "Linear"),
    "tune_epochs": ("epochs", "Integer", "Linear"),
}


def tuning_job_name(run_id: str) -> str:
    """Deterministic per run (a retry asks for the same name), within SageMaker's 32 characters."""
    return sagemaker_name(run_id, max_length=TUNING.max_name, unique_by=run_id)


def parameter_ranges(params: Mapping) -> tuple[dict, set[str]]:
    """The ParameterRanges of the form's ranges, and the hyperparameters they tune. RequestRefused names a range
    the strategy cannot search, or the absence of any."""
    strategy = params["tune_strategy"]
    ranges: dict[str, list] = {
        "IntegerParameterRanges": [],
        "ContinuousParameterRanges": [],
        "CategoricalParameterRanges": [],
    }
    for param, name in (("hidden_channels", "hidden_channels"), ("tune_batch_size", "batch_size")):
        values = params.get(param) or []
        if len(values) > 1:
            ranges["CategoricalParameterRanges"].append({"Name": name, "Values": [str(v) for v in values]})
    numeric = [param for param in RANGES if params.get(param)]
    if strategy == "Hyperband":
        numeric = [param for param in numeric if param != "tune_epochs"]  # epochs are its resource
    if strategy == "Grid" and numeric:
        raise RequestRefused(
            f"the Grid strategy searches lists of values only (hidden_channels, tune_batch_size): "
            f"leave {', '.join(numeric)} empty, or choose another strategy"
        )
    for param in numeric:
        name, kind, scaling = RANGES[param]
        low, high = params[param]
        if low > high:
            raise RequestRefused(f"{param} [{low}, {high}]: its low end is above its high end")
        bounds = {"MinValue": str(low), "MaxValue": str(high)}
        ranges[f"{kind}ParameterRanges"].append({"Name": name, **bounds, "ScalingType": scaling})
    tuned = {r["Name"] for kind in ranges.values() for r in kind}
    if not tuned:
        raise RequestRefused(
            "search tune needs something to search: two or more hidden_channels values, "
            "tune_batch_size values, or a tune_lr, tune_dropout or tune_epochs range"
        )
    return {kind: found for kind, found in ranges.items() if found}, tuned


def tuning_config(params: Mapping) -> tuple[dict, dict]:
    """HyperParameterTuningJobConfig, and the static hyperparameters (the form's set values that are not tuned)."""
    ranges, tuned = parameter_ranges(params)
    strategy = params["tune_strategy"]
    static = {key: params[key] for key in SWEEP_HYPERPARAMETERS if params.get(key) is not None and key not in tuned}
    if "hidden_channels" not in tuned:
        static["hidden_channels"] = params["hidden_channels"][0]
    config = {
        "Strategy": strategy,
        "HyperParameterTuningJobObjective": dict(OBJECTIVE),
        "ResourceLimits": {
            "MaxNumberOfTrainingJobs": params["tune_max_jobs"],
            "MaxParallelTrainingJobs": params["tune_max_parallel"],
        },
        "ParameterRanges": ranges,
        # Hyperband stops jobs itself; SageMaker refuses it beside early stopping.
        "TrainingJobEarlyStoppingType": "Auto" if params["tune_early_stopping"] and strategy != "Hyperband" else "Off",
    }
    if strategy == "Hyperband":
        if not (params.get("tune_epochs") or params.get("epochs")):
            raise RequestRefused(
                "the Hyperband strategy needs its resource, the epochs: set tune_epochs [min, max] "
                "(or epochs, the maximum)"
            )
        low, high = params.get("tune_epochs") or (1, params["epochs"])
        static["epochs"] = high  # every job may run to the maximum resource; Hyperband stops the weak ones early
        config["StrategyConfig"] = {"HyperbandStrategyConfig": {"MinResource": low, "MaxResource": high}}
    if params.get("tune_target_accuracy") is not None:
        config["TuningJobCompletionCriteria"] = {"TargetObjectiveMetricValue": 100 * params["tune_target_accuracy"]}
    return config, static


def tuning_request(params: Mapping, *, config: PipelineConfig, dag_id: str, run_id: str, dataset_uri: str) -> dict:
    """The CreateHyperParameterTuningJob request of a `tune` run."""
    tuning, static = tuning_config(params)
    check_resources(params, config, jobs_at_once=params["tune_max_parallel"])
    name = tuning_job_name(run_id)
    job = build_training_job_request(
        job_name=name,
        hyperparameters=static,
        training_data_uri=dataset_uri,
        sourcedir_uri=upload_sourcedir(config),
        output_uri=f"{config.s3_root}/training-jobs",
        role_arn=config.role_arn,
        region=config.region,
        instance_type=str(params["instance_type"]),
        instance_count=int(params["instance_count"]),
        experiment_name="",
        trial_name="",
        tags={},
        kms_key_id=config.kms_key_id,
        subnets=config.vpc_subnets,
        security_group_ids=config.vpc_security_groups,
    )
    definition = {key: job[key] for key in DEFINITION_KEYS if key in job}
    definition["AlgorithmSpecification"] = {
        key: value for key, value in job["AlgorithmSpecification"].items() if key != "EnableSageMakerMetricsTimeSeries"
    }
    definition["StaticHyperParameters"] = job["HyperParameters"]
    # Seeded by the run: a retry searches the same way.
    seed = int.from_bytes(hashlib.sha1(run_id.encode()).digest()[:3], "big")
    tags = {"project": "mnist-pipeline", "dag_id": dag_id, "run_id": run_id}
    return {
        "HyperParameterTuningJobName": name,
        "HyperParameterTuningJobConfig": {**tuning, "RandomSeed": seed},
        "TrainingJobDefinition": definition,
        "Tags": [{"Key": key, "Value": value} for key, value in tags.items()],
    }


def tuner_jobs(description: Mapping, config: PipelineConfig) -> list[dict]:
    """Every training job the tuning job started (HyperParameterTrainingJobSummary), in the order they started."""
    paginator = sagemaker_hook(config).conn.get_paginator("list_training_jobs_for_hyper_parameter_tuning_job")
    name = description["HyperParameterTuningJobName"]
    jobs = [
        job for page in paginator.paginate(HyperParameterTuningJobName=name) for job in page["TrainingJobSummaries"]
    ]
    return sorted(jobs, key=lambda job: job["CreationTime"])


def stopped_early(job: Mapping) -> bool:
    """A tuner's job that it stopped itself (early stopping or Hyperband): Stopped, yet with an objective."""
    return job["TrainingJobStatus"] == "Stopped" and "FinalHyperParameterTuningJobObjectiveMetric" in job
