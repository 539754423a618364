"""The local stack for real: `mnist-pipeline up`, `status`, `run`, `down` and `up` again (last: it stops the shared
stack)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import psutil
import pytest

from tests.helpers.alerts import read_alerts, subscribe_queue
from tests.helpers.local_stack import DEADLINE_SECONDS, shared_stack
from tests.helpers.polling import wait_until

pytestmark = [pytest.mark.stack, pytest.mark.slow]


@pytest.fixture
def stack(request, small_mnist):
    return shared_stack(request, small_mnist)


def stack_processes(stack) -> list[psutil.Process]:
    """Every process of the stack now: the ones `up` started and all their descendants (the local SageMaker
    service's model servers among them)."""
    found = []
    for record in stack.state["processes"].values():
        leader = psutil.Process(record["pid"])
        found += [leader, *leader.children(recursive=True)]
    return found


def test_up_prints_the_ui_and_a_working_login(stack):
    assert stack.url in stack.up_output
    assert f"admin / {stack.password}" in stack.up_output
    import httpx

    assert httpx.get(stack.url).status_code == 200  # the UI's page
    refused = httpx.post(f"{stack.url}/auth/token", json={"username": "admin", "password": "wrong"})
    assert refused.status_code == 401
    with stack.api() as api:
        health = api.get("/monitor/health").json()
        assert {
            part: health[part]["status"] for part in ("metadatabase", "scheduler", "triggerer", "dag_processor")
        } == {"metadatabase": "healthy", "scheduler": "healthy", "triggerer": "healthy", "dag_processor": "healthy"}
        assert api.get("/dags/mnist_sweep").json()["is_paused"] is False
    # The connection that makes it local: SageMaker at the local SageMaker service, the rest at the local AWS.
    extra = json.loads(stack.state["connection"])["extra"]
    assert extra["endpoint_url"] == stack.state["aws_endpoint"]
    assert extra["service_config"] == {
        "sagemaker": {"endpoint_url": stack.state["sagemaker_endpoint"]},
        "sagemaker-runtime": {"endpoint_url": stack.state["sagemaker_runtime_endpoint"]},
    }


def test_everything_listens_on_loopback_only(stack):
    listening = [
        conn.laddr
        for process in stack_processes(stack)
        for conn in process.net_connections(kind="inet")
        if conn.status == psutil.CONN_LISTEN
    ]
    urls = {
        stack.url,
        stack.state["aws_endpoint"],
        stack.state["sagemaker_endpoint"],
        stack.state["sagemaker_runtime_endpoint"],
    }
    assert {f"http://{addr.ip}:{addr.port}" for addr in listening} >= urls
    assert {addr.ip for addr in listening} == {"127.0.0.1"}


def test_status_and_a_second_up(stack):
    before = {name: record["pid"] for name, record in stack.state["processes"].items()}
    assert set(before) == {"local-aws", "local-sagemaker", "api-server", "scheduler", "dag-processor", "triggerer"}
    status = stack.cli("status")
    assert status.returncode == 0, status.stdout + status.stderr
    for name, pid in before.items():
        assert name in status.stdout and str(pid) in status.stdout
    again = stack.cli("up", "--port", "0")
    assert again.returncode == 0, again.stderr
    assert stack.url in again.stdout
    assert {name: record["pid"] for name, record in stack.state["processes"].items()} == before


def test_airflow_waits_for_a_busy_database_rather_than_failing(stack):
    """SQLite lets one writer in at a time. A write lock held longer than Python's default busy timeout (5 s), as a
    restarted scheduler can hold it on a busy machine, makes the API wait, not answer 500 "Database error"."""
    import sqlite3
    import threading

    from cli.airflow_sqlite import BUSY_TIMEOUT_SECONDS

    held = 8.0
    assert 5.0 < held < BUSY_TIMEOUT_SECONDS
    database = sqlite3.connect(stack.paths.airflow_db, isolation_level=None, check_same_thread=False)
    with stack.api() as api:
        database.execute("BEGIN IMMEDIATE")  # the write lock, as a long write transaction holds it
        release = threading.Timer(held, database.rollback)
        release.start()
        try:
            started = time.monotonic()
            answer = api.patch("/dags/mnist_sweep", json={"is_paused": False})  # it writes (its audit log's row)
            waited = time.monotonic() - started
        finally:
            release.join()
            database.close()
    assert answer.status_code == 200, answer.text
    assert waited > held - 1, "the request waited for the lock"


def test_run_follows_a_sweep_and_its_endpoint_answers(stack, small_mnist, tmp_path):
    import io

    import numpy as np
    from PIL import Image

    from tasks.batch import default_input_uri
    from tasks.config import load_config
    from training.mnist_idx import MNIST_FILES, read_idx

    admin = stack.keys.admin
    alerts = subscribe_queue(stack.state["aws_endpoint"], stack.state["alert_topic_arn"], admin)
    # Digits waiting in the batch input: the new champion's asset event has mnist_batch_predict classify them.
    array = io.BytesIO()
    np.save(array, read_idx(small_mnist / MNIST_FILES["test_images"])[:30])
    bucket, prefix = default_input_uri(load_config()).removeprefix("s3://").split("/", 1)
    stack.client("s3").put_object(Bucket=bucket, Key=f"{prefix}waiting.npy", Body=array.getvalue())

    # Settings that learn the small digits in two short epochs, so the gate and the monitoring check pass.
    conf = {"mnist_mirror": str(small_mnist), "epochs": 2, "optimizer": "adam", "lr": 0.005, "batch_size": 32}
    result = stack.cli(
        "run", "--conf", json.dumps(conf), "--param", "hidden_channels=[4]", "--param", "smoke_requests=50", timeout=480
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    for task in ("train[0]", "gate", "deploy", "monitor", "report"):
        assert f"✓ {task} success" in output, task
    assert "Best: hidden_channels 4, test accuracy" in output
    # The sweep table, live while it ran: the member by its value, its job's state, its epochs and accuracy.
    assert re.search(r"hidden_channels=4 +│ Completed +│ 2 +│ \d+\.\d+% +│ manual", output), output
    assert "success in" in output.splitlines()[-1]
    run_id = re.search(r"Triggered mnist_sweep run (\S+):", output).group(1)
    with stack.api() as api:
        run = api.get(f"/dags/mnist_sweep/dagRuns/{run_id}").json()
    assert run["state"] == "success"
    assert run["conf"] == {**conf, "hidden_channels": [4], "smoke_requests": 50}
    # The run's page says how it went (the project's Airflow plugin writes the note as the run ends).
    assert run["note"].startswith("Winner: hidden_channels 4 (") and "passed its monitoring check" in run["note"]
    report = re.search(r"Report: (\S+)", output).group(1)
    assert "passed its monitoring check: it serves now" in Path(report).with_suffix(".md").read_text()

    # The endpoint the run deployed answers `predict` (and mostly right), and `status` lists it.
    images, labels = (
        read_idx(small_mnist / MNIST_FILES["test_images"])[:5],
        read_idx(small_mnist / MNIST_FILES["test_labels"])[:5],
    )
    paths = []
    for index, image in enumerate(images):
        paths.append(str(tmp_path / f"digit-{index}.png"))
        Image.fromarray(image).save(paths[-1])
    predicted = stack.cli("predict", *paths, "--json")
    assert predicted.returncode == 0, predicted.stdout + predicted.stderr
    answers = json.loads(predicted.stdout)
    assert [answer["image"] for answer in answers] == paths
    assert all(0 < answer["confidence"] <= 1 for answer in answers)
    assert sum(answer["digit"] == label for answer, label in zip(answers, labels, strict=True)) >= 4
    assert "endpoint mnist-classifier" in stack.cli("status").stdout

    # The registry holds the model as version 1, Approved by its check: the champion.
    models = stack.cli("models", "--json")
    assert models.returncode == 0, models.stdout + models.stderr
    [version] = json.loads(models.stdout)
    assert (version["version"], version["approval"], version["champion"]) == (1, "Approved", True)
    assert version["hidden_channels"] == 4 and version["run_id"] == run_id

    # The run took longer than this stack's deadline: the triggerer told the alert topic.
    assert int(re.search(r"success in (\d+) s", output).group(1)) > DEADLINE_SECONDS
    [late] = read_alerts(stack.state["aws_endpoint"], alerts, event="deadline_missed", run_id=run_id, key=admin)
    assert late["Subject"] == "MNIST: mnist_sweep run past its deadline"
    assert f"mnist_sweep run {run_id} is still running at its deadline" in late["Message"], late["Message"]


def wait_for_run(api, dag_id: str, run_type: str, timeout: float) -> dict:
    """The DAG's newest run of ``run_type`` once it has ended (or as it stands at the timeout)."""

    def newest() -> dict | None:
        runs = api.get(f"/dags/{dag_id}/dagRuns", params={"run_type": run_type, "order_by": "-run_after"}).json()
        return runs["dag_runs"][0] if runs["dag_runs"] else None

    found = wait_until(
        newest, lambda found: found and found["state"] in ("success", "failed"), timeout=timeout, interval=2, fail=False
    )
    assert found, f"no {run_type} run of {dag_id} within {timeout} s"
    return found


def test_a_failed_run_is_told_to_the_alert_topic(stack):
    alerts = subscribe_queue(stack.state["aws_endpoint"], stack.state["alert_topic_arn"], stack.keys.admin)
    result = stack.cli("run", "--param", "mnist_mirror=http://169.254.169.254/latest/", timeout=240)
    assert result.returncode == 1, result.stdout + result.stderr
    run_id = re.search(r"Triggered mnist_sweep run (\S+):", result.stdout).group(1)
    [alert] = read_alerts(
        stack.state["aws_endpoint"], alerts, timeout=90, event="run_failed", run_id=run_id, key=stack.keys.admin
    )
    assert alert["Subject"] == "MNIST: mnist_sweep run failed"
    message = alert["Message"]
    assert f"mnist_sweep run {run_id} failed (last task: download)." in message, message
    assert f"Run: {stack.url}/dags/mnist_sweep/runs/" in message
    with stack.api() as api:
        run = api.get(f"/dags/mnist_sweep/dagRuns/{run_id}").json()
    assert run["note"].startswith("Run failed: no model was selected"), run["note"]


def test_run_refuses_bad_conf_and_bad_params(stack):
    bad_json = stack.cli("run", "--conf", "{not json")
    assert bad_json.returncode == 2 and "--conf is not valid JSON" in bad_json.stdout
    refused = stack.cli("run", "--param", "hidden_channels=[0]")
    assert refused.returncode == 2 and "hidden_channels" in refused.stdout


def test_the_new_champion_had_the_batch_dag_classify_the_waiting_digits(stack):
    """The sweep's champion (test_run_follows_a_sweep...) is an event of the mnist_champion asset, which schedules
    mnist_batch_predict: the digits waiting in its default input, classified with version 1. (Checked here, a few
    tests after that sweep: the scheduler runs it meanwhile.)"""
    with stack.api() as api:
        batch = wait_for_run(api, "mnist_batch_predict", run_type="asset_triggered", timeout=180)
        assert batch["state"] == "success", batch
        summary = api.get(
            f"/dags/mnist_batch_predict/dagRuns/{batch['dag_run_id']}/taskInstances/summarize/xcomEntries/return_value"
        ).json()["value"]
    assert summary["images"] == 30 and summary["version"] == 1 and sum(summary["counts"].values()) == 30


def test_drift_in_the_captured_traffic_starts_a_retraining_run_that_says_why(stack, small_mnist):
    """The sweep deployed with capture on (capture_percentage 100 by default). This stack's reference is the small
    generated set's training split (its digits sit anywhere in the frame, so a hundred test digits repeated are not
    a sample of it): its training digits, with the smoke load's and predict's, are no drift; the same digits
    inverted are, and the drift's asset event starts a retraining run of mnist_sweep (this stack has
    retrain_on_drift), whose note says why."""
    import numpy as np

    from training.mnist_idx import MNIST_FILES, read_idx

    # Twice over: the few test digits sent before (the smoke load, predict) weigh too little to move the window.
    images = np.concatenate([read_idx(small_mnist / MNIST_FILES["train_images"])] * 2)
    clean = _drift_check(stack, images)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "no drift: No drift in " in clean.stdout, clean.stdout
    assert re.search(r"Report: s3://\S+/drift-runs/\S+/report/report.html \(on this machine: ", clean.stdout)
    drift = _drift_check(stack, 255 - images)
    assert drift.returncode == 0, drift.stdout + drift.stderr
    window = f"Drift in {len(images)} requests to mnist-classifier: "
    assert f"drift: {window}" in drift.stdout, drift.stdout
    with stack.api() as api:
        retraining = wait_for_run(api, "mnist_sweep", run_type="asset_triggered", timeout=600)
        checked = api.get("/dags/mnist_drift/dagRuns", params={"order_by": "-run_after"}).json()["dag_runs"][0]
    assert retraining["note"].startswith(f"Retraining because of drift: {window}"), retraining["note"]
    assert checked["note"].startswith(window) and "Asked for retraining" in checked["note"], checked["note"]


def _drift_check(stack, images):
    stack.invoke_all(images)
    return stack.cli("drift", timeout=300)


def test_down_leaves_no_process_behind_and_up_brings_back_the_champion(stack):
    """Also, the sweep a person paused in the UI is unpaused by the next `up` (which writes to the DAG only then)."""
    with stack.api() as api:
        assert api.patch("/dags/mnist_sweep", json={"is_paused": True}).json()["is_paused"] is True
    processes = stack_processes(stack)
    assert len(processes) > 5  # the scheduler's executor workers and the model servers are among them
    result = stack.down()
    assert result.returncode == 0, result.stderr
    _, alive = psutil.wait_procs(processes, timeout=1)
    assert [(p.pid, p.name()) for p in alive] == []
    status = stack.cli("status")
    assert status.returncode == 3
    assert "not running" in status.stdout

    # Up again: the local SageMaker service still holds the registry and the endpoint serves again, so the next
    # run's gate measures against the first run's model, its champion.
    again = stack.cli("up", "--port", "0")
    assert again.returncode == 0, again.stdout + again.stderr
    stack.stopped = False
    try:
        with stack.api() as api:
            assert api.get("/dags/mnist_sweep").json()["is_paused"] is False
        status = stack.cli("status")
        log = (stack.paths.logs / "local-sagemaker.log").read_text()[-4000:]
        assert re.search(r"endpoint mnist-classifier\s+│?\s*InService", status.stdout), status.stdout + log
        sagemaker = stack.client("sagemaker")
        # The newest Approved version: the drift's retraining run may have made a second.
        approved, *_ = sagemaker.list_model_packages(
            ModelPackageGroupName="mnist-classifier",
            ModelApprovalStatus="Approved",
            SortBy="CreationTime",
            SortOrder="Descending",
        )["ModelPackageSummaryList"]
        version = sagemaker.describe_model_package(ModelPackageName=approved["ModelPackageArn"])
        config_name = sagemaker.describe_endpoint(EndpointName="mnist-classifier")["EndpointConfigName"]
        variant = sagemaker.describe_endpoint_config(EndpointConfigName=config_name)["ProductionVariants"][0]
        served = sagemaker.describe_model(ModelName=variant["ModelName"])["PrimaryContainer"]["ModelDataUrl"]
        assert served == version["InferenceSpecification"]["Containers"][0]["ModelDataUrl"]
    finally:
        assert stack.down().returncode == 0
