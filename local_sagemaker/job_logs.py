"""How a job's log reaches CloudWatch Logs: one stream per host, ``<job>/<host>-<epoch>`` in the job kind's group,
as the Amazon provider's ``print_log`` reads it, shipped in batches so that a job never waits on Logs."""

from __future__ import annotations

import contextlib
import logging
import time

log = logging.getLogger(__name__)

FLUSH_SECONDS = 1.0
# CloudWatch Logs' bound on the events of one PutLogEvents call.
MAX_BATCH_EVENTS = 5000


class LogStreams:
    """A job's log lines to CloudWatch Logs, one stream per host, in batches: a job's log never waits on Logs.
    ``logs``: a CloudWatch Logs client of the job's role; ``group``: its job kind's log group."""

    def __init__(self, job_name: str, hosts: list[str], logs, group: str):
        epoch = int(time.time())
        self.logs = logs
        self.group = group
        self.streams = {host: f"{job_name}/{host}-{epoch}" for host in hosts}
        self.pending: dict[str, list[dict]] = {host: [] for host in hosts}
        self.last_flush = time.monotonic()
        self.broken = False
        self._create()

    def _create(self) -> None:
        try:
            logs = self.logs
            with contextlib.suppress(logs.exceptions.ResourceAlreadyExistsException):
                logs.create_log_group(logGroupName=self.group)
            for stream in self.streams.values():
                with contextlib.suppress(logs.exceptions.ResourceAlreadyExistsException):
                    logs.create_log_stream(logGroupName=self.group, logStreamName=stream)
        except Exception as error:  # CloudWatch Logs down: the job runs on, with its log on disk
            self._broke(error)

    def _broke(self, error: Exception) -> None:
        if not self.broken:
            log.warning("CloudWatch Logs unreachable, job logs stay on disk only: %s", error)
        self.broken = True

    def add(self, host: str, line: str) -> None:
        self.pending[host].append({"timestamp": int(time.time() * 1000), "message": line})

    def flush(self, force: bool = False) -> None:
        if not force and time.monotonic() - self.last_flush < FLUSH_SECONDS:
            return
        self.last_flush = time.monotonic()
        for host, events in self.pending.items():
            if not events or self.broken:
                events.clear()
                continue
            batch, self.pending[host] = events, []
            try:
                for start in range(0, len(batch), MAX_BATCH_EVENTS):
                    self.logs.put_log_events(
                        logGroupName=self.group,
                        logStreamName=self.streams[host],
                        logEvents=batch[start : start + MAX_BATCH_EVENTS],
                    )
            except Exception as error:
                self._broke(error)
