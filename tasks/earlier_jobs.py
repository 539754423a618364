"""What a retried SageMaker task finds of the jobs its earlier tries started, for the training, tuning and transform
operators alike.

A try killed before its ``on_kill`` could stop its job (the worker SIGKILLed, its machine gone) leaves that job
running; a try that failed after its job ended (the task's own error, a lost heartbeat) leaves it Completed. A retry
that started another job would run the request twice (on AWS, bill it twice, and for a sweep member hold twice its
cores). So a retry follows the earlier job of its request: one InProgress is waited for, one Completed is the
result, one Stopping is waited out; only when each has ended Failed or Stopped does the retry start another, under
the provider's timestamped name.

The earlier jobs are those under the request's deterministic name or a timestamped variant of it (the provider's
``action_if_job_exists="timestamp"``, and the tuning operator's own), that the caller judges to be of the same
request (a job of the same name made from another model, other code or other data is not).

Imported by the DAGs at parse time: light.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from tasks.names import MAX_NAME_LENGTH

# The provider's name for a job whose name is taken: the name, cut to fit, a dash and ten digits of epoch seconds.
TIMESTAMP_DIGITS = 10
# An earlier job in one of these is this try's: waited for (InProgress) or its result (Completed).
FOLLOWED = ("InProgress", "Completed")


@dataclass(frozen=True)
class JobKind:
    """One kind of SageMaker job, in the API's words: ``<field>Name``, ``<field>Status``, ``<field>Summaries``."""

    noun: str  # in log lines: "training job"
    field: str  # "TrainingJob"
    list_method: str  # the boto3 client's paginated List operation
    describe_method: str  # the provider's SageMakerHook method that describes one job
    max_name: int = MAX_NAME_LENGTH

    def name(self, job: Mapping) -> str:
        return job[f"{self.field}Name"]

    def status(self, job: Mapping) -> str:
        return job[f"{self.field}Status"]


TRAINING = JobKind("training job", "TrainingJob", "list_training_jobs", "describe_training_job")
TRANSFORM = JobKind("transform job", "TransformJob", "list_transform_jobs", "describe_transform_job")
# SageMaker allows a tuning job 32 characters: its training jobs add "-NNN-xxxxxxxx".
TUNING = JobKind("tuning job", "HyperParameterTuningJob", "list_hyper_parameter_tuning_jobs", "describe_tuning_job", 32)


def timestamped(name: str, kind: JobKind, epoch_seconds: int | None = None) -> str:
    """``name`` as the provider renames a job whose name is taken: cut to fit, a dash and ten digits of epoch
    seconds (now, unless given)."""
    digits = str(int(time.time()) if epoch_seconds is None else epoch_seconds)
    return f"{name[: kind.max_name - len(digits) - 1]}-{digits}"


def earlier_jobs(hook, kind: JobKind, name: str, same_request: Callable[[Mapping], bool]) -> list[dict]:
    """The descriptions of the jobs named ``name`` or a timestamped variant of it, newest first, for which
    ``same_request`` holds."""
    stem = name[: kind.max_name - TIMESTAMP_DIGITS - 1]
    variant = re.compile(re.escape(stem) + rf"-\d{{{TIMESTAMP_DIGITS}}}")
    pages = hook.conn.get_paginator(kind.list_method).paginate(
        NameContains=stem, SortBy="CreationTime", SortOrder="Descending"
    )
    names = [
        kind.name(job)
        for page in pages
        for job in page[f"{kind.field}Summaries"]
        if kind.name(job) == name or variant.fullmatch(kind.name(job))
    ]
    describe = getattr(hook, kind.describe_method)
    return [job for job in map(describe, names) if same_request(job)]


def job_to_follow(operator, kind: JobKind, name: str, same_request: Callable[[Mapping], bool]) -> dict | None:
    """The description of the earlier job that ``operator`` (a SageMaker operator: ``hook``, ``check_interval``,
    ``log``) should follow, InProgress or Completed, the newest such; or None when it should start another: none
    was started, or each has ended Failed or Stopped. One Stopping is waited out first: it may hold its instances a
    while yet, and how it ends decides what this try does."""
    while True:
        jobs = earlier_jobs(operator.hook, kind, name, same_request)
        for job in jobs:
            if (status := kind.status(job)) in FOLLOWED:
                operator.log.info(
                    "The %s %s of an earlier try is %s: %s, not starting another",
                    kind.noun,
                    kind.name(job),
                    status,
                    "waiting for it" if status == "InProgress" else "its result stands",
                )
                return job
        stopping = [kind.name(job) for job in jobs if kind.status(job) == "Stopping"]
        if not stopping:
            if jobs:
                ended = ", ".join(f"{kind.name(job)} {kind.status(job)}" for job in jobs)
                operator.log.info("The %ss of earlier tries ended (%s): starting another", kind.noun, ended)
            return None
        operator.log.info("The %s %s of an earlier try is Stopping: waiting it out", kind.noun, stopping[0])
        describe = getattr(operator.hook, kind.describe_method)
        while kind.status(describe(stopping[0])) == "Stopping":
            time.sleep(operator.check_interval)


def data_read(channels: list[Mapping]) -> dict[str, str | None]:
    """The S3 URI each channel of an InputDataConfig reads (None for a channel not in S3), whatever defaults SageMaker
    added to the channels' other fields: what a training job learns from."""
    return {channel["ChannelName"]: channel["DataSource"].get("S3DataSource", {}).get("S3Uri") for channel in channels}
