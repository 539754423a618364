"""Hyperparameter tuning jobs, run as SageMaker runs them: CreateHyperParameterTuningJob,
DescribeHyperParameterTuningJob, ListHyperParameterTuningJobs, ListTrainingJobsForHyperParameterTuningJob,
StopHyperParameterTuningJob.

A tuning job is a thread that searches with Optuna through its ask-and-tell interface: it asks for hyperparameters,
starts a training job with them through TrainingJobs.create (an ordinary training job, ``<tuning job>-<NNN>-<8
hex>``, whose DescribeTrainingJob names the tuning job in TuningJobArn; the tuning job's tags are its tags), reports
each match of the objective's MetricDefinitions regex in the job's log to Optuna as it is logged (the n-th match is
epoch n), and tells Optuna how the job ended. Never more than MaxParallelTrainingJobs jobs are in flight.

The search itself (ranges, strategy, sampler and pruner, how many jobs) is local_sagemaker.tuning_plan's. A job
that would run past Hyperband's MaxResource epochs is stopped there, and counts as having run its budget in full; a
job behind the median (TrainingJobEarlyStoppingType Auto) or cut by Hyperband is stopped early.

A job the tuner stops early goes through TrainingJobs.stop, StopTrainingJob's path, so its processes are gone; it
ends Stopped, with the objective it had reached (ObjectiveStatus Succeeded), and cannot be the BestTrainingJob,
which is the best job that completed (or ran its full Hyperband budget) with the objective.

Completion criteria, checked as each job ends: TargetObjectiveMetricValue (a completed job reached it);
BestObjectiveNotImproving (that many evaluated jobs in a row did not improve the best objective by 1%, SageMaker's
margin); ConvergenceDetected with CompleteOnConvergence Enabled (``converged``: the last CONVERGENCE_JOBS completed
jobs all came within 1% of the best, so the search keeps landing where the best is). When one is met, or
MaxRuntimeInSeconds has passed, the tuning job starts no more jobs, stops those still running and completes. It
fails only if no job completed with the objective, naming a failed job's FailureReason.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import math
import queue
import secrets
import threading
import time
from collections.abc import Sequence

import optuna
from optuna.trial import TrialState

from local_sagemaker import processes
from local_sagemaker.jobs import stop_all
from local_sagemaker.listing import Listing, cut
from local_sagemaker.protocol import ResourceInUse, ResourceNotFound, ValidationException, arn, failure_reason
from local_sagemaker.store import Store, now
from local_sagemaker.training import KIND as TRAINING_JOBS
from local_sagemaker.training import REQUEST_KEYS, TERMINAL, TrainingJobs
from local_sagemaker.tuning_plan import Plan, epochs_of, plan

log = logging.getLogger(__name__)
optuna.logging.set_verbosity(optuna.logging.WARNING)  # Optuna logs each trial at INFO; the tuner logs its own

KIND = "hyper-parameter-tuning-jobs"
# CreateHyperParameterTuningJob's answer for a name in use, in SageMaker's words.
NAME_TAKEN = (
    "Hyperparameter tuning job names must be unique within an AWS account and region, and "
    "a tuning job with this name already exists ({arn})"
)
POLL_SECONDS = 0.2  # how soon the tuner notices a job that ended (observations wake it at once)
IMPROVEMENT = 0.01  # SageMaker's "1% or greater" for BestObjectiveNotImproving and convergence
CONVERGENCE_JOBS = 3
# What a training job takes of TrainingJobDefinition: what a CreateTrainingJob request keeps, but for its name, its
# hyperparameters (the static ones plus the tuned ones) and what a definition has no member for.
_NOT_DEFINED = ("TrainingJobName", "HyperParameters", "ExperimentConfig", "DebugHookConfig", "TensorBoardOutputConfig")
DEFINITION_KEYS = tuple(key for key in REQUEST_KEYS if key not in _NOT_DEFINED)
# What ListHyperParameterTuningJobs says of a tuning job, besides its counters, strategy and limits.
SUMMARY_KEYS = (
    "HyperParameterTuningJobName",
    "HyperParameterTuningJobArn",
    "HyperParameterTuningJobStatus",
    "CreationTime",
    "HyperParameterTuningEndTime",
    "LastModifiedTime",
)
LISTING = Listing(
    "HyperParameterTuningJobSummaries",
    "HyperParameterTuningJobName",
    "HyperParameterTuningJobStatus",
    default_sort="Name",
)
# ListTrainingJobsForHyperParameterTuningJob: the summaries carry their objective as _objective, to sort by.
JOB_LISTING = Listing(
    "TrainingJobSummaries",
    "TrainingJobName",
    "TrainingJobStatus",
    summary=lambda s: {k: v for k, v in s.items() if k != "_objective"},
    sort_by={"FinalObjectiveMetricValue": "_objective"},
    default_sort="Name",
)
# Record keys kept for the service's own use, never answered.
INTERNAL = ("Tags", "Jobs")


# -- completion criteria (pure, over the evaluated jobs in the order they ended: (objective, final)) ---------------


def _gain(value: float, best: float, maximize: bool) -> float:
    return value - best if maximize else best - value


def not_improving(outcomes: Sequence[tuple[float, bool]], maximize: bool) -> int:
    """Evaluated jobs since the best objective last improved by 1% or more (NumberOfTrainingJobsObjectiveNotImproving).
    Only a final objective (a completed job's) can improve it; a job stopped early never does."""
    best, count = None, 0
    for value, final in outcomes:
        gain = _gain(value, best, maximize) if final and best is not None else None
        first = final and best is None
        count = 0 if first or (gain is not None and gain > 0 and gain >= IMPROVEMENT * abs(best)) else count + 1
        if first or (gain is not None and gain > 0):
            best = value  # better, if by less than 1%: the bar for the next improvement
    return count


def converged(outcomes: Sequence[tuple[float, bool]], maximize: bool) -> bool:
    """The last CONVERGENCE_JOBS final objectives all lie within 1% of the best: the search keeps landing there."""
    finals = [value for value, final in outcomes if final]
    if len(finals) < CONVERGENCE_JOBS:
        return False
    best = max(finals) if maximize else min(finals)
    return all(_gain(best, value, maximize) <= IMPROVEMENT * abs(best) for value in finals[-CONVERGENCE_JOBS:])


def reached(outcomes: Sequence[tuple[float, bool]], maximize: bool, target: float) -> bool:
    """A final objective at least as good as ``target`` (TargetObjectiveMetricValue)."""
    return any(final and _gain(value, target, maximize) >= 0 for value, final in outcomes)


# -- running a tuning job --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Job:
    """A training job in flight, as its tuning job follows it."""

    trial: optuna.trial.Trial
    tuned: dict[str, str]
    values: list[float] = dataclasses.field(default_factory=list)  # the objective at each epoch Optuna was told of
    told: bool = False  # Optuna has its outcome already (stopped early, or at MaxResource)
    stopped_by: str | None = None  # "early" or "budget": the tuner stopped it


@dataclasses.dataclass
class _Tuner:
    """What the service holds of a tuning job while its thread runs it."""

    stop: threading.Event = dataclasses.field(default_factory=threading.Event)
    observations: queue.Queue = dataclasses.field(default_factory=queue.Queue)  # (job, metric, value) as logged
    thread: threading.Thread | None = None

    def observe(self, job: str, metric: str, value: float) -> None:
        self.observations.put((job, metric, value))


class _Search:
    """One tuning job's search while it runs: the study, the jobs in flight, the evaluated ones in end order."""

    def __init__(self, plan: Plan, name: str):
        self.plan = plan
        self.study = plan.study(name)
        self.jobs: dict[str, _Job] = {}
        self.outcomes: list[tuple[float, bool]] = []
        self.launched = 0
        self.complete: str | None = None  # the completion criterion met


class TuningJobs:
    def __init__(self, store: Store, training: TrainingJobs, region: str, account: str):
        self.store, self.training = store, training
        self.region, self.account = region, account
        self.tuners: dict[str, _Tuner] = {}
        self._recover()

    def arn(self, name: str) -> str:
        return arn("hyper-parameter-tuning-job", name, region=self.region, account=self.account)

    def _recover(self) -> None:
        """A tuning job that was running when the service stopped cannot go on: its jobs went with the service."""
        for record in self.store.items(KIND):
            if record["HyperParameterTuningJobStatus"] in ("InProgress", "Stopping"):
                moment = now()
                self.store.update(
                    KIND,
                    record["HyperParameterTuningJobName"],
                    HyperParameterTuningJobStatus="Failed",
                    FailureReason="InternalServerError: the local SageMaker service stopped while the tuning job ran",
                    HyperParameterTuningEndTime=moment,
                    LastModifiedTime=moment,
                    Jobs=_settled(record["Jobs"]),
                )

    # -- the API ---------------------------------------------------------------------------------------------------

    def create(self, request: dict) -> dict:
        name = request["HyperParameterTuningJobName"]
        plan(request)  # refused here, before anything starts
        self.training.roles.check(request["TrainingJobDefinition"]["RoleArn"], self.arn(name))
        created = now()
        record = {
            "HyperParameterTuningJobName": name,
            "HyperParameterTuningJobArn": self.arn(name),
            "HyperParameterTuningJobConfig": request["HyperParameterTuningJobConfig"],
            "TrainingJobDefinition": request["TrainingJobDefinition"],
            "HyperParameterTuningJobStatus": "InProgress",
            "CreationTime": created,
            "LastModifiedTime": created,
            "TuningJobCompletionDetails": {"NumberOfTrainingJobsObjectiveNotImproving": 0},
            "Tags": request.get("Tags", []),
            "Jobs": {},  # training job name → its tuned hyperparameters and objective
        }
        self.store.put_new(KIND, name, record, ResourceInUse(NAME_TAKEN.format(arn=self.arn(name))))
        tuner = self.tuners[name] = _Tuner()
        tuner.thread = threading.Thread(target=self._run, args=(name,), name=f"tuning-job-{name}", daemon=True)
        tuner.thread.start()
        return {"HyperParameterTuningJobArn": record["HyperParameterTuningJobArn"]}

    def _get(self, name: str) -> dict:
        return self.store.require(
            KIND, name, ResourceNotFound(f"Amazon SageMaker can't find a tuning job with name {name}")
        )

    def describe(self, name: str) -> dict:
        record = self._get(name)
        jobs = self._jobs(record)
        described = {key: value for key, value in record.items() if key not in INTERNAL} | _counters(jobs)
        if best := _best(record, jobs):
            described["BestTrainingJob"] = best
        runtime = (record.get("HyperParameterTuningEndTime") or now()) - record["CreationTime"]
        described["ConsumedResources"] = {"RuntimeInSeconds": int(runtime.total_seconds())}
        return described

    def list(self, params: dict) -> dict:
        def summary(r: dict) -> dict:
            config = r["HyperParameterTuningJobConfig"]
            strategy = {"Strategy": config["Strategy"], "ResourceLimits": config["ResourceLimits"]}
            return cut(r, SUMMARY_KEYS) | _counters(self._jobs(r)) | strategy

        return dataclasses.replace(LISTING, summary=summary).answer(self.store.items(KIND), params)

    def list_training_jobs(self, params: dict) -> dict:
        """ListTrainingJobsForHyperParameterTuningJob: sorted by FinalObjectiveMetricValue, the jobs without one are
        left out, as SageMaker leaves them."""
        record = self._get(params["HyperParameterTuningJobName"])
        summaries = [{**summary, "_objective": entry.get("Objective")} for summary, entry in self._jobs(record)]
        if params.get("SortBy") == "FinalObjectiveMetricValue":
            summaries = [s for s in summaries if s["_objective"] is not None]
        return JOB_LISTING.answer(summaries, params)

    def stop(self, name: str) -> dict:
        with self.store.lock:
            record = self._get(name)
            status = record["HyperParameterTuningJobStatus"]
            if status != "InProgress":
                raise ValidationException(
                    f"The request was rejected because the hyperparameter tuning job is in status {status}."
                )
            self.store.update(KIND, name, HyperParameterTuningJobStatus="Stopping", LastModifiedTime=now())
        if tuner := self.tuners.get(name):
            tuner.stop.set()
        return {}

    def shutdown(self) -> None:
        """Stop every running tuning job and its training jobs (the service is going away)."""
        stop_all(self.tuners.values(), timeout=processes.JOB_STOP_GRACE_SECONDS + 10)

    def _jobs(self, record: dict) -> list[tuple[dict, dict]]:
        """(HyperParameterTrainingJobSummary, the tuner's entry) of each job the tuning job started, oldest first."""
        found = []
        for name, entry in record["Jobs"].items():
            if job := self.store.get(TRAINING_JOBS, name):  # none: the service stopped before it was created
                found.append((_summary(record, job, entry), entry))
        return sorted(found, key=lambda pair: pair[0]["CreationTime"])

    # -- the tuning job's thread -----------------------------------------------------------------------------------

    def _run(self, name: str) -> None:
        tuner = self.tuners[name]
        record = self.store.get(KIND, name)
        search = None
        try:
            search = _Search(plan(record), name)
            max_runtime = record["HyperParameterTuningJobConfig"]["ResourceLimits"].get("MaxRuntimeInSeconds")
            deadline = time.monotonic() + max_runtime if max_runtime else math.inf
            while not (tuner.stop.is_set() or search.complete or time.monotonic() > deadline):
                while len(search.jobs) < search.plan.parallel and search.launched < search.plan.jobs:
                    self._launch(record, search, tuner)
                if not search.jobs:
                    break
                self._follow(name, search, tuner)
            if search.complete:
                log.info("Tuning job %s: %s: no more jobs", name, search.complete)
            for job_name in list(search.jobs):  # a criterion met, MaxRuntimeInSeconds passed, or stopped
                self._stop_job(job_name)
            while search.jobs:
                self._follow(name, search, tuner)
            self._finish(name, tuner)
        except Exception as error:  # a bug: the tuning job fails, saying what happened, and leaves nothing running
            log.exception("Tuning job %s failed", name)
            for job_name in list(search.jobs if search else ()):
                self._stop_job(job_name)
            self._finish(name, tuner, f"InternalServerError: {type(error).__name__}: {error}")
        finally:
            self.tuners.pop(name, None)

    def _launch(self, record: dict, search: _Search, tuner: _Tuner) -> None:
        name = record["HyperParameterTuningJobName"]
        search.launched += 1
        trial = search.study.ask({r.name: r.distribution for r in search.plan.space})
        tuned = {r.name: r.value(trial.params[r.name]) for r in search.plan.space}
        job_name = f"{name}-{search.launched:03d}-{secrets.token_hex(4)}"
        definition = record["TrainingJobDefinition"]
        request = {
            **{key: definition[key] for key in DEFINITION_KEYS if key in definition},
            "TrainingJobName": job_name,
            "HyperParameters": {**definition.get("StaticHyperParameters", {}), **tuned},
            "Tags": record["Tags"],
        }
        self._record_job(name, job_name, {"TunedHyperParameters": tuned, "ObjectiveStatus": "Pending"})
        try:
            self.training.create(request, tuning_job_arn=record["HyperParameterTuningJobArn"], on_metric=tuner.observe)
        except Exception:
            self._record_job(name, job_name, None)
            search.study.tell(trial, state=TrialState.FAIL)
            raise
        search.jobs[job_name] = _Job(trial, tuned)
        log.info("Tuning job %s: started %s with %s", name, job_name, tuned)

    def _follow(self, name: str, search: _Search, tuner: _Tuner) -> None:
        """Wait a moment for observations, then take in what the jobs logged and how those that ended did."""
        observed = []
        with contextlib.suppress(queue.Empty):
            observed.append(tuner.observations.get(timeout=POLL_SECONDS))
        # Which jobs ended, read before the queue is drained: each queued its observations before it ended.
        ended = {}
        for job_name in search.jobs:
            job = self.store.get(TRAINING_JOBS, job_name)
            if job["TrainingJobStatus"] in TERMINAL:
                ended[job_name] = job
        with contextlib.suppress(queue.Empty):
            while True:
                observed.append(tuner.observations.get_nowait())
        for job_name, metric, value in observed:
            if metric == search.plan.metric and job_name in search.jobs:
                self._observe(name, search, job_name, value)
        for job_name, job in ended.items():
            self._ended(name, search, job_name, job)

    def _observe(self, name: str, search: _Search, job_name: str, value: float) -> None:
        job, planned = search.jobs[job_name], search.plan
        if job.told:
            return  # being stopped: its objective is taken
        job.values.append(value)
        epoch = len(job.values)
        job.trial.report(value, epoch)
        if planned.max_resource and epoch >= planned.max_resource:
            if planned.stop_at_max:  # its budget in full: it ends here, as SageMaker's Hyperband ends it
                search.study.tell(job.trial, value)
                job.told, job.stopped_by = True, "budget"
                log.info("Tuning job %s: stopping %s at MaxResource (%d epochs)", name, job_name, epoch)
                self._stop_job(job_name)
            return  # never pruned at its last epoch
        if epoch >= (epochs_of(job.tuned.get("epochs")) or planned.epochs or math.inf):
            return  # its last epoch: its work is done, and stopping it now would only throw its model away
        if planned.prunes and job.trial.should_prune():
            search.study.tell(job.trial, state=TrialState.PRUNED)
            job.told, job.stopped_by = True, "early"
            why = "Hyperband" if planned.strategy == "Hyperband" else "behind the median of the completed jobs"
            log.info(
                "Tuning job %s: stopping %s early at epoch %d (%s %s: %s)",
                name,
                job_name,
                epoch,
                planned.metric,
                value,
                why,
            )
            self._stop_job(job_name)

    def _ended(self, name: str, search: _Search, job_name: str, job_record: dict) -> None:
        job = search.jobs.pop(job_name)
        status = job_record["TrainingJobStatus"]
        objective = job.values[-1] if job.values else None
        by_tuner = job.stopped_by is not None and status == "Stopped"
        final = (status == "Completed" and objective is not None) or (by_tuner and job.stopped_by == "budget")
        if not job.told:
            if final:
                search.study.tell(job.trial, objective)
            else:
                search.study.tell(job.trial, state=TrialState.FAIL)
        entry = {"TunedHyperParameters": job.tuned, "ObjectiveStatus": "Succeeded" if final or by_tuner else "Failed"}
        if final or by_tuner:
            entry.update(Objective=objective, Final=final)
            search.outcomes.append((objective, final))
        with self.store.lock:
            record = self.store.get(KIND, name)
            details, search.complete = _completion(record, search)
            self._record_job(name, job_name, entry, TuningJobCompletionDetails=details)

    def _record_job(self, name: str, job_name: str, entry: dict | None, **fields) -> None:
        """Set (None: drop) the tuner's entry for one of its jobs, and other fields of the tuning job's record."""
        with self.store.lock:
            jobs = self.store.get(KIND, name)["Jobs"]
            if entry is None:
                jobs.pop(job_name, None)
            else:
                jobs[job_name] = entry
            self.store.update(KIND, name, Jobs=jobs, **fields)

    def _stop_job(self, job_name: str) -> None:
        with contextlib.suppress(ValidationException):  # it ended, or is stopping, already
            self.training.stop(job_name)

    def _finish(self, name: str, tuner: _Tuner, error: str | None = None) -> None:
        with self.store.lock:
            record = self.store.get(KIND, name)
            jobs = self._jobs(record)
            fields = {}
            if error:
                status, fields["FailureReason"] = "Failed", failure_reason(error)
            elif tuner.stop.is_set():
                status = "Stopped"
            elif any(entry.get("Final") for _, entry in jobs):
                status = "Completed"
            else:
                status, fields["FailureReason"] = "Failed", failure_reason(_none_completed(record, jobs))
            moment = now()
            self.store.update(
                KIND,
                name,
                HyperParameterTuningJobStatus=status,
                HyperParameterTuningEndTime=moment,
                LastModifiedTime=moment,
                Jobs=_settled(record["Jobs"]),
                **fields,
            )
        log.info(
            "Tuning job %s: %s%s", name, status, f" ({fields['FailureReason']})" if "FailureReason" in fields else ""
        )


# -- answers -------------------------------------------------------------------------------------------------------


def _summary(record: dict, job: dict, entry: dict) -> dict:
    """HyperParameterTrainingJobSummary of ``job`` (a training job record) in tuning job ``record``."""
    summary = {
        "TrainingJobDefinitionName": record["TrainingJobDefinition"].get("DefinitionName"),
        "TrainingJobName": job["TrainingJobName"],
        "TrainingJobArn": job["TrainingJobArn"],
        "TuningJobName": record["HyperParameterTuningJobName"],
        "CreationTime": job["CreationTime"],
        "TrainingStartTime": job.get("TrainingStartTime"),
        "TrainingEndTime": job.get("TrainingEndTime"),
        "TrainingJobStatus": job["TrainingJobStatus"],
        "TunedHyperParameters": entry["TunedHyperParameters"],
        "FailureReason": job.get("FailureReason"),
        "ObjectiveStatus": entry["ObjectiveStatus"],
    }
    if "Objective" in entry:
        objective = record["HyperParameterTuningJobConfig"]["HyperParameterTuningJobObjective"]
        summary["FinalHyperParameterTuningJobObjectiveMetric"] = {**objective, "Value": entry["Objective"]}
    return {key: value for key, value in summary.items() if value is not None}


def _counters(jobs: list[tuple[dict, dict]]) -> dict:
    statuses = collections.Counter(summary["TrainingJobStatus"] for summary, _ in jobs)
    objectives = collections.Counter(entry["ObjectiveStatus"] for _, entry in jobs)
    return {
        "TrainingJobStatusCounters": {
            "Completed": statuses["Completed"],
            "InProgress": statuses["InProgress"] + statuses["Stopping"],
            "RetryableError": 0,
            "NonRetryableError": statuses["Failed"],
            "Stopped": statuses["Stopped"],
        },
        "ObjectiveStatusCounters": {key: objectives[key] for key in ("Succeeded", "Pending", "Failed")},
    }


def _best(record: dict, jobs: list[tuple[dict, dict]]) -> dict | None:
    """The summary of the job with the best final objective (the first of equals), if any has one."""
    finals = [(summary, entry["Objective"]) for summary, entry in jobs if entry.get("Final")]
    if not finals:
        return None
    maximize = record["HyperParameterTuningJobConfig"]["HyperParameterTuningJobObjective"]["Type"] == "Maximize"
    return (max if maximize else min)(finals, key=lambda pair: pair[1])[0]


def _completion(record: dict, search: _Search) -> tuple[dict, str | None]:
    """TuningJobCompletionDetails after the jobs that ended so far, and the completion criterion met, if one is."""
    criteria = record["HyperParameterTuningJobConfig"].get("TuningJobCompletionCriteria", {})
    outcomes, maximize = search.outcomes, search.plan.maximize
    count = not_improving(outcomes, maximize)
    details = {"NumberOfTrainingJobsObjectiveNotImproving": count}
    if detected := record["TuningJobCompletionDetails"].get("ConvergenceDetectedTime"):
        details["ConvergenceDetectedTime"] = detected
    elif converged(outcomes, maximize):
        details["ConvergenceDetectedTime"] = now()
    target = criteria.get("TargetObjectiveMetricValue")
    limit = criteria.get("BestObjectiveNotImproving", {}).get("MaxNumberOfTrainingJobsNotImproving")
    if target is not None and reached(outcomes, maximize, target):
        return details, f"TargetObjectiveMetricValue {target} reached"
    if limit and count >= limit:
        return details, f"{count} jobs did not improve the best objective (MaxNumberOfTrainingJobsNotImproving)"
    if criteria.get("ConvergenceDetected", {}).get("CompleteOnConvergence") == "Enabled" and (
        "ConvergenceDetectedTime" in details
    ):
        return details, "converged (ConvergenceDetected)"
    return details, None


def _settled(entries: dict) -> dict:
    """The tuner's job entries once it ends: an objective still pending will never be evaluated."""
    return {
        name: entry if entry["ObjectiveStatus"] != "Pending" else {**entry, "ObjectiveStatus": "Failed"}
        for name, entry in entries.items()
    }


def _none_completed(record: dict, jobs: list[tuple[dict, dict]]) -> str:
    metric = record["HyperParameterTuningJobConfig"]["HyperParameterTuningJobObjective"]["MetricName"]
    failed = next((summary for summary, _ in jobs if summary["TrainingJobStatus"] == "Failed"), None)
    if failed:
        return f"No training job completed: {failed['TrainingJobName']} failed: {failed.get('FailureReason', '')}"
    return f"No training job completed with the objective metric {metric}"
