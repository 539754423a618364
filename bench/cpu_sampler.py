"""Where a command's CPU time goes, by kind of process: sampled from outside, the whole machine's processes of this
user, every ``interval`` seconds in a thread.

Each process is read each time (its user and system seconds), and counted at the last reading: a process that
exits between two readings loses at most ``interval`` seconds of one core. Processes are told apart by their
command line, which Airflow sets to a title of its own (setproctitle): a LocalExecutor worker reads
"airflow worker -- LocalExecutor: <idle>" and, while it supervises a task, "airflow supervisor: <task>"; the task's
own process, forked from it, "airflow worker -- <task instance id>". The components keep the command that started
them, and so do the DAG processor's children, each a parse of one file.
"""

from __future__ import annotations

import os
import threading

import psutil

# The first match names the kind: a training job's script, Airflow's task processes, the executor's workers that
# supervise them, each of Airflow's components, the local services, the endpoints' model servers.
KINDS = (
    ("training jobs", ("train.py",)),
    ("airflow task supervisors", ("airflow supervisor:", "airflow worker -- LocalExecutor")),
    ("airflow task processes", ("airflow worker -- ",)),
    ("airflow scheduler", ("airflow scheduler",)),
    ("airflow dag processor", ("airflow dag-processor",)),
    ("airflow api server", ("airflow api-server", "airflow api_server")),
    ("airflow triggerer", ("airflow triggerer",)),
    ("airflow, other", ("airflow",)),
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
        self.commands: dict[int, str] = {}
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
            if command:  # a process that has exited and awaits its parent (a zombie) shows none
                self.commands[info["pid"]] = command
        return found

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for pid, (kind, seconds) in self._read().items():
                # A process is counted as the last kind it was known by: a forked process shows its parent's
                # command line until it sets its own title, and read just as it starts it may show none at all.
                known = self.latest.get(pid, (kind, 0.0))[0]
                self.latest[pid] = (known if kind == "other" else kind, seconds)

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

    def by_process(self, kind: str) -> list[tuple[str, float]]:
        """The command line and CPU seconds over the block of each process of ``kind``."""
        return [
            (self.commands.get(pid, ""), round(max(seconds - self.baseline.get(pid, 0.0), 0.0), 1))
            for pid, (known, seconds) in self.latest.items()
            if known == kind
        ]
