"""What of the machine a training job gets: its instances, within this service's quota, and its share of the cores.

Each instance of a job is a process of its own here, so the quota bounds how many processes one job starts, as an
AWS account's quota per instance type bounds its instances. The cores are handed out first come, first served.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

from local_sagemaker.protocol import ResourceLimitExceeded, ValidationException

# This service's quota of instances per training job (a tuning job's training jobs count one by one).
MAX_INSTANCES = 8


def check_instance_count(resources: Mapping) -> None:
    """ResourceLimitExceeded past this service's quota, in AWS's words; ValidationException below one instance."""
    count = resources.get("InstanceCount")
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ValidationException(
            f"1 validation error detected: Value {count!r} at 'resourceConfig.instanceCount' failed to satisfy "
            "constraint: Member must have value greater than or equal to 1"
        )
    if count > MAX_INSTANCES:
        raise ResourceLimitExceeded(
            f"The account-level service limit '{resources.get('InstanceType', 'instance')} for training job usage' "
            f"is {MAX_INSTANCES} Instances, with current utilization of 0 Instances and a request delta of {count} "
            "Instances. Please use AWS Service Quotas to request an increase for this quota."
        )


class Cores:
    """The machine's cores, handed to jobs first come, first served. A job joins the queue when it is created and
    takes its share of what is free among the jobs queued with it (a burst of jobs created together gets one core
    each, not all to the first), and at least one core per instance (capped at the machine)."""

    def __init__(self, total: int):
        self.total = total
        self.free = total
        self.waiting: list[str] = []
        self.condition = threading.Condition()

    def join(self, name: str) -> None:
        with self.condition:
            if name not in self.waiting:
                self.waiting.append(name)

    def leave(self, name: str) -> None:
        with self.condition:
            if name in self.waiting:
                self.waiting.remove(name)
                self.condition.notify_all()

    def acquire(self, name: str, minimum: int, stopped: threading.Event) -> int | None:
        """The cores job ``name`` gets once its turn comes; None if ``stopped`` is set while it waits."""
        minimum = min(max(1, minimum), self.total)
        self.join(name)
        with self.condition:
            try:
                while not (self.waiting[0] == name and self.free >= minimum):
                    if stopped.is_set():
                        return None
                    self.condition.wait(0.2)
                share = max(minimum, self.free // len(self.waiting))
                self.free -= share
                return share
            finally:
                self.waiting.remove(name)
                self.condition.notify_all()

    def release(self, count: int) -> None:
        with self.condition:
            self.free += count
            self.condition.notify_all()
