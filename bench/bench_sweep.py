"""The seed sweep end to end, as `make demo` runs it (target: 60 s), a median of several runs, written as JSON with
where every second and every CPU-second goes.

Each run starts a local stack on a fresh state directory (`mnist-pipeline up`), runs `mnist_sweep` through the
command line as a user would (`mnist-pipeline run`), and stops the stack (`mnist-pipeline down`): five training jobs
(the seed_cnn network at hidden_channels 2, 5, 10, 20, 32 with the seed preset's 2 epochs of SGD) on the official
MNIST from a mirror directory, and everything else the DAG does (verify, validate, upload, train, select, gate,
register, deploy, the monitoring check, report).

Per run, read from Airflow's own database after the run:
- the run's seconds from its start to its end;
- the task instances that ran a process (success or failed) and those skipped;
- the critical path: the chain of task instances, each the last to end among those its successor waited for, with
  how long each ran and how long the scheduler took to start it;
- where the critical path's seconds go: the scheduler's waits, the training tasks, the other tasks, beside the least
  the training could take on this machine (its CPU-seconds over the cores);
- each training task's start and end, and its job's CPU-seconds;
and, sampled from outside while it ran (bench/cpu_sampler.py), the CPU-seconds of each kind of process: the training
jobs' scripts apart from everything else (Airflow's task processes, their supervisors and each component, the local
services).

`--root` runs another checkout of the project (its own command line and DAG) with this bench, for a before and
after measured alike: run them one after the other on an otherwise idle machine.

    python bench/bench_sweep.py --mirror ../shared/mnist --out bench/results/sweep.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpu_sampler import CpuSampler
from results_file import write_result

ROOT = Path(__file__).resolve().parents[1]
TARGET_SECONDS = 60
HIDDEN_CHANNELS = [2, 5, 10, 20, 32]  # the seed preset's sweep, as `make demo` runs it


def cli(root: Path, env: dict, *args: str, timeout: float) -> None:
    """``mnist-pipeline ARGS`` of the checkout at ``root``; its output goes to a log beside the state."""
    with open(Path(env["MNIST_PIPELINE_STATE_DIR"]) / "bench-cli.log", "a") as log:
        subprocess.run(
            [sys.executable, "-m", "cli.main", *args],
            cwd=root,
            env={**env, "PYTHONPATH": str(root)},
            stdout=log,
            stderr=subprocess.STDOUT,
            check=True,
            timeout=timeout,
        )


def _time(value: str | None) -> datetime.datetime | None:
    if not value:
        return None
    parsed = datetime.datetime.fromisoformat(value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=datetime.UTC)


def read_run(database: Path) -> dict:
    """The sweep's one run and its task instances, from Airflow's database."""
    with sqlite3.connect(database) as db:
        db.row_factory = sqlite3.Row
        [run] = db.execute(
            "SELECT run_id, state, start_date, end_date FROM dag_run WHERE dag_id = 'mnist_sweep'"
        ).fetchall()
        tis = db.execute(
            "SELECT task_id, map_index, state, queued_dttm, start_date, end_date FROM task_instance "
            "WHERE dag_id = 'mnist_sweep' AND run_id = ?",
            (run["run_id"],),
        ).fetchall()
    return {"run": dict(run), "tis": [dict(ti) for ti in tis]}


# Run in the checkout: each task's upstream tasks, as its DAG file defines them.
UPSTREAM = """
import json
from airflow.dag_processing.dagbag import DagBag
dag = DagBag("dags/mnist_sweep.py").dags["mnist_sweep"]
print(json.dumps({task.task_id: sorted(task.upstream_task_ids) for task in dag.tasks}))
"""


def upstream_of(root: Path, env: dict) -> dict[str, set[str]]:
    result = subprocess.run(
        [sys.executable, "-c", UPSTREAM], cwd=root, env={**env, "PYTHONPATH": str(root)}, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise RuntimeError(f"the DAG of {root} did not parse: {result.stderr[-2000:]}")
    return {task: set(upstream) for task, upstream in json.loads(result.stdout.strip().splitlines()[-1]).items()}


def critical_path(tis: list[dict], upstream: dict[str, set[str]]) -> list[dict]:
    """From the last task instance to end back to the first: at each step the upstream instance that ended last."""
    ran = [ti for ti in tis if ti["start_date"] and ti["end_date"]]
    for ti in ran:
        ti["start"], ti["end"], ti["queued"] = _time(ti["start_date"]), _time(ti["end_date"]), _time(ti["queued_dttm"])
    if not ran:
        return []
    path, current = [], max(ran, key=lambda ti: ti["end"])
    while current is not None:
        path.append(current)
        before = [ti for ti in ran if ti["task_id"] in upstream.get(current["task_id"], set())]
        current = max(before, key=lambda ti: ti["end"]) if before else None
    path.reverse()
    steps, previous_end = [], None
    for ti in path:
        steps.append(
            {
                "task_id": ti["task_id"],
                "map_index": ti["map_index"],
                # From the end of what it waited for (or its queueing, first) to its start: the scheduler's share.
                "waited_seconds": round(
                    (ti["start"] - (previous_end or ti["queued"] or ti["start"])).total_seconds(), 1
                ),
                "ran_seconds": round((ti["end"] - ti["start"]).total_seconds(), 1),
            }
        )
        previous_end = ti["end"]
    return steps


def one_run(root: Path, mirror: Path) -> dict:
    state = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    env = {**os.environ, "MNIST_PIPELINE_STATE_DIR": str(state), "MNIST_MIRROR": str(mirror)}
    conf = json.dumps({"hidden_channels": HIDDEN_CHANNELS, "mnist_mirror": str(mirror)})
    cli(root, env, "up", "--port", "0", timeout=600)
    try:
        started = time.monotonic()
        with CpuSampler() as cpu:
            cli(root, env, "run", "--conf", conf, timeout=1800)
        command_seconds = time.monotonic() - started
    finally:
        cli(root, env, "down", timeout=300)
    [database] = state.rglob("airflow.db")
    found = read_run(database)
    run, tis = found["run"], found["tis"]
    cpu_seconds = cpu.seconds()
    training = cpu_seconds.get("training jobs", 0.0)
    path = critical_path(tis, upstream_of(root, env))
    return {
        "state": run["state"],
        "sweep_seconds": round((_time(run["end_date"]) - _time(run["start_date"])).total_seconds(), 1),
        "command_seconds": round(command_seconds, 1),
        "task_instances": len(tis),
        "ran_a_process": sum(ti["state"] in ("success", "failed") for ti in tis),
        "skipped": sorted(
            f"{ti['task_id']}[{ti['map_index']}]" if ti["map_index"] >= 0 else ti["task_id"]
            for ti in tis
            if ti["state"] == "skipped"
        ),
        "cpu_seconds": cpu_seconds,
        "training_cpu_seconds": training,
        "cpu_seconds_outside_training": round(sum(cpu_seconds.values()) - training, 1),
        "critical_path": path,
        "where_the_seconds_go": accounting(path, training),
        "training_jobs": training_jobs(tis, cpu.by_process("training jobs")),
    }


def accounting(path: list[dict], training_cpu_seconds: float) -> dict:
    """The critical path's seconds: the scheduler's waits, the training tasks' and the others'; and the least the
    training could take here, its CPU-seconds spread evenly over every core (the jobs run on this machine's cores and
    nothing else runs meanwhile)."""
    train = [step for step in path if step["task_id"] == "train"]
    return {
        "scheduler_waits": round(sum(step["waited_seconds"] for step in path), 1),
        "train": round(sum(step["ran_seconds"] for step in train), 1),
        "other_tasks": round(sum(step["ran_seconds"] for step in path if step not in train), 1),
        "train_floor": round(training_cpu_seconds / os.cpu_count(), 1),
    }


def training_jobs(tis: list[dict], processes: list[tuple[str, float]]) -> list[dict]:
    """Each training task, from the first one's start: when it started and ended, and the CPU-seconds of its job's
    script (told by the hidden_channels of its command line)."""
    train = sorted((ti for ti in tis if ti["task_id"] == "train" and ti["start_date"]), key=lambda ti: ti["map_index"])
    if not train:
        return []
    first = min(_time(ti["start_date"]) for ti in train)
    cpu: dict[int, float] = {}
    for command, seconds in processes:
        words = command.split()
        if "--hidden_channels" in words[:-1]:
            channels = int(words[words.index("--hidden_channels") + 1])
            cpu[channels] = round(cpu.get(channels, 0.0) + seconds, 1)
    return [
        {
            "map_index": ti["map_index"],
            "hidden_channels": HIDDEN_CHANNELS[ti["map_index"]],
            "started": round((_time(ti["start_date"]) - first).total_seconds(), 1),
            "ended": round((_time(ti["end_date"]) - first).total_seconds(), 1) if ti["end_date"] else None,
            "job_cpu_seconds": cpu.get(HIDDEN_CHANNELS[ti["map_index"]]),
        }
        for ti in train
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mirror", required=True, help="directory with the four official MNIST files")
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--root", default=str(ROOT), help="the checkout to run (default: this one)")
    args = parser.parse_args()

    root, mirror = Path(args.root).resolve(), Path(args.mirror).resolve()
    runs = [one_run(root, mirror) for _ in range(args.runs)]
    median = {
        key: statistics.median(run[key] for run in runs)
        for key in ("sweep_seconds", "training_cpu_seconds", "cpu_seconds_outside_training", "ran_a_process")
    }
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
    result = {
        "commit": commit.stdout.strip(),
        "cpus": os.cpu_count(),
        "target_sweep_seconds": TARGET_SECONDS,
        "hidden_channels": HIDDEN_CHANNELS,
        "median": median,
        "runs": runs,
    }
    write_result(args.out, result, {"commit": result["commit"], **median, "states": [run["state"] for run in runs]})


if __name__ == "__main__":
    main()
