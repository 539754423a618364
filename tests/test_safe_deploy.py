"""The whole DAG with `dag.test()`: train, select, gate, deploy, monitoring check, rollback, report.

Through the Amazon provider's operators and hooks, against the local SageMaker service (real training jobs on
small generated digits, real model servers) and moto server as S3 and CloudWatch: the code path that runs on AWS.
One sequence of runs on one endpoint:
1. a good model: trained, selected, deployed (created), passes the check: it becomes the champion, alarms exist;
2. a worse model: the gate refuses it against the champion: nothing deployed, the run succeeds, the report says why;
3. the same bad model let through the gate by its params: deployed blue/green, caught by the monitoring check
   (it answers wrongly), rolled back to run 1's model, which still answers; the run fails naming the threshold;
4. approval manual: a poor model is registered and waits for a person, who rejects it through the Airflow UI's
   endpoint (the Required Actions page's): Rejected with their reason, the champion still serves;
5. approval manual again, a good model: the person approves it with a comment: Approved, deployed, checked, the
   champion;
6. approval manual, no answer within approval_timeout (1 minute): the version stays PendingManualApproval, the run
   succeeds without deploying, its review task skipped saying why;
7. a person approves that version outside the UI (`mnist-pipeline approve 5`), and a deploy-only run serves it.
Every model the gate let through is a registry version; the champion is an Airflow Asset with its events.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import re
import tarfile
import threading
import time
from urllib.parse import quote

import boto3
import pytest
from botocore.exceptions import ClientError

from tasks.names import DAG_ID
from tests.helpers.alerts import read_alerts, subscribe_queue
from tests.helpers.dag_runs import configure, report_text, run_sweep, states, xcoms

# Minutes of runs one after another: `make test-long`, run by .ci/run.
pytestmark = [pytest.mark.long, pytest.mark.slow]

ENDPOINT = "safe-local"
# Learns the small digits in three short epochs: hidden_channels 16 reaches > 0.9, 2 stays below it.
GOOD = {"epochs": 3, "optimizer": "adam", "lr": 0.005, "batch_size": 32, "hidden_channels": [2, 16]}
# The seed preset's settings (SGD, lr 0.01, momentum 0.5) for one epoch stay far below 0.9 on 600 images.
BAD = {"epochs": 1, "hidden_channels": [2]}
# A busy 2-core test machine must not fail a healthy model on latency (the limits have unit tests of their own).
RELAXED_LATENCY = {"max_p99_latency_ms": 20_000, "max_model_latency_ms": 10_000}
REVIEWER = "reviewer"  # the Airflow user who answers the review requests
UI = "http://airflow.test:8080"  # the UI's address ([api] base_url), for the links the request and the alert give
# The form's approval_timeout at its minimum (minutes): the run that nobody answers waits this long.
SHORTEST_APPROVAL_TIMEOUT = 1


@contextlib.contextmanager
def reviewing(answer: str | None, comment: str = ""):
    """While the block runs a sweep whose review waits for a person, answer it as the UI does: ``answer`` (Approve,
    Reject) and ``comment`` through the Core API's endpoint that the Required Actions page calls, as user REVIEWER;
    or None, no answer: once its approval_timeout has passed, the scheduler's sweep of timed-out requests (dag.test()
    runs no scheduler, so this plays its part). Yields what the reviewer saw: the request (``request``, the API's
    hitlDetails), the run's report at that moment (``report``) and the task's deadline (``trigger_timeout``)."""
    seen, done, failures = {}, threading.Event(), []

    def review() -> None:
        try:
            seen.update(_review(answer, comment, done))
        except BaseException as error:  # reported by the test, and the waiting run is let go
            failures.append(error)
            _fail_waiting_review()

    thread = threading.Thread(target=review, name="reviewer", daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        done.set()
        thread.join(timeout=60)
    if failures:
        raise failures[0]


def _waiting_review(done: threading.Event):
    """The review task instance that waits for input, once one does (None if ``done`` first)."""
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import select

    while not done.is_set():
        with create_session() as session:
            waiting = session.scalars(
                select(TaskInstance).where(
                    TaskInstance.dag_id == DAG_ID,
                    TaskInstance.task_id == "review",
                    TaskInstance.state == "awaiting_input",
                )
            ).first()
            if waiting is not None:
                session.expunge(waiting)
                return waiting
        time.sleep(0.5)
    return None


def _review(answer: str | None, comment: str, done: threading.Event) -> dict:
    from airflow.api_fastapi.app import get_auth_manager, init_auth_manager
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser
    from airflow.api_fastapi.core_api.routes.public.hitl import task_instances_hitl_router
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from tasks.config import load_config
    from tasks.report import run_directory

    waiting = _waiting_review(done)
    if waiting is None:
        raise AssertionError("the run ended before its review asked for anyone's approval")
    # Airflow's own endpoint, authenticated as Airflow authenticates the UI's requests (the rest of the API, seconds
    # to build, is left out).
    api = FastAPI()
    api.include_router(task_instances_hitl_router, prefix="/api/v2")
    init_auth_manager(api)
    token = get_auth_manager().generate_jwt(SimpleAuthManagerUser(username=REVIEWER, role="admin"))
    client = TestClient(api, headers={"Authorization": f"Bearer {token}"})
    url = f"/api/v2/dags/{DAG_ID}/dagRuns/{quote(waiting.run_id, safe='')}/taskInstances/review/-1/hitlDetails"
    request = client.get(url)
    assert request.status_code == 200, request.text
    seen = {
        "request": request.json(),
        "trigger_timeout": waiting.trigger_timeout,
        "report": (run_directory(load_config(), waiting.run_id) / "report" / "report.md").read_text(),
    }
    if answer is not None:
        answered = client.patch(url, json={"chosen_options": [answer], "params_input": {"comment": comment}})
        assert answered.status_code == 200, answered.text
        return seen
    # No answer: the deadline the request was given (checked by the test) passes. Waiting out even the form's
    # shortest timeout would cost the suite a minute, so the clock is moved instead: the request's deadline becomes
    # the present, and the scheduler's sweep of timed-out requests runs as it does on every loop.
    from airflow.jobs.job import Job
    from airflow.jobs.scheduler_job_runner import SchedulerJobRunner
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import update

    with create_session() as session:
        session.execute(
            update(TaskInstance)
            .where(TaskInstance.id == waiting.id)
            .values(trigger_timeout=datetime.datetime.now(datetime.UTC))
        )
    time.sleep(0.01)  # the sweep takes deadlines strictly before its own present
    SchedulerJobRunner(job=Job(), executors=[]).check_awaiting_input_timeouts()
    return seen


def _fail_waiting_review() -> None:
    """A review nobody will answer (the reviewer's part of the test failed) fails, so that its run ends."""
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import update

    with create_session() as session:
        session.execute(
            update(TaskInstance)
            .where(
                TaskInstance.dag_id == DAG_ID, TaskInstance.task_id == "review", TaskInstance.state == "awaiting_input"
            )
            .values(state="failed")
        )


def served_accuracy(url: str, deployment: dict, images, labels) -> float:
    """The accuracy of what the endpoint serves now, through boto3's sagemaker-runtime."""
    runtime = boto3.client("sagemaker-runtime", endpoint_url=url)
    answer = runtime.invoke_endpoint(
        EndpointName=deployment["endpoint_name"],
        ContentType="application/json",
        Body=json.dumps({"instances": images.tolist()}),
    )
    predicted = [prediction["label"] for prediction in json.loads(answer["Body"].read())["predictions"]]
    return sum(map(int.__eq__, predicted, labels.tolist())) / len(predicted)


def serving_config(url: str) -> str:
    return boto3.client("sagemaker", endpoint_url=url).describe_endpoint(EndpointName=ENDPOINT)["EndpointConfigName"]


@pytest.fixture(scope="module")
def local_runs(local_sagemaker, local_aws, small_mnist, airflow_db, tmp_path_factory, local_sagemaker_runtime):
    from cli.main import main
    from tasks.config import load_config
    from tasks.registry import champion
    from training.mnist_idx import load_mnist

    test = load_mnist(small_mnist)
    seen = {}

    def observe(name: str, run) -> None:
        """What serves after run ``name``: its config, the champion, the accuracy of its answers on the test set."""
        serving = serving_config(local_sagemaker)
        seen[name] = {
            "serving": serving,
            "champion": champion(load_config(), ENDPOINT),
            "accuracy": served_accuracy(
                local_sagemaker_runtime, {"endpoint_name": ENDPOINT}, test["test_images"], test["test_labels"]
            ),
        }
        return run

    with pytest.MonkeyPatch.context() as patch:
        data = configure(patch, tmp_path_factory.mktemp("safe-local"), small_mnist, "safe-local", local_aws)
        topic = boto3.client("sns", endpoint_url=local_aws).create_topic(Name="safe-local-alerts")["TopicArn"]
        patch.setenv("MNIST_PIPELINE_ALERT_TOPIC_ARN", topic)
        patch.setenv("AIRFLOW__API__BASE_URL", UI)
        alerts = subscribe_queue(local_aws, topic)
        approvals = subscribe_queue(local_aws, topic)  # a queue of its own: reading one queue drops what it skips
        common = {**data, **RELAXED_LATENCY, "endpoint_name": ENDPOINT, "metrics_timeout": 120}
        try:
            deployed = observe("deployed", run_sweep({**common, **GOOD}))
            # min_test_accuracy 0: the champion, not the floor, is what refuses the model.
            refused = observe("refused", run_sweep({**common, **BAD, "min_test_accuracy": 0.0}))
            # A long bake: the check runs inside it, and its failure stops the update there.
            let_through = {
                **common,
                **BAD,
                "min_test_accuracy": 0.0,
                "accuracy_tolerance": 1.0,
                "smoke_requests": 50,
                "bake_seconds": 600,
            }
            rolled_back = observe("rolled_back", run_sweep(let_through))
            # min_test_accuracy 0, tolerance 1: the gate lets it through, a person decides.
            manual = {**common, "approval": "manual", "min_test_accuracy": 0.0, "accuracy_tolerance": 1.0}
            reviews = {}
            with reviewing("Reject", "  Misreads\n sevens  ") as reviews["rejected"]:
                rejected = observe("rejected", run_sweep({**manual, **BAD}))
            with reviewing("Approve", "Looks good; per-digit accuracy checked") as reviews["approved"]:
                approved = observe(
                    "approved", run_sweep({**manual, **GOOD, "hidden_channels": [16], "bake_seconds": 0})
                )
            with reviewing(None) as reviews["timed_out"]:
                timed_out = run_sweep(
                    {**manual, **GOOD, "hidden_channels": [16], "approval_timeout": SHORTEST_APPROVAL_TIMEOUT}
                )
            approved_outside = main(["approve", "5", "--endpoint", ENDPOINT, "--reason", "reviewed by the test"])
            deploy_only = run_sweep({**common, "deploy_only": True, "bake_seconds": 0})
            yield {
                "config": load_config(),
                "deployed": deployed,
                "refused": refused,
                "rolled_back": rolled_back,
                "rejected": rejected,
                "approved": approved,
                "timed_out": timed_out,
                "reviews": reviews,
                "approved_outside": approved_outside,
                "deploy_only": deploy_only,
                "alerts": alerts,
                "approvals": approvals,
                "seen": seen,
            }
        finally:
            sagemaker = boto3.client("sagemaker", endpoint_url=local_sagemaker)
            with contextlib.suppress(ClientError):
                sagemaker.delete_endpoint(EndpointName=ENDPOINT)


def test_a_good_model_is_trained_selected_deployed_and_passes_the_check(
    local_runs, local_aws, local_sagemaker, small_mnist, local_sagemaker_runtime
):
    from tasks.deployment import endpoint_config_name

    run = local_runs["deployed"]
    found = states(run)
    assert str(run.state) == "success", found
    assert found["train"] == ["success"] * 2
    # Each sweep member is named by its value in the UI (map_index_template), not by its map index.
    names = sorted(ti.rendered_map_index for ti in run.get_task_instances() if ti.task_id == "train")
    assert names == ["hidden_channels=16", "hidden_channels=2"]
    ran = ("gate", "register", "candidate", "deploy", "monitor", "undo_unchecked", "report")
    assert {task: found[task] for task in ran} == {task: ["success"] for task in ran}
    assert found["review"] == ["skipped"]  # approval auto: the monitoring check decides

    # One model.tar.gz per job in S3; the selection picked the most accurate.
    s3 = boto3.client("s3", endpoint_url=local_aws)
    accuracies = {}
    sagemaker = boto3.client("sagemaker", endpoint_url=local_sagemaker)
    [requests] = xcoms(run.run_id, "training_requests")
    for request, result in zip(requests, xcoms(run.run_id, "train"), strict=True):
        # What SageMaker recorded of each job is the request as the DAG built it.
        recorded = sagemaker.describe_training_job(TrainingJobName=request["TrainingJobName"])
        for key in ("HyperParameters", "InputDataConfig", "ResourceConfig", "RoleArn", "ExperimentConfig"):
            assert recorded[key] == request[key], key
        job = result["Training"]
        assert job["TrainingJobStatus"] == "Completed" and job["HyperParameters"]["optimizer"] == "adam"
        bucket, key = job["ModelArtifacts"]["S3ModelArtifacts"][5:].split("/", 1)
        with tarfile.open(fileobj=io.BytesIO(s3.get_object(Bucket=bucket, Key=key)["Body"].read())) as model:
            assert {"model.pth", "model_config.json", "code/inference.py"} <= set(model.getnames())
        final = {metric["MetricName"]: metric["Value"] for metric in job["FinalMetricDataList"]}
        accuracies[int(job["HyperParameters"]["hidden_channels"])] = final["test:accuracy"] / 100
    [best] = xcoms(run.run_id, "select_best")
    assert best["test_accuracy"] == max(accuracies.values()) >= 0.9
    assert best["hidden_channels"] == min(hc for hc, acc in accuracies.items() if acc == best["test_accuracy"])
    assert [trial["hidden_channels"] for trial in best["trials"]] == [2, 16]

    [decision] = xcoms(run.run_id, "gate")
    assert decision["deploy"] is True and decision["reason"].endswith("no champion")

    # Created, under names derived from the run; it serves the best model, which scores on the test set what its
    # training job scored.
    [deployment] = xcoms(run.run_id, "deploy")
    assert deployment["created"] is True and deployment["model_data_url"] == best["model_data_url"]
    assert deployment["endpoint_config_name"] == endpoint_config_name(ENDPOINT, run.run_id)
    assert local_runs["seen"]["deployed"]["serving"] == deployment["endpoint_config_name"]
    assert local_runs["seen"]["deployed"]["accuracy"] == pytest.approx(best["test_accuracy"], abs=0.011)
    model = sagemaker.describe_model(ModelName=best["training_job_name"])
    assert model["PrimaryContainer"]["ModelDataUrl"] == best["model_data_url"]
    assert model["PrimaryContainer"]["Image"].endswith("/pytorch-inference:2.6-cpu-py312")
    assert model["PrimaryContainer"]["Environment"]["SAGEMAKER_PROGRAM"] == "inference.py"
    # The experiment of the DAG and the trial of the run record every job, as the seed tracked its sweep.
    trial = requests[0]["ExperimentConfig"]["TrialName"]
    components = sagemaker.list_trial_components(TrialName=trial)["TrialComponentSummaries"]
    assert sorted(c["TrialComponentName"] for c in components) == sorted(
        f"{request['TrainingJobName']}-aws-training-job" for request in requests
    )

    # Passed: the smoke load and CloudWatch figures, the new champion, the alarms.
    [check] = xcoms(run.run_id, "monitor")
    assert check["passed"] is True and check["failures"] == []
    assert check["load"]["requests"] == 100 and check["load"]["errors"] == 0  # all 100 held-out images
    assert check["cloudwatch"]["invocations"] >= 100
    current = local_runs["seen"]["deployed"]["champion"]
    assert current["endpoint_config_name"] == deployment["endpoint_config_name"]
    assert current["test_accuracy"] == best["test_accuracy"] and current["version"] == 1
    alarms = boto3.client("cloudwatch", endpoint_url=local_aws).describe_alarms(AlarmNamePrefix=f"{ENDPOINT}-")
    assert (
        sorted(alarm["AlarmName"] for alarm in alarms["MetricAlarms"])
        == sorted(check["alarms"])
        == [
            f"{ENDPOINT}-invocation-5xx-errors",
            f"{ENDPOINT}-model-latency-p99",
        ]
    )

    report = report_text(run.run_id)
    assert "passed its monitoring check: it serves now, Approved (the champion)" in report
    assert f"**hidden_channels {best['hidden_channels']}** won" in report


def test_the_gate_refuses_a_model_worse_than_the_champion_and_the_run_succeeds(local_runs, local_sagemaker):
    run, first = local_runs["refused"], local_runs["deployed"]
    found = states(run)
    assert str(run.state) == "success", found
    assert found["gate"] == ["success"] and found["report"] == ["success"]
    assert found["register"] == found["review"] == ["skipped"]  # what the gate refused is not registered
    assert found["deploy"] == ["skipped"] and found["monitor"] == ["skipped"]

    [decision] = xcoms(run.run_id, "gate")
    [champion] = xcoms(first.run_id, "select_best")
    assert decision["deploy"] is False
    assert decision["champion_accuracy"] == champion["test_accuracy"]
    assert f"is below the champion's {champion['test_accuracy']:.4f} minus tolerance 0.0050" in decision["reason"]
    assert f"the gate refused it ({decision['reason']}): not registered" in report_text(run.run_id)
    [choice] = xcoms(run.run_id, "candidate")
    assert choice["deploy"] is False and "registered no version" in choice["reason"]
    [deployed] = xcoms(first.run_id, "deploy")
    assert local_runs["seen"]["refused"]["serving"] == deployed["endpoint_config_name"]


def test_a_bad_model_is_caught_rolled_back_and_fails_the_run_while_the_champion_answers(
    local_runs, small_mnist, local_sagemaker, local_sagemaker_runtime, local_aws
):
    from tasks.deployment import endpoint_config_name

    run, first = local_runs["rolled_back"], local_runs["deployed"]
    found = states(run)
    assert str(run.state) == "failed", found
    assert found["gate"] == ["success"] and found["deploy"] == ["success"]
    assert found["monitor"] == ["failed"] and found["report"] == ["success"]  # the report still ran

    [bad] = xcoms(run.run_id, "deploy")
    [good] = xcoms(first.run_id, "deploy")
    # A new config for this run (blue/green from run 1's), rolled back to run 1's.
    assert bad["endpoint_config_name"] == endpoint_config_name(ENDPOINT, run.run_id) != good["endpoint_config_name"]
    assert bad["created"] is False and bad["previous_endpoint_config_name"] == good["endpoint_config_name"]
    [check] = xcoms(run.run_id, "monitor")
    assert check["passed"] is False
    assert re.match(r"live accuracy 0\.\d{4} < 0\.9000$", check["failures"][0]), check["failures"]
    # Stopped in its bake: its rollback alarm set to ALARM, the old fleet (kept meanwhile) took the traffic back.
    assert check["rollback"] == {
        "action": "restored",
        "endpoint_name": ENDPOINT,
        "endpoint_config_name": good["endpoint_config_name"],
        "by": f"alarm {ENDPOINT}-invocation-5xx-errors",
    }
    report = report_text(run.run_id)
    assert "**failed its monitoring check** and was rolled back (restored)" in report
    assert f"- failed: {check['failures'][0]}" in report

    # Nothing lost: run 1's model serves and answers as before, and it is still the champion.
    after = local_runs["seen"]["rolled_back"]
    assert after["serving"] == good["endpoint_config_name"]
    [best] = xcoms(first.run_id, "select_best")
    assert after["accuracy"] == pytest.approx(best["test_accuracy"], abs=0.011)
    assert (
        after["champion"]["endpoint_config_name"] == good["endpoint_config_name"] and after["champion"]["version"] == 1
    )

    # The people subscribed to the alert topic heard of it: the run, what failed, the rollback, the report.
    [alert] = read_alerts(local_aws, local_runs["alerts"], event="check_failed", run_id=run.run_id)
    assert alert["Subject"] == f"MNIST: check failed on {ENDPOINT}, rolled back"
    message = alert["Message"]
    assert f"run {run.run_id}" in message and f"- {check['failures'][0]}" in message
    assert f"Rollback: restored to {good['endpoint_config_name']}." in message
    assert re.search(r"Smoke load: live accuracy 0\.\d+, p99 ms [\d.]+, errors 0, requests 50\.", message), message
    assert re.search(rf"Report: {local_runs['config'].s3_root}/runs/[^/\s]+/report/report\.html", message), message


def test_each_run_ends_with_a_note_that_says_how_it_went(local_runs):
    """The paragraph the project's Airflow plugin writes as a run's note, from these runs' own results (dag.test()
    loads no plugin: test_stack reads the note itself, on the run's page)."""
    from ui.run_note import TASKS, summary

    def note(run) -> str:
        return summary({task: next(iter(xcoms(run.run_id, task)), None) for task in TASKS}, str(run.state))

    deployed, refused, rolled_back, rejected, approved, timed_out, deploy_only = (
        note(local_runs[name])
        for name in ("deployed", "refused", "rolled_back", "rejected", "approved", "timed_out", "deploy_only")
    )
    assert re.match(
        r"Winner: hidden_channels 16 \(\S+-hc16-\w+\), test accuracy \d+\.\d\d%\. Deployed version 1 to "
        rf"{ENDPOINT} \(\S+\); it passed its monitoring check \(live accuracy \d+\.\d%, p99 \d+\.\d ms\) "
        r"and serves now\. Report: s3://\S+/report/report\.html \(on this machine: /\S+\)\.$",
        deployed,
    ), deployed
    assert "Refused by the gate: best test accuracy" in refused and "below the champion's" in refused, refused
    assert "Not deployed: this run registered no version" in refused, refused
    assert f"Not deployed: version 3 was rejected (Rejected by {REVIEWER} in the Airflow UI at " in rejected, rejected
    assert f"Deployed version 4 to {ENDPOINT}" in approved and "passed its monitoring check" in approved, approved
    assert "Not deployed: version 5 awaits a person's approval (mnist-pipeline approve 5)." in timed_out, timed_out
    assert deploy_only.startswith(f"Deploy-only run. Deployed version 5 to {ENDPOINT}"), deploy_only
    assert f"Deployed to {ENDPOINT}, then FAILED its monitoring check (live accuracy" in rolled_back, rolled_back
    assert "rollback: restored." in rolled_back


def test_what_the_gate_lets_through_is_registered_and_the_check_approves_or_rejects_it(local_runs, local_sagemaker):
    """The registry group named after the endpoint: run 1's model Approved (it passed and serves), run 3's Rejected
    (it failed its check); run 2's, refused by the gate, never became a version; the manual runs' as their reviewer
    (or, for the last, `mnist-pipeline approve`) decided."""
    sagemaker = boto3.client("sagemaker", endpoint_url=local_sagemaker)
    versions = sagemaker.list_model_packages(
        ModelPackageGroupName=ENDPOINT, SortBy="CreationTime", SortOrder="Ascending"
    )["ModelPackageSummaryList"]
    assert [v["ModelApprovalStatus"] for v in versions] == ["Approved", "Rejected", "Rejected", "Approved", "Approved"]
    [register] = xcoms(local_runs["deployed"].run_id, "register")
    [best] = xcoms(local_runs["deployed"].run_id, "select_best")
    assert register == versions[0]["ModelPackageArn"]
    approved = sagemaker.describe_model_package(ModelPackageName=register)
    assert approved["InferenceSpecification"]["Containers"][0]["ModelDataUrl"] == best["model_data_url"]
    metadata = approved["CustomerMetadataProperties"]
    assert (
        metadata["test_accuracy"] == f"{best['test_accuracy']:.6f}"
        and metadata["training_job"] == best["training_job_name"]
    )
    assert metadata["run_id"] == local_runs["deployed"].run_id and len(metadata["dataset_sha256"]) == 64
    assert json.loads(metadata["hyperparameters"])["hidden_channels"] == "16"
    per_class = json.loads(metadata["per_class_accuracy"])
    assert len(per_class) == 10 and all(0 <= accuracy <= 1 for accuracy in per_class)
    assert "passed its monitoring check" in approved["ApprovalDescription"]
    rejected = sagemaker.describe_model_package(ModelPackageName=versions[1]["ModelPackageArn"])
    assert "live accuracy" in rejected["ApprovalDescription"]


def _described(local_sagemaker: str, arn: str) -> dict:
    return boto3.client("sagemaker", endpoint_url=local_sagemaker).describe_model_package(ModelPackageName=arn)


def _decided_in_the_ui(status: str, run_id: str, comment: str) -> str:
    """The ApprovalDescription a reviewer's answer leaves on the version, as a pattern."""
    return rf"{status} by {REVIEWER} in the Airflow UI at \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d UTC \({DAG_ID} run {re.escape(run_id)}\): {re.escape(comment)}"


def test_the_request_shows_the_reviewer_what_they_need_and_the_topic_hears_of_it(local_runs, local_aws):
    """What a reviewer sees under Browse → Required Actions (the API's view of the request the UI renders): the
    candidate against the champion, digit by digit, the hyperparameters, the version ARN and the run's report, which
    is there already; the options and the form; and the alert topic's message with the link that answers it."""
    run, first = local_runs["rejected"], local_runs["deployed"]
    seen = local_runs["reviews"]["rejected"]
    request = seen["request"]
    [register] = xcoms(run.run_id, "register")
    [candidate] = xcoms(run.run_id, "select_best")
    [champion] = xcoms(first.run_id, "select_best")
    ours, theirs = candidate["test_accuracy"], champion["test_accuracy"]
    assert request["subject"] == (
        f"Approve version 3 of {ENDPOINT}? Test accuracy {100 * ours:.2f}% (champion version 1: {100 * theirs:.2f}%)"
    )
    assert request["options"] == ["Approve", "Reject"] and request["multiple"] is False and not request["defaults"]
    assert list(request["params"]) == ["comment"]  # the one form field: the reviewer's words
    body = request["body"]
    assert (
        f"| **all digits (test accuracy)** | {100 * ours:.2f}% | {100 * theirs:.2f}% | {100 * (ours - theirs):+.2f} |"
        in body
    )
    for digit, (mine, other) in enumerate(
        zip(candidate["per_class_accuracy"], champion["per_class_accuracy"], strict=True)
    ):
        assert f"| digit {digit} | {100 * mine:.2f}% | {100 * other:.2f}% | {100 * (mine - other):+.2f} |" in body
    assert f"- **Version ARN**: `{register}`" in body
    assert "`epochs=1`" in body and "`hidden_channels=2`" in body  # this run's hyperparameters
    link = f"{UI}/mnist-reports/{DAG_ID}/{quote(run.run_id, safe='')}/report/report.html"
    assert f"[open]({link})" in body
    assert "approval_timeout, 1440 minutes" in body  # the form's default
    # The report the link opens was written before the request: the trials, and the version waiting.
    assert "## Trials" in seen["report"] and "**Awaiting approval**: Version 3 waits for a reviewer" in seen["report"]
    # The request waits as long as the form said (a day by default), from when it was made.
    waited = seen["trigger_timeout"] - datetime.datetime.fromisoformat(request["created_at"])
    assert abs(waited - datetime.timedelta(days=1)) < datetime.timedelta(minutes=1), waited

    [alert] = read_alerts(local_aws, local_runs["approvals"], event="approval_waiting", run_id=run.run_id)
    assert alert["Subject"] == f"MNIST: version 3 of {ENDPOINT} awaits approval"
    message = alert["Message"]
    assert f"test accuracy {100 * ours:.2f}% (the champion's: {100 * theirs:.2f}%)" in message
    answer = f"{UI}/dags/{DAG_ID}/runs/{run.run_id}/tasks/review/required_actions?map_index=-1"
    assert f"Approve or reject it: {answer}\n" in message, message
    assert "it stays PendingManualApproval and is not deployed" in message


def test_a_person_rejects_a_version_in_the_ui_and_the_champion_keeps_serving(local_runs, local_sagemaker):
    run, first = local_runs["rejected"], local_runs["deployed"]
    found = states(run)
    assert str(run.state) == "success", found
    assert found["review"] == ["success"]
    assert found["candidate"] == ["success"] and found["deploy"] == ["skipped"] and found["monitor"] == ["skipped"]
    [register] = xcoms(run.run_id, "register")
    described = _described(local_sagemaker, register)
    # Recorded on the version: who, when, and what they wrote (its white space folded).
    assert described["ModelApprovalStatus"] == "Rejected"
    assert re.fullmatch(_decided_in_the_ui("Rejected", run.run_id, "Misreads sevens"), described["ApprovalDescription"])
    [review] = xcoms(run.run_id, "review")
    assert (review["answer"], review["by"], review["comment"], review["status"]) == (
        "Reject",
        REVIEWER,
        "Misreads sevens",
        "Rejected",
    )
    [choice] = xcoms(run.run_id, "candidate")
    assert (
        choice["deploy"] is False and choice["reason"] == f"version 3 was rejected ({described['ApprovalDescription']})"
    )
    # Run 1's model, the champion, still serves.
    [deployed] = xcoms(first.run_id, "deploy")
    after = local_runs["seen"]["rejected"]
    assert after["serving"] == deployed["endpoint_config_name"] and after["champion"]["version"] == 1
    report = report_text(run.run_id)
    assert f"## Approval\n\n**Rejected**: {described['ApprovalDescription']}" in report


def test_a_person_approves_a_version_in_the_ui_and_it_is_deployed_and_checked(local_runs, local_sagemaker):
    run = local_runs["approved"]
    found = states(run)
    assert str(run.state) == "success", found
    assert {task: found[task] for task in ("review", "candidate", "deploy", "monitor", "report")} == {
        task: ["success"] for task in ("review", "candidate", "deploy", "monitor", "report")
    }
    [register] = xcoms(run.run_id, "register")
    described = _described(local_sagemaker, register)
    comment = "Looks good; per-digit accuracy checked"
    # Approved with the reviewer's words, which its passed check keeps.
    assert described["ModelApprovalStatus"] == "Approved"
    assert re.fullmatch(_decided_in_the_ui("Approved", run.run_id, comment), described["ApprovalDescription"])
    [choice] = xcoms(run.run_id, "candidate")
    assert choice["model"]["model_package_arn"] == register and choice["model"]["version"] == 4
    assert choice["reason"] == f"this run's model, version 4, approved by a person ({described['ApprovalDescription']})"
    [check] = xcoms(run.run_id, "monitor")
    assert check["passed"] is True
    after = local_runs["seen"]["approved"]
    assert after["champion"]["version"] == 4 and after["serving"] == check["endpoint_config_name"]
    [best] = xcoms(run.run_id, "select_best")
    assert after["accuracy"] == pytest.approx(best["test_accuracy"], abs=0.011)
    report = report_text(run.run_id)
    assert f"**Approved**: {described['ApprovalDescription']}" in report
    assert "passed its monitoring check: it serves now, Approved (the champion)" in report


def test_no_answer_in_time_leaves_the_version_pending_then_approved_outside_a_deploy_only_run_serves_it(
    local_runs, local_sagemaker
):
    from tasks.registry import champion

    timed_out, deploy_only = local_runs["timed_out"], local_runs["deploy_only"]
    found = states(timed_out)
    # Neither failed nor deployed: the review skipped, saying why.
    assert str(timed_out.state) == "success", found
    assert found["review"] == ["skipped"] and found["candidate"] == ["success"]
    assert found["deploy"] == ["skipped"] and found["monitor"] == ["skipped"]
    waited = local_runs["reviews"]["timed_out"]
    assert "approval_timeout, 1 minute)" in waited["request"]["body"]
    deadline = waited["trigger_timeout"] - datetime.datetime.fromisoformat(waited["request"]["created_at"])
    assert abs(deadline - datetime.timedelta(minutes=SHORTEST_APPROVAL_TIMEOUT)) < datetime.timedelta(seconds=10)
    [review] = xcoms(timed_out.run_id, "review")
    why = (
        "No answer within 1 minute (approval_timeout): version 5 stays PendingManualApproval and is not deployed; "
        "`mnist-pipeline approve 5` and a deploy-only run can serve it."
    )
    assert review["timed_out"] is True and review["summary"] == why
    [register] = xcoms(timed_out.run_id, "register")
    [choice] = xcoms(timed_out.run_id, "candidate")
    assert (
        choice["deploy"] is False
        and choice["reason"] == "version 5 awaits a person's approval (mnist-pipeline approve 5)"
    )
    report = report_text(timed_out.run_id)
    assert f"**No answer**: {why}" in report and "nothing deployed: version 5 awaits a person's approval" in report

    # `mnist-pipeline approve 5` said yes; the deploy-only run trained nothing and served version 5.
    assert local_runs["approved_outside"] == 0
    found = states(deploy_only)
    assert str(deploy_only.state) == "success", found
    trained = ("download", "validate", "upload", "training_requests", "train", "tune", "select_best", "gate")
    for task in (*trained, "register", "review"):
        assert set(found[task]) == {"skipped"}, task
    assert {task: found[task] for task in ("candidate", "deploy", "monitor", "report")} == {
        task: ["success"] for task in ("candidate", "deploy", "monitor", "report")
    }
    [choice] = xcoms(deploy_only.run_id, "candidate")
    assert choice["model"]["model_package_arn"] == register and choice["model"]["version"] == 5
    assert choice["reason"].startswith(f"version 5 (from run {timed_out.run_id}), approved since the champion")
    current = champion(local_runs["config"], ENDPOINT)
    assert current["version"] == 5 and serving_config(local_sagemaker) == current["endpoint_config_name"]
    assert (
        _described(local_sagemaker, register)["ApprovalDescription"] == "reviewed by the test"
    )  # a person's words stay
    report = report_text(deploy_only.run_id)
    assert report.startswith("# Deployment report") and "Deploy-only run: version 5" in report


def test_the_champion_is_an_asset_whose_events_say_which_version(local_runs):
    """Each passed check is an event of the mnist_champion asset (what schedules mnist_batch_predict); each upload one
    of mnist_dataset."""
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    names = ("deployed", "refused", "rolled_back", "rejected", "approved", "timed_out", "deploy_only")
    runs = {local_runs[name].run_id: name for name in names}
    with create_session() as session:
        rows = session.execute(
            select(AssetModel.name, AssetEvent.source_run_id, AssetEvent.extra)
            .join(AssetEvent, AssetEvent.asset_id == AssetModel.id)
            .where(AssetEvent.source_run_id.in_(runs))
        ).all()
    champions = sorted((runs[run], extra["version"]) for name, run, extra in rows if name == "mnist_champion")
    assert champions == [("approved", 4), ("deploy_only", 5), ("deployed", 1)]
    datasets = {
        runs[run] for name, run, extra in rows if name == "mnist_dataset" and "/datasets/mnist/" in extra["uri"]
    }
    assert datasets == set(names) - {"deploy_only"}
