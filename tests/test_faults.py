"""Faults on the real local stack, as they happen to an ops team: each test breaks one thing in the middle of a run
and asserts what survived. Marked `fault`: `make test` leaves them out (they take minutes), `.ci/run` runs them
with `make test-faults`.

Uploads cut halfway are tested where the cut can be placed exactly, against a real moto through a proxy that drops
the connection (tests/test_mnist_upload.py); here the stack's S3 is never cut mid-object.
"""

from __future__ import annotations

import time

import psutil
import pytest

from tasks.training_jobs import training_job_name
from tests.helpers.local_stack import shared_stack
from tests.helpers.polling import wait_until

pytestmark = [pytest.mark.fault, pytest.mark.slow]

# Settings that learn the small digits quickly, so that the runs that are not broken pass their gate and check.
QUICK = {"epochs": 2, "optimizer": "adam", "lr": 0.005, "batch_size": 32, "hidden_channels": [4], "smoke_requests": 50}
# A job that runs for minutes: one image per step.
SLOW = {**QUICK, "epochs": 100, "batch_size": 1, "deploy": False}
RUN_TIMEOUT = 600


@pytest.fixture
def stack(request, small_mnist):
    return shared_stack(request, small_mnist)


def trigger(stack, conf: dict, small_mnist) -> str:
    with stack.api() as api:
        run = api.post(
            "/dags/mnist_sweep/dagRuns", json={"logical_date": None, "conf": {"mnist_mirror": str(small_mnist), **conf}}
        )
        assert run.status_code == 200, run.text
        return run.json()["dag_run_id"]


def run_state(stack, run_id: str) -> str:
    with stack.api() as api:
        return api.get(f"/dags/mnist_sweep/dagRuns/{run_id}").json()["state"]


def finished(stack, run_id: str, timeout: float = RUN_TIMEOUT) -> str:
    return wait_until(
        lambda: (s := run_state(stack, run_id)) in ("success", "failed") and s,
        timeout=timeout,
        interval=1,
        failure=f"run {run_id} ends",
    )


def training_processes(job_name: str) -> list[psutil.Process]:
    """The train.py processes of ``job_name`` (and of its retries, suffixed) on this machine."""
    found = []
    for process in psutil.process_iter(["cmdline", "cwd"]):
        cmdline, cwd = process.info["cmdline"] or [], process.info["cwd"] or ""
        if "train.py" in cmdline[1:2] and f"/job-dirs/{job_name}" in cwd:  # run as SageMaker runs it, from code/
            found.append(process)
    return found


def training_jobs(stack, job_name: str) -> list[dict]:
    sagemaker = stack.client("sagemaker")
    summaries = sagemaker.list_training_jobs(NameContains=job_name, MaxResults=100)["TrainingJobSummaries"]
    return sorted(summaries, key=lambda job: job["CreationTime"])


def test_a_killed_training_process_is_retried_and_the_run_succeeds(stack, small_mnist):
    run_id = trigger(stack, QUICK, small_mnist)
    job = training_job_name(run_id, 4)
    [victim] = wait_until(lambda: training_processes(job), timeout=180, failure="the training process starts")
    victim.kill()
    assert finished(stack, run_id) == "success"
    jobs = training_jobs(stack, job)
    assert [j["TrainingJobStatus"] for j in jobs] == ["Failed", "Completed"], jobs
    with stack.api() as api:
        train = api.get(f"/dags/mnist_sweep/dagRuns/{run_id}/taskInstances/train/0").json()
    assert train["state"] == "success" and train["try_number"] == 2


def test_a_training_task_marked_failed_stops_its_job_within_30_s(stack, small_mnist):
    run_id = trigger(stack, SLOW, small_mnist)
    job = training_job_name(run_id, 4)
    running = wait_until(lambda: training_processes(job), timeout=180, failure="the training process starts")
    with stack.api() as api:  # what the UI's "mark as failed" sends
        marked = api.patch(f"/dags/mnist_sweep/dagRuns/{run_id}/taskInstances/train/0", json={"new_state": "failed"})
        assert marked.status_code == 200, marked.text
    started = time.monotonic()
    _, alive = psutil.wait_procs(running, timeout=30)
    assert alive == [], f"still running after {time.monotonic() - started:.0f} s: {alive}"
    [stopped] = training_jobs(stack, job)
    assert wait_until(
        lambda: training_jobs(stack, job)[0]["TrainingJobStatus"] == "Stopped", timeout=30, failure="the job is Stopped"
    )
    assert stopped["TrainingJobName"] == job
    assert finished(stack, run_id) == "failed"
    assert training_processes(job) == []


def test_a_restart_of_the_whole_stack_mid_run_loses_nothing(stack, small_mnist):
    """`mnist-pipeline down` and `up` while a job trains: the local AWS and the local SageMaker service restart with
    their state, the run then fails cleanly or completes, and nothing of before is lost or left running."""
    sagemaker = lambda: stack.client("sagemaker")  # noqa: E731
    s3 = lambda: stack.client("s3", stack.keys.admin)  # noqa: E731
    from tasks.config import load_config

    bucket = load_config().bucket
    objects_before = {o["Key"]: o["ETag"] for o in s3().list_objects_v2(Bucket=bucket).get("Contents", [])}
    jobs_before = {
        j["TrainingJobName"]: j["TrainingJobStatus"]
        for j in sagemaker().list_training_jobs(MaxResults=100)["TrainingJobSummaries"]
    }
    versions = lambda: {  # noqa: E731
        v["ModelPackageArn"]: v["ModelApprovalStatus"]
        for v in sagemaker().list_model_packages(ModelPackageGroupName="mnist-classifier", MaxResults=100)[
            "ModelPackageSummaryList"
        ]
    }
    versions_before = versions()

    run_id = trigger(stack, {**QUICK, "epochs": 6, "batch_size": 8}, small_mnist)
    job = training_job_name(run_id, 4)
    running = wait_until(lambda: training_processes(job), timeout=180, failure="the training process starts")
    assert stack.down().returncode == 0
    _, alive = psutil.wait_procs(running, timeout=30)
    assert alive == [], "down stops the jobs too"
    again = stack.cli("up", "--port", "0")
    assert again.returncode == 0, again.stdout + again.stderr
    stack.stopped = False

    assert finished(stack, run_id) in ("success", "failed")
    objects_after = {o["Key"]: o["ETag"] for o in s3().list_objects_v2(Bucket=bucket).get("Contents", [])}
    assert objects_after.keys() >= objects_before.keys(), "every object of before is there"
    # unchanged: a run adds objects (content-addressed, or under its own run), it never rewrites one
    changed = {key for key, etag in objects_before.items() if objects_after[key] != etag}
    assert changed == set(), changed
    jobs_after = {
        j["TrainingJobName"]: j["TrainingJobStatus"]
        for j in sagemaker().list_training_jobs(MaxResults=100)["TrainingJobSummaries"]
    }
    assert jobs_after.items() >= jobs_before.items(), "every job record of before is there"
    assert versions().items() >= versions_before.items(), "every registry version of before is there, as it was"
    assert jobs_after[job] in ("Failed", "Stopped", "Completed")
    assert training_processes(job) == []


def test_a_scheduler_killed_mid_sweep_and_started_again_finishes_the_run_once(stack, small_mnist):
    run_id = trigger(stack, {**QUICK, "epochs": 8, "batch_size": 8}, small_mnist)
    job = training_job_name(run_id, 4)
    wait_until(lambda: training_processes(job), timeout=180, failure="the training process starts")
    scheduler = psutil.Process(stack.state["processes"]["scheduler"]["pid"])
    workers = scheduler.children(recursive=True)  # its executor's: they outlive it
    scheduler.kill()
    scheduler.wait(10)
    again = stack.cli("up", "--port", "0")  # starts what died, and only that
    assert again.returncode == 0, again.stdout + again.stderr
    assert stack.state["processes"]["scheduler"]["pid"] != scheduler.pid
    assert finished(stack, run_id) == "success"
    assert [j["TrainingJobStatus"] for j in training_jobs(stack, job)] == ["Completed"], "the job ran once"
    with stack.api() as api:
        tis = api.get(f"/dags/mnist_sweep/dagRuns/{run_id}/taskInstances").json()["task_instances"]
    assert {ti["task_id"]: ti["try_number"] for ti in tis}["train"] == 1, "its task too"
    # The killed scheduler's workers carried its task to the end; `down` stops them with the rest, as they go here.
    [retired] = stack.state["retired"]
    assert retired["pid"] == scheduler.pid and [w for w in workers if w.is_running()]
    from local_sagemaker import processes

    processes.stop([retired], grace=10)
    _, alive = psutil.wait_procs(workers, timeout=5)
    assert alive == [], "nothing of the killed scheduler is left running"
