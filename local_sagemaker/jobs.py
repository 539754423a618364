"""How a job that the service runs in a thread of its own (training, transform, tuning) ends early: stopped,
failed with a FailureReason, or with the service itself."""

from __future__ import annotations

import threading
from collections.abc import Iterable


class JobStopped(Exception):
    """The job was stopped (StopTrainingJob, StopTransformJob, the service's own stop, or its time ran out):
    ``secondary`` is the status it ends in, ``reason`` its FailureReason, if it gets one."""

    def __init__(self, secondary: str = "Stopped", reason: str | None = None):
        super().__init__(reason or secondary)
        self.secondary, self.reason = secondary, reason


class JobFailed(Exception):
    """The job failed; the message is its FailureReason."""


def check_stop(stop: threading.Event) -> None:
    """JobStopped once the job's ``stop`` is set: called between its steps, so that a stop ends it at the next."""
    if stop.is_set():
        raise JobStopped()


def stop_all(runs: Iterable, timeout: float) -> None:
    """Stop each running job (anything with a ``stop`` event and its ``thread``), then wait up to ``timeout`` for
    each: every job is told before any is waited for, so that they wind down together."""
    runs = list(runs)
    for run in runs:
        run.stop.set()
    for run in runs:
        if run.thread:
            run.thread.join(timeout=timeout)
