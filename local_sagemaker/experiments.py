"""SageMaker Experiments as the pipeline uses them: CreateExperiment, DescribeExperiment, CreateTrial,
DescribeTrial, ListTrialComponents, DescribeTrialComponent.

A training job whose ExperimentConfig names a trial gets a trial component, ``<job>-aws-training-job``, as on
SageMaker: its hyperparameters as Parameters, its status, and at the end its final metrics, so a sweep's trials can
be compared with ListTrialComponents / DescribeTrialComponent.
"""

from __future__ import annotations

from local_sagemaker.listing import Listing, cut
from local_sagemaker.protocol import ResourceNotFound, ValidationException, arn
from local_sagemaker.store import Store, now
from local_sagemaker.tags import untagged

EXPERIMENTS, TRIALS, COMPONENTS = "experiments", "trials", "trial-components"
# The resource type in the ARN of each (arn:aws:sagemaker:<region>:<account>:<type>/<name>).
ARN_TYPES = {"Experiment": "experiment", "Trial": "experiment-trial", "Trial Component": "experiment-trial-component"}
# ListTrialComponents names its creation time bounds apart from the other List calls.
CREATED_BOUNDS = {"CreatedAfter": "CreationTimeAfter", "CreatedBefore": "CreationTimeBefore"}
# What ListTrialComponents says of a component (its source as TrialComponentSource).
COMPONENT_KEYS = (
    "TrialComponentName",
    "TrialComponentArn",
    "DisplayName",
    "Status",
    "StartTime",
    "EndTime",
    "CreationTime",
    "LastModifiedTime",
)


def _component_summary(record: dict) -> dict:
    return cut(record, COMPONENT_KEYS) | {"TrialComponentSource": record["Source"]}


COMPONENT_LISTING = Listing(
    "TrialComponentSummaries", "TrialComponentName", summary=_component_summary, default_order="Descending"
)


class Experiments:
    def __init__(self, store: Store, region: str, account: str):
        self.store, self.region, self.account = store, region, account

    def _arn(self, kind: str, name: str) -> str:
        return arn(kind, name, region=self.region, account=self.account)

    def _get(self, kind: str, name: str, what: str) -> dict:
        """The record of ``what`` (Experiment, Trial, Trial Component) ``name``; ResourceNotFound naming the ARN it
        would have, as SageMaker names it."""
        missing = ResourceNotFound(f"{what} '{self._arn(ARN_TYPES[what], name)}' does not exist.")
        return self.store.require(kind, name, missing)

    def _create(self, kind: str, what: str, name: str, request: dict) -> dict:
        """``request`` recorded as a new ``what`` (Experiment, Trial) named ``name``; the answer names its ARN.
        ValidationException if the name is taken."""
        arn_key = f"{what}Arn"
        with self.store.lock:
            if self.store.get(kind, name):
                raise ValidationException(f"{what} {name} already exists.")
            moment = now()
            record = {
                **request,
                arn_key: self._arn(ARN_TYPES[what], name),
                "CreationTime": moment,
                "LastModifiedTime": moment,
            }
            self.store.put(kind, name, record)
        return {arn_key: record[arn_key]}

    def create_experiment(self, request: dict) -> dict:
        return self._create(EXPERIMENTS, "Experiment", request["ExperimentName"], request)

    def describe_experiment(self, name: str) -> dict:
        return untagged(self._get(EXPERIMENTS, name, "Experiment"))

    def create_trial(self, request: dict) -> dict:
        self._get(EXPERIMENTS, request["ExperimentName"], "Experiment")
        return self._create(TRIALS, "Trial", request["TrialName"], request)

    def describe_trial(self, name: str) -> dict:
        return untagged(self._get(TRIALS, name, "Trial"))

    def describe_trial_component(self, name: str) -> dict:
        record = self._get(COMPONENTS, name, "Trial Component")
        record.pop("Trials", None)
        return record

    def list_trial_components(self, params: dict) -> dict:
        records = self.store.items(COMPONENTS)
        if trial := params.get("TrialName"):
            records = [r for r in records if trial in r["Trials"]]
        if experiment := params.get("ExperimentName"):
            trials = {r["TrialName"] for r in self.store.items(TRIALS) if r["ExperimentName"] == experiment}
            records = [r for r in records if trials & set(r["Trials"])]
        if source := params.get("SourceArn"):
            records = [r for r in records if r.get("Source", {}).get("SourceArn") == source]
        return COMPONENT_LISTING.answer(records, {CREATED_BOUNDS.get(key, key): value for key, value in params.items()})

    def record_training_job(self, job: dict) -> None:
        """Create or update the trial component of a training job that names a trial in its ExperimentConfig."""
        trial = (job.get("ExperimentConfig") or {}).get("TrialName")
        if not trial or self.store.get(TRIALS, trial) is None:
            return
        name = f"{job['TrainingJobName']}-aws-training-job"
        status = {
            "InProgress": "InProgress",
            "Stopping": "Stopping",
            "Completed": "Completed",
            "Failed": "Failed",
            "Stopped": "Stopped",
        }[job["TrainingJobStatus"]]
        parameters = {}
        for key, value in job.get("HyperParameters", {}).items():
            try:
                parameters[key] = {"NumberValue": float(value)}
            except ValueError:
                parameters[key] = {"StringValue": value}
        with self.store.lock:
            record = self.store.get(COMPONENTS, name) or {
                "TrialComponentName": name,
                "TrialComponentArn": self._arn(ARN_TYPES["Trial Component"], name),
                "DisplayName": (job.get("ExperimentConfig") or {}).get("TrialComponentDisplayName") or name,
                "Source": {"SourceArn": job["TrainingJobArn"], "SourceType": "SageMakerTrainingJob"},
                "CreationTime": job["CreationTime"],
                "Trials": [trial],
            }
            record.update(
                Status={
                    "PrimaryStatus": status,
                    **({"Message": job["FailureReason"]} if "FailureReason" in job else {}),
                },
                Parameters=parameters,
                LastModifiedTime=job["LastModifiedTime"],
                InputArtifacts={
                    c["ChannelName"]: {"Value": c["DataSource"]["S3DataSource"]["S3Uri"]}
                    for c in job.get("InputDataConfig", [])
                    if "S3DataSource" in c["DataSource"]
                },
            )
            if "TrainingStartTime" in job:
                record["StartTime"] = job["TrainingStartTime"]
            if "TrainingEndTime" in job:
                record["EndTime"] = job["TrainingEndTime"]
            if job["TrainingJobStatus"] == "Completed" and (artifacts := job.get("ModelArtifacts")):
                record["OutputArtifacts"] = {"SageMaker.ModelArtifact": {"Value": artifacts["S3ModelArtifacts"]}}
            if final := job.get("FinalMetricDataList"):
                record["Metrics"] = [
                    {
                        "MetricName": m["MetricName"],
                        "SourceArn": job["TrainingJobArn"],
                        "TimeStamp": m["Timestamp"],
                        "Last": m["Value"],
                        "Max": m["Value"],
                        "Min": m["Value"],
                        "Avg": m["Value"],
                        "Count": 1,
                    }
                    for m in final
                ]
            self.store.put(COMPONENTS, name, record)
