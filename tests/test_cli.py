"""What the command line prints, without a stack: a sweep followed to its end (`mnist-pipeline run`, `make demo`)
against a scripted Airflow API and SageMaker service, and the demo's console kept free of the provider's chatter."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from types import SimpleNamespace

from tests.conftest import ROOT

RUN_ID = "manual__2026-12-07T14:01:11.123456+00:00"
WIDTH = 80  # a terminal's columns that nothing the follower prints may exceed


def epoch_line(epoch: int, accuracy: str) -> str:
    """training/train.py's line at the end of an epoch, as the task's log holds it."""
    return f"Test Epoch: {epoch}, Test Average loss: 0.1000, Test Accuracy: {accuracy}%; Test Confidence: 0.9"


class ScriptedRun:
    """An Airflow API whose sweep run goes through ``steps``, one per poll: ``(run state, the training tasks' state,
    their log lines, their jobs' status)``. It is the SageMaker service too, saying each job's status at that poll."""

    def __init__(self, hidden_channels: list[int], steps: list[tuple[str, str, list[str], str]]):
        self.hidden_channels, self.steps, self.step = hidden_channels, steps, -1
        self.client = SimpleNamespace(get=self.log)  # task_log reads through the API's httpx client

    @property
    def now(self) -> tuple[str, str, list[str], str]:
        return self.steps[self.step]

    def get(self, path: str, **params) -> dict:
        if path.endswith("/taskInstances"):
            return {"task_instances": self.task_instances()}
        self.step += 1  # the follower reads the run first at each poll
        return {"state": self.now[0], "start_date": None, "end_date": None}

    def task_instances(self) -> list[dict]:
        state = self.now[1]
        return [
            {
                "task_id": "train",
                "map_index": index,
                "rendered_map_index": f"hidden_channels={channels}",
                "state": state,
                "try_number": 1,
                "end_date": "2026-12-07T14:05:00+00:00" if state == "success" else None,
                "duration": 30.0 if state == "success" else None,
            }
            for index, channels in enumerate(self.hidden_channels)
        ]

    def log(self, path: str, **_) -> SimpleNamespace:
        content = [{"event": line} for line in self.now[2]]
        return SimpleNamespace(status_code=200, json=lambda: {"content": content})

    def list_training_jobs(self, NameContains: str, **_) -> dict:
        return {"TrainingJobSummaries": [{"TrainingJobName": NameContains, "TrainingJobStatus": self.now[3]}]}


def follow_scripted(steps, hidden_channels=(2, 5, 10, 20, 32)) -> str:
    """What `mnist-pipeline run` prints of the sweep on an 80-column console: the follower's lines and table, then
    the winner."""
    from rich.console import Console

    from cli.runs import follow, print_best

    api = ScriptedRun(list(hidden_channels), steps)
    out = io.StringIO()
    console = Console(file=out, width=WIDTH, soft_wrap=True, color_system=None)
    run = follow(api, RUN_ID, console, poll=0, sagemaker=api)
    assert run["state"] == "success"
    print_best(console, {"hidden_channels": 32, "test_accuracy": 0.9699, "training_job_name": "the-winner"})
    return out.getvalue()


def test_the_jobs_table_ends_on_the_jobs_final_figures_in_one_table_of_80_columns():
    """The jobs completed while their tasks still ran, their logs then one epoch short: the table's last frame
    shows what the tasks logged in the end, not that poll's figures; the winner follows without a second table of
    the same jobs, and no line is wider than the terminal."""
    first, last = epoch_line(1, "95.80"), epoch_line(2, "96.99")
    output = follow_scripted(
        [
            ("running", "running", [first], "InProgress"),
            ("running", "running", [first], "Completed"),  # the job ended; its task has not logged the last epoch
            ("success", "success", [first, last], "Completed"),
        ]
    )
    lines = output.splitlines()
    assert all(len(line) <= WIDTH for line in lines), "\n".join(line for line in lines if len(line) > WIDTH)
    assert sum(line.startswith("┏") for line in lines) == 1, output  # one table: the jobs', as the run ended
    for channels in (2, 5, 10, 20, 32):
        assert re.search(rf"hidden_channels={channels} +│ Completed +│ 2 +│ 96\.99% +│ manual", output), output
    assert "95.80%" not in output
    assert lines[-1] == "Best: hidden_channels 32, test accuracy 96.99% (the-winner)"
    assert sum(line.startswith("✓ train[") and "success" in line for line in lines) == 5


def test_a_job_still_running_when_its_task_ends_is_read_again():
    """A row is final only once the job and its task have both ended: a task that ended (failed, say) while its
    job's status still said InProgress is read again at the next poll."""
    from cli.runs import SweepTable

    api = ScriptedRun(
        [4],
        [
            ("running", "failed", [epoch_line(1, "95.80")], "InProgress"),
            ("failed", "failed", [epoch_line(1, "95.80")], "Stopped"),
        ],
    )
    table = SweepTable(api, RUN_ID, sagemaker=api)
    for _ in api.steps:
        api.get("/run")
        table.update(api.task_instances())
    assert table.rows[0][:4] == ("hidden_channels=4", "Stopped", "1", "95.80%")


def test_the_connection_wrappers_info_lines_are_silenced_only_while_a_command_predicts():
    """Each hook the demo's prediction makes has the Amazon provider's connection wrapper say at info level where it
    found the keys: not on the console of `make demo` or `mnist-pipeline predict` while they predict, and as before
    after that."""
    script = """
import os
from cli.predict import CONNECTION_WRAPPER_LOGGER, without_info_from
from cli.local_aws import StackKeys, connection_uri
from tasks.config import load_config
from tasks.hooks import hook

config = load_config()
os.environ[f"AIRFLOW_CONN_{config.aws_conn_id.upper()}"] = connection_uri(
    "http://127.0.0.1:9", StackKeys.new().pipeline, config.region, "http://127.0.0.1:9", "http://127.0.0.1:9"
)
with without_info_from(CONNECTION_WRAPPER_LOGGER):
    hook(config, "sagemaker").conn_config
    hook(config, "sagemaker-runtime").conn_config
hook(config, "s3").conn_config
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    told = [line for line in output.splitlines() if "credentials retrieved from login and password" in line]
    assert len(told) == 1, output  # the s3 hook's, made after the block
    assert "[info" in told[0]
