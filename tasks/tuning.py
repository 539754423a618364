"""The CreateHyperParameterTuningJob request of a `tune` run, and the tuner's trials as the selection reads them.

The tuner's training jobs are the sweep's, searched instead of listed: the TrainingJobDefinition is the request
`tasks.training_jobs.build_training_job_request` builds for one sweep job, its hyperparameters made static and the
ranges of the trigger form searched. The objective is the training log's `test:accuracy` (percent), maximized.
The provider's SageMakerTuningOperator sends the request as is, to AWS or to the local SageMaker service.

Imported by the DAG at parse time: light, the provider's operator aside.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping

from airflow.providers.amazon.aws.operators.sagemaker import SageMakerTuningOperator, serialize

from tasks.config import PipelineConfig
from tasks.earlier_jobs import TUNING, data_read, job_to_follow, timestamped
from tasks.hooks import sagemaker_hook, stop_when_killed
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

STRATEGIES = ("Bayesian", "Random", "Grid", "Hyperband")
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


class TuningOperator(SageMakerTuningOperator):
    """SageMakerTuningOperator made safe to kill and to retry:

    - killed (marked failed, timed out), it stops its tuning job, where the provider's leaves it running;
    - a retry follows the tuning job of its request an earlier try started (``tasks.earlier_jobs``, as training and
      transform do), under the request's name or the name suffixed with the time that an earlier retry took: one
      InProgress is followed to its end, one Completed is the result, one Stopping is waited out; only when each
      ended Stopped or Failed is the search started again, under the name suffixed with the time (the provider's
      operator would fail on the name taken). A tuning job of the same name whose training jobs run other code or
      read other data is not this request's;
    - a tuning job that ends Stopped fails the task (the provider's wait passes it on, its jobs half done).
    """

    def execute(self, context):
        name = self.config["HyperParameterTuningJobName"]
        earlier = job_to_follow(self, TUNING, name, self.same_request)
        if earlier is None:
            if self.name_taken(name):
                self.config["HyperParameterTuningJobName"] = timestamped(name, TUNING)
                self.log.info("Tuning as %s: %s is taken", self.config["HyperParameterTuningJobName"], name)
            return self._ended_well(super().execute(context))
        name = self.config["HyperParameterTuningJobName"] = earlier["HyperParameterTuningJobName"]  # for on_kill
        if earlier["HyperParameterTuningJobStatus"] == "InProgress":
            earlier = self.hook.check_status(
                name,
                "HyperParameterTuningJobStatus",
                self.hook.describe_tuning_job,
                self.check_interval,
                self.max_ingestion_time,
            )
        return self._ended_well({"Tuning": serialize(earlier)})

    def same_request(self, job: Mapping) -> bool:
        """Whether ``job`` runs the training jobs of this task's request: the same static hyperparameters (the code's
        content-addressed archive among them) on the same data. Its ranges come from the run's params, and so does its
        name."""

        def trains(request: Mapping) -> tuple:
            definition = request["TrainingJobDefinition"]
            return definition.get("StaticHyperParameters", {}), data_read(definition.get("InputDataConfig", []))

        return trains(job) == trains(self.config)

    def name_taken(self, name: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.hook.describe_tuning_job(name)
        except ClientError as error:
            if error.response["Error"]["Code"] == "ResourceNotFound":
                return False
            raise
        return True

    @staticmethod
    def _ended_well(result: dict) -> dict:
        tuning = result["Tuning"]
        if tuning.get("HyperParameterTuningJobStatus") == "Stopped":
            raise RuntimeError(
                f"SageMaker tuning job {tuning['HyperParameterTuningJobName']} was stopped before it "
                "ended: its trials are not a finished search"
            )
        return result

    def on_kill(self) -> None:
        name = self.config.get("HyperParameterTuningJobName")
        stop_when_killed(
            self,
            "tuning job",
            name,
            lambda: self.hook.conn.stop_hyper_parameter_tuning_job(HyperParameterTuningJobName=name),
        )


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
