"""Starting, watching and stopping processes: the one place that does it, for the service and the local stack.

A process is known by a record, ``{"pid", "started", "log"}``: the start time tells it apart from a later process
that reuses its pid, so a record read back after a restart never names a stranger. Every process runs in a session
of its own (its own process group), so stopping it stops whatever it started, and it outlives the process that
started it until it is stopped.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path

import psutil

# SIGTERM, then this long before SIGKILL: each kind of process gets what it needs to end cleanly, and stop()
# returns as soon as everything has ended, so a grace costs time only when a process hangs.
# Airflow's components (the default): time to drain and to shut down cleanly.
AIRFLOW_STOP_GRACE_SECONDS = 20.0
# The local AWS and the local SageMaker service: each stops its own children first (the IAM evaluator; the training
# jobs and model servers, with their graces below).
SERVICE_STOP_GRACE_SECONDS = 60.0
# A training job's processes: time to save their state, as a job does on SageMaker's SIGTERM (SageMaker gives 120 s).
JOB_STOP_GRACE_SECONDS = 10.0
# A model server that may have served: time to finish the requests in flight and publish its last metrics.
MODEL_SERVER_STOP_GRACE_SECONDS = 10.0
# A process with nothing to finish: it never became ready, or no route leads to it any more and it publishes
# nothing (a transform job's model servers, a fleet that never took over, strays of a killed service).
IDLE_STOP_GRACE_SECONDS = 5.0
# The environment every child may see from ours: what runs Python and its math libraries, never credentials,
# Airflow's secrets or connections. Each caller adds what its child needs on top.
INHERITED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "LD_LIBRARY_PATH", "VIRTUAL_ENV")
INHERITED_PREFIXES = ("OPENBLAS_", "MKL_", "KMP_", "CUDA_", "NVIDIA_")


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on ``host`` now (the OS picks it), for a server about to be started."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def allowed_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """An allow-listed environment: ``INHERITED_ENV`` and the math libraries' settings, then ``extra``."""
    env = {
        key: value for key, value in os.environ.items() if key in INHERITED_ENV or key.startswith(INHERITED_PREFIXES)
    }
    env.update(extra or {})
    return env


def spawn(
    command: list[str],
    *,
    env: Mapping[str, str],
    log_path: Path | None = None,
    cwd: Path | None = None,
    stdout=None,
) -> tuple[subprocess.Popen, dict]:
    """Start ``command`` in a session of its own; returns the process and its record.

    Output goes to ``log_path`` (appended) or to ``stdout`` (e.g. ``subprocess.PIPE``), else nowhere.
    """
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        output = open(log_path, "ab")  # noqa: SIM115 - the child holds it; ours closes below
    else:
        output = stdout if stdout is not None else subprocess.DEVNULL
    try:
        process = subprocess.Popen(
            command,
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            text=stdout is not None,
            errors="replace" if stdout is not None else None,
        )
    finally:
        if log_path is not None:
            output.close()
    return process, record_of(process.pid, log_path)


def record_of(pid: int, log_path: Path | None = None) -> dict:
    return {"pid": pid, "started": psutil.Process(pid).create_time(), "log": str(log_path) if log_path else None}


def live(record: Mapping | None) -> psutil.Process | None:
    """The process a record names, or None once it has exited (or its pid now belongs to another process)."""
    if not record:
        return None
    try:
        process = psutil.Process(record["pid"])
        if process.create_time() != record["started"] or process.status() == psutil.STATUS_ZOMBIE:
            return None
        return process
    except psutil.NoSuchProcess:
        return None


def running_with(module: str, directory: Path) -> list[dict]:
    """Records of the ``python -m <module>`` processes with an argument under ``directory``: the processes a state
    directory's records may have lost (a crash between a spawn and the record of it)."""
    prefix = str(Path(directory).resolve()) + os.sep
    found = []
    for process in psutil.process_iter(["pid", "cmdline", "create_time"]):
        cmdline = process.info["cmdline"] or []
        if module in cmdline[1:3] and any(arg.startswith(prefix) for arg in cmdline):
            found.append({"pid": process.info["pid"], "started": process.info["create_time"], "log": None})
    return found


def running_in(directory: Path, executable: str) -> list[dict]:
    """Records of the processes of ``executable`` (their first argument) working in ``directory`` or below it, each
    with its ``cwd``: a training job's hosts, which run in the job's code directory (as SageMaker's run in
    /opt/ml/code), for a state directory whose records may have lost them."""
    prefix = str(Path(directory).resolve()) + os.sep
    found = []
    for process in psutil.process_iter(["pid", "cwd", "cmdline", "create_time"]):
        cwd, cmdline = process.info["cwd"] or "", process.info["cmdline"] or []
        if cwd.startswith(prefix) and cmdline[:1] == [executable]:
            found.append({"pid": process.info["pid"], "started": process.info["create_time"], "log": None, "cwd": cwd})
    return found


def _descendants(process: psutil.Process) -> list[psutil.Process]:
    try:
        return process.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _orphans(record: Mapping) -> list[psutil.Process]:
    """What outlived a dead group leader in its group (a SIGKILLed scheduler's executor workers): the processes whose
    group id is still the leader's pid (the leader may be gone, or a zombie not yet reaped). Nothing when that pid now
    belongs to another process."""
    with contextlib.suppress(psutil.NoSuchProcess):
        if psutil.Process(record["pid"]).create_time() != record["started"]:
            return []  # the pid is taken again: whatever has that group id is another's
    found = []
    for process in psutil.process_iter(["create_time"]):
        with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError, PermissionError):
            if os.getpgid(process.pid) == record["pid"] and process.info["create_time"] >= record["started"]:
                found.append(process)
    return found


def stop(records: Iterable[Mapping], grace: float = AIRFLOW_STOP_GRACE_SECONDS) -> None:
    """SIGTERM each process's group and every descendant that left it; SIGKILL what is alive after ``grace``. A
    record whose process has died already still stops what outlived it in its group.

    One SIGTERM each: a second one makes Airflow (and uvicorn) skip their clean shutdown.
    """
    found = [(record, live(record)) for record in records]
    leaders = [process for _, process in found if process is not None]
    groups = {leader.pid for leader in leaders}
    processes = {p.pid: p for leader in leaders for p in (leader, *_descendants(leader))}
    for record, process in found:
        if process is None:
            processes.update({p.pid: p for p in _orphans(record)})
    for group in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGTERM)
    for process in processes.values():
        with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
            if os.getpgid(process.pid) not in groups:
                process.terminate()
    _, alive = psutil.wait_procs(list(processes.values()), timeout=grace)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(alive, timeout=5)
    for leader in leaders:  # reap the ones this process started, so none stays a zombie
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(leader.pid, os.WNOHANG)


def log_tail(path: str | Path | None, lines: int = 30) -> str:
    if not path:
        return ""
    with contextlib.suppress(OSError):
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    return ""


def healthy(url: str) -> bool:
    """Whether the server at ``url`` answers 200 on ``/ping`` (the SageMaker containers' health check, and ours)."""
    try:
        with urllib.request.urlopen(f"{url}/ping", timeout=2) as answer:
            return answer.status == 200
    except OSError:
        return False


def wait_for_http(url: str, timeout: float = 30.0, process: subprocess.Popen | None = None) -> None:
    """Poll ``url`` until it answers (any HTTP status), the process dies, or the timeout passes."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            if process is not None and process.poll() is not None:
                raise RuntimeError(
                    f"process {process.args!r} exited with {process.returncode} before {url} answered"
                ) from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not answer within {timeout:.0f} s") from None
            time.sleep(0.1)


def wait_idle(record: Mapping, timeout: float, window: float = 0.1, busy: float = 0.2) -> bool:
    """Wait until the process ``record`` names and its descendants use less than ``busy`` of a core over ``window``
    seconds, or ``timeout`` passes; whether they went idle. A server that answers already may have workers still
    starting (uvicorn's answer once one of them listens), each taking a core from the ones that answer."""

    def cpu_seconds() -> float:
        leader = live(record)
        tree = (leader, *_descendants(leader)) if leader else ()
        total = 0.0
        for process in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                times = process.cpu_times()
                total += times.user + times.system
        return total

    deadline = time.monotonic() + timeout
    before = cpu_seconds()
    while time.monotonic() < deadline:
        time.sleep(window)
        used = cpu_seconds()
        if used - before < busy * window:
            return True
        before = used
    return False


def wait_until(predicate, timeout: float, interval: float = 0.1) -> bool:
    """Poll ``predicate`` until it is true (returns True) or ``timeout`` seconds pass (returns False)."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
