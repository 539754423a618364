"""Where a command's CPU time goes, by kind of process: sampled from outside, the whole machine's processes of this
user, every ``interval`` seconds in a thread.

Each process is read each time (its user and system seconds), and counted at the last reading: a process that
exits between two readings loses at most ``interval`` seconds of one core. Processes are told apart by their
command line. Airflow's task processes are forked from its components and keep their command line, so they are
counted with them.
"""

from __future__ import annotations

import os
import threading

import psutil

# The first match names the kind: a training job's script, Airflow (its components and the task processes they
# fork), the local services, the endpoints' model servers.
KINDS = (
    ("training jobs", ("train.py",)),
    ("airflow components", ("airflow",)),
    ("local sagemaker", ("local_sagemaker",)),
    ("local aws", ("local_aws", "moto")),
    ("model servers", ("inference", "serve")),
)


def kind_of(command: str) -> str:
    for kind, words in KINDS:
        if any(word in command for word in words):
            return kind
    return "other"


class CpuSampler:
    """``with CpuSampler() as cpu: ...``; then ``cpu.seconds()``: CPU seconds by kind over the block, the processes
    that ran before it counted from their reading at its start."""

    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self.user = psutil.Process().username()
        self.baseline: dict[int, float] = {}
        self.latest: dict[int, tuple[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _read(self) -> dict[int, tuple[str, float]]:
        found = {}
        for process in psutil.process_iter(["pid", "username", "cmdline", "cpu_times"]):
            info = process.info
            if info["username"] != self.user or info["pid"] == os.getpid() or info["cpu_times"] is None:
                continue
            command = " ".join(info["cmdline"] or [])
            found[info["pid"]] = (kind_of(command), info["cpu_times"].user + info["cpu_times"].system)
        return found

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for pid, (kind, seconds) in self._read().items():
                # A process keeps the first kind it is known by (read just as it starts, it may show no command line).
                first = self.latest.get(pid, (kind, 0.0))[0]
                self.latest[pid] = (first if first != "other" else kind, seconds)

    def __enter__(self) -> CpuSampler:
        self.baseline = {pid: seconds for pid, (_, seconds) in self._read().items()}
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def seconds(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        for pid, (kind, seconds) in self.latest.items():
            used = seconds - self.baseline.get(pid, 0.0)
            totals[kind] = round(totals.get(kind, 0.0) + max(used, 0.0), 1)
        return dict(sorted(totals.items(), key=lambda item: -item[1]))
