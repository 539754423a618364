"""A DAG run on the local stack, followed: trigger it through the REST API and wait for its end; for `mnist-pipeline
run`, the sweep followed live (a line per finished task, its training jobs' table, a progress bar) and its outcome."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

from cli import StackError, new_console
from cli.airflow_api import AirflowAPI, quote, run_path, task_instances, task_log, xcom
from cli.stack import api_for, local_client, read_state, running, stack_paths
from tasks.config import PipelineConfig, load_config
from tasks.names import DAG_ID

ENDED = ("success", "failed")  # a DAG run's states once it is over
FINISHED = {"success", "failed", "skipped", "upstream_failed", "removed"}  # a task instance's
TRAINING_TASKS = ("train",)
TUNING_TASK = "tune"
EPOCH_LINE = re.compile(r"Test Epoch: (\d+),")  # training/train.py's line at the end of each epoch


def trigger(dag_id: str, conf: dict, console, config: PipelineConfig | None = None) -> tuple[AirflowAPI, dict, str]:
    """Trigger a run of ``dag_id`` with ``conf`` on the running stack and say where to watch it; returns the API
    client, the stack's state and the run's id."""
    paths = stack_paths(config)
    state = read_state(paths)
    if not state or not all(running(paths).values()):
        raise StackError("the local stack is not running: start it with `mnist-pipeline up`")
    api = api_for(state, paths)
    run = api.request("POST", f"/dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": conf})
    run_id = run["dag_run_id"]
    console.print(
        f"Triggered {dag_id} run [bold]{run_id}[/]: {state['airflow_url']}/dags/{dag_id}/runs/{quote(run_id)}"
    )
    return api, state, run_id


def polls(api: AirflowAPI, dag_id: str, run_id: str, poll: float, timeout: float | None = None) -> Iterator[dict]:
    """The run as each poll finds it, up to and including the poll that finds it ended; a StackError when it is
    still going after ``timeout`` seconds (None: no limit)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        run = api.get(run_path(dag_id, run_id))
        yield run
        if run["state"] in ENDED:
            return
        if deadline is not None and time.monotonic() > deadline:
            raise StackError(f"{dag_id} run {run_id} is still {run['state']} after {timeout:.0f} s")
        time.sleep(poll)


def run_conf(conf_json: str | None, params: list[str]) -> dict:
    """The run's conf: ``--conf`` JSON, then each ``--param key=value`` (the value read as JSON when it is JSON)."""
    conf = {}
    if conf_json:
        try:
            conf = json.loads(conf_json)
        except ValueError as error:
            raise StackError(f"--conf is not valid JSON: {error}") from None
        if not isinstance(conf, dict):
            raise StackError(f"--conf must be a JSON object, not {type(conf).__name__}")
    for item in params:
        key, separator, value = item.partition("=")
        if not separator or not key:
            raise StackError(f"--param {item!r} is not key=value")
        try:
            conf[key] = json.loads(value)
        except ValueError:
            conf[key] = value
    mirror = os.environ.get("MNIST_MIRROR")
    if mirror and "mnist_mirror" not in conf:  # the Makefile's MNIST_MIRROR, made absolute for the workers
        conf["mnist_mirror"] = str(Path(mirror).resolve()) if Path(mirror).is_dir() else mirror
    return conf


def task_label(ti: dict) -> str:
    return ti["task_id"] if ti["map_index"] < 0 else f"{ti['task_id']}[{ti['map_index']}]"


class SweepTable:
    """The sweep as it goes: one row per training task (its hidden_channels value), with its job's state, the
    epochs done and the last test accuracy from the job's own log lines in the task's log. In a tuning run, one row
    per job the tuner started: its tuned values, its state and its objective as the tuner saw it."""

    def __init__(self, api: AirflowAPI, run_id: str, sagemaker=None):
        self.api, self.run_id, self.sagemaker = api, run_id, sagemaker
        self.rows: dict[int, tuple[str, ...]] = {}
        # The rows read once both the job and its task had ended: the task's log was whole, nothing changes any more.
        # A row read while the job had ended but its task still ran may lack the last epochs' lines, so it is read
        # again.
        self.final: set[int] = set()

    def _job_state(self, hidden_channels: str, fallback: str) -> tuple[str, str]:
        """(job name, job status) of the member's newest job (a retry's is suffixed), or the task's state."""
        from tasks.training_jobs import training_job_name

        name = training_job_name(self.run_id, int(hidden_channels)) if hidden_channels.isdigit() else ""
        if self.sagemaker is None or not name:
            return name, fallback
        try:
            jobs = self.sagemaker.list_training_jobs(
                NameContains=name, SortBy="CreationTime", SortOrder="Descending", MaxResults=1
            )["TrainingJobSummaries"]
        except Exception:  # the table is a view: an unreachable service shows the task's state instead
            return name, fallback
        return (jobs[0]["TrainingJobName"], jobs[0]["TrainingJobStatus"]) if jobs else (name, fallback)

    def _tuner_rows(self) -> None:
        from tasks.tuning import tuning_job_name

        if self.sagemaker is None:
            return
        try:
            jobs = self.sagemaker.list_training_jobs_for_hyper_parameter_tuning_job(
                HyperParameterTuningJobName=tuning_job_name(self.run_id),
                SortBy="CreationTime",
                SortOrder="Ascending",
                MaxResults=100,
            )["TrainingJobSummaries"]
        except Exception:  # not created yet, or the service is unreachable: the table is a view
            return
        for index, job in enumerate(jobs):
            tuned = ", ".join(f"{key}={value}" for key, value in sorted(job.get("TunedHyperParameters", {}).items()))
            objective = (job.get("FinalHyperParameterTuningJobObjectiveMetric") or {}).get("Value")
            self.rows[index] = (
                tuned,
                job["TrainingJobStatus"],
                "-",
                f"{objective:.2f}%" if objective else "",
                job["TrainingJobName"],
            )

    def update(self, tis: list[dict]) -> None:
        from local_sagemaker.training import TERMINAL
        from tasks.training_jobs import METRIC_DEFINITIONS

        if any(
            ti["task_id"] == TUNING_TASK and ti["state"] not in (None, "skipped", "scheduled", "queued") for ti in tis
        ):
            self._tuner_rows()
            return
        accuracy = re.compile(next(d["Regex"] for d in METRIC_DEFINITIONS if d["Name"] == "test:accuracy"))
        for ti in tis:
            if ti["task_id"] not in TRAINING_TASKS or ti["map_index"] < 0:
                continue
            if ti["map_index"] in self.final and ti["state"] in FINISHED:
                continue  # nothing changes any more
            label = ti.get("rendered_map_index") or task_label(ti)
            hidden_channels = label.partition("=")[2]
            job, status = self._job_state(hidden_channels, ti["state"] or "queued")
            lines = task_log(self.api, DAG_ID, self.run_id, ti) if ti["state"] in ("running", *FINISHED) else []
            # Each epoch's line once (a log can repeat one), by its number: "Test Epoch: 2, ... Test Accuracy: 97.00%;"
            epochs = {
                int(epoch.group(1)): found.group(1)
                for line in lines
                if (epoch := EPOCH_LINE.search(line)) and (found := accuracy.search(line))
            }
            last = epochs[max(epochs)] + "%" if epochs else ""
            self.rows[ti["map_index"]] = (label, status, str(max(epochs, default=0)), last, job)
            if status in TERMINAL and ti["state"] in FINISHED:
                self.final.add(ti["map_index"])
            else:
                self.final.discard(ti["map_index"])

    def __rich__(self):
        from rich.table import Table

        table = Table("sweep member / tuned", "state", "epochs", "test accuracy", title="Training jobs")
        table.add_column("training job", overflow="fold")  # whole: it is what SageMaker's console finds it by
        for _, row in sorted(self.rows.items()):
            table.add_row(*row)
        return table


def follow(api: AirflowAPI, run_id: str, console, poll: float = 2.0, sagemaker=None) -> dict:
    """Follow the sweep run to its end: a line per finished task, the sweep table live, a progress bar. The last
    frame shows the table as the run ended."""
    from rich.console import Group
    from rich.live import Live
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    reported: set[str] = set()
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    progress = Progress(*columns, console=console)
    sweep = SweepTable(api, run_id, sagemaker)
    bar = progress.add_task("queued", total=None)
    with Live(Group(sweep, progress), console=console, refresh_per_second=4) as live:
        for run in polls(api, DAG_ID, run_id, poll):
            tis = task_instances(api, DAG_ID, run_id)
            for ti in sorted(tis, key=lambda ti: ti["end_date"] or ""):
                label = task_label(ti)
                if ti["state"] in FINISHED and label not in reported:
                    reported.add(label)
                    mark = {"success": "[green]✓[/]", "skipped": "[dim]·[/]"}.get(ti["state"], "[red]✗[/]")
                    duration = f" ({ti['duration']:.1f} s)" if ti.get("duration") else ""
                    live.console.print(f"{mark} {label} {ti['state']}{duration}")
            sweep.update(tis)
            running_now = [task_label(ti) for ti in tis if ti["state"] == "running"]
            progress.update(
                bar, total=len(tis), completed=len(reported), description=", ".join(running_now) or run["state"]
            )
        progress.update(bar, visible=False)
    if not console.is_terminal:
        console.line()  # rich ends its last frame with a line break on a terminal only, not in a file or a pipe
    return run


def print_best(console, best: dict) -> None:
    """The winner, below the training jobs' table that `follow` left on screen (the only table of the jobs)."""
    console.print(
        f"Best: hidden_channels {best['hidden_channels']}, test accuracy {100 * best['test_accuracy']:.2f}% "
        f"({best['training_job_name']})"
    )


def _seconds_between(start: str | None, end: str | None) -> float | None:
    import datetime

    if not (start and end):
        return None
    return (datetime.datetime.fromisoformat(end) - datetime.datetime.fromisoformat(start)).total_seconds()


def run_sweep(conf: dict, console, config: PipelineConfig | None = None) -> dict:
    """Trigger mnist_sweep with ``conf``, follow it, and return its outcome: run id, state, seconds, best, deployment
    and report (the last three None when the run did not get that far)."""
    api, state, run_id = trigger(DAG_ID, conf, console, config)
    run = follow(api, run_id, console, sagemaker=local_client(state, "sagemaker", config or load_config()))
    outcome = {
        "run_id": run_id,
        "state": run["state"],
        "seconds": _seconds_between(run.get("start_date"), run.get("end_date")),
        "best": xcom(api, DAG_ID, run_id, "select_best"),
        "choice": xcom(api, DAG_ID, run_id, "candidate"),
        "deployment": xcom(api, DAG_ID, run_id, "deploy"),
        "report": xcom(api, DAG_ID, run_id, "report"),
        "data_dir": xcom(api, DAG_ID, run_id, "download"),
    }
    if run["state"] != "success":
        for ti in task_instances(api, DAG_ID, run_id):
            if ti["state"] == "failed":
                tail = "\n".join(task_log(api, DAG_ID, run_id, ti)[-20:])
                console.print(f"[red]{task_label(ti)} failed[/]; its log ends:\n{tail}")
    return outcome


def run_command(args) -> int:
    console = new_console()
    try:
        outcome = run_sweep(run_conf(args.conf, args.param), console)
    except StackError as error:
        console.print(f"[red]error:[/] {error}")
        return 2
    if outcome["best"]:
        print_best(console, outcome["best"])
    if choice := outcome["choice"]:
        console.print(
            f"Deployment: {'version ' + str(choice['model']['version']) + ', ' if choice['deploy'] else ''}"
            f"{choice['reason']}"
        )
    if isinstance(outcome["report"], dict) and outcome["report"].get("html"):
        console.print(f"Report: {outcome['report']['html']}")
    seconds = f" in {outcome['seconds']:.0f} s" if outcome["seconds"] is not None else ""
    color = "green" if outcome["state"] == "success" else "red"
    console.print(f"Run {outcome['run_id']} [{color}]{outcome['state']}[/]{seconds}")
    return 0 if outcome["state"] == "success" else 1
