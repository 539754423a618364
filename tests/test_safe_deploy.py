"""The whole DAG with `dag.test()`: train, select, gate, deploy, monitoring check, rollback, report.

Through the Amazon provider's operators and hooks, against the local SageMaker service (real training jobs on
small generated digits, real model servers) and moto server as S3 and CloudWatch: the code path that runs on AWS.
One sequence of runs on one endpoint:
1. a good model: trained, selected, deployed (created), passes the check: it becomes the champion, alarms exist;
2. a worse model: the gate refuses it against the champion: nothing deployed, the run succeeds, the report says why;
3. the same bad model let through the gate by its params: deployed blue/green, caught by the monitoring check
   (it answers wrongly), rolled back to run 1's model, which still answers; the run fails naming the threshold;
4. approval manual: a good model is registered, and waits for a person; nothing is deployed;
5. a person approves it (`mnist-pipeline approve 3`), and a deploy-only run serves it: it is the champion.
Every model the gate let through is a registry version; the champion is an Airflow Asset with its events.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import tarfile

import boto3
import pytest
from botocore.exceptions import ClientError

from tests.alerts import read_alerts, subscribe_queue
from tests.dag_runs import configure, report_text, run_sweep, states, xcoms

ENDPOINT = "safe-local"
# Learns the small digits in three short epochs: hidden_channels 16 reaches > 0.9, 2 stays below it.
GOOD = {"epochs": 3, "optimizer": "adam", "lr": 0.005, "batch_size": 32, "hidden_channels": [2, 16]}
# The seed's settings for one epoch: far below 0.9 on 600 images (about 0.1).
BAD = {"epochs": 1, "hidden_channels": [2]}
# A busy 2-core test machine must not fail a healthy model on latency (the limits have unit tests of their own).
RELAXED_LATENCY = {"max_p99_latency_ms": 20_000, "max_model_latency_ms": 10_000}


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
        seen[name] = {"serving": serving, "champion": champion(load_config(), ENDPOINT),
                      "accuracy": served_accuracy(local_sagemaker_runtime, {"endpoint_name": ENDPOINT},
                                                  test["test_images"], test["test_labels"])}  # fmt: skip
        return run

    with pytest.MonkeyPatch.context() as patch:
        data = configure(patch, tmp_path_factory.mktemp("safe-local"), small_mnist, "safe-local", local_aws)
        topic = boto3.client("sns", endpoint_url=local_aws).create_topic(Name="safe-local-alerts")["TopicArn"]
        patch.setenv("MNIST_PIPELINE_ALERT_TOPIC_ARN", topic)
        alerts = subscribe_queue(local_aws, topic)
        common = {**data, **RELAXED_LATENCY, "endpoint_name": ENDPOINT, "metrics_timeout": 120}
        try:
            deployed = observe("deployed", run_sweep({**common, **GOOD}))
            # min_test_accuracy 0: the champion, not the floor, is what refuses the model.
            refused = observe("refused", run_sweep({**common, **BAD, "min_test_accuracy": 0.0}))
            # A long bake: the check runs inside it, and its failure stops the update there.
            let_through = {**common, **BAD, "min_test_accuracy": 0.0, "accuracy_tolerance": 1.0, "smoke_requests": 50,
                           "bake_seconds": 600}  # fmt: skip
            rolled_back = observe("rolled_back", run_sweep(let_through))
            # min_test_accuracy 0, tolerance 1: the gate lets it through, the registry's approval decides.
            manual = run_sweep({**common, **GOOD, "hidden_channels": [16], "approval": "manual",
                                "min_test_accuracy": 0.0, "accuracy_tolerance": 1.0})  # fmt: skip
            approved = main(["approve", "3", "--endpoint", ENDPOINT, "--reason", "reviewed by the test"])
            deploy_only = run_sweep({**common, "deploy_only": True, "bake_seconds": 0})
            yield {"config": load_config(), "deployed": deployed, "refused": refused, "rolled_back": rolled_back,
                   "manual": manual, "approved": approved, "deploy_only": deploy_only, "alerts": alerts,
                   "seen": seen}  # fmt: skip
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
    assert {task: found[task] for task in ("gate", "choose_register", "candidate", "deploy", "monitor", "report")} == {
        task: ["success"] for task in ("gate", "choose_register", "candidate", "deploy", "monitor", "report")
    }

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
    assert check["rollback"] == {"action": "restored", "endpoint_name": ENDPOINT,
                                 "endpoint_config_name": good["endpoint_config_name"],
                                 "by": f"alarm {ENDPOINT}-invocation-5xx-errors"}  # fmt: skip
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

    deployed, refused, rolled_back, manual, deploy_only = (
        note(local_runs[name]) for name in ("deployed", "refused", "rolled_back", "manual", "deploy_only")
    )
    assert re.match(r"Winner: hidden_channels 16 \(\S+-hc16-\w+\), test accuracy \d+\.\d\d%\. Deployed version 1 to "
                    rf"{ENDPOINT} \(\S+\); it passed its monitoring check \(live accuracy \d+\.\d%, p99 \d+\.\d ms\) "
                    r"and serves now\. Report: s3://\S+/report/report\.html \(on this machine: /\S+\)\.$", deployed), deployed  # fmt: skip
    assert "Refused by the gate: best test accuracy" in refused and "below the champion's" in refused, refused
    assert "Not deployed: this run registered no version" in refused, refused
    assert "Not deployed: version 3 awaits a person's approval (mnist-pipeline approve 3)." in manual, manual
    assert deploy_only.startswith(f"Deploy-only run. Deployed version 3 to {ENDPOINT}"), deploy_only
    assert f"Deployed to {ENDPOINT}, then FAILED its monitoring check (live accuracy" in rolled_back, rolled_back
    assert "rollback: restored." in rolled_back


def test_what_the_gate_lets_through_is_registered_and_the_check_approves_or_rejects_it(local_runs, local_sagemaker):
    """The registry group named after the endpoint: run 1's model Approved (it passed and serves), run 3's Rejected
    (it failed its check); run 2's, refused by the gate, never became a version; run 4's Approved by a person."""
    sagemaker = boto3.client("sagemaker", endpoint_url=local_sagemaker)
    versions = sagemaker.list_model_packages(ModelPackageGroupName=ENDPOINT, SortBy="CreationTime",
                                             SortOrder="Ascending")["ModelPackageSummaryList"]  # fmt: skip
    assert [v["ModelApprovalStatus"] for v in versions] == ["Approved", "Rejected", "Approved"]
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


def test_a_manual_approval_waits_for_a_person_then_a_deploy_only_run_serves_it(local_runs, local_sagemaker):
    from tasks.registry import champion

    manual, deploy_only = local_runs["manual"], local_runs["deploy_only"]
    found = states(manual)
    assert str(manual.state) == "success", found
    assert found["register"] == ["success"] and found["candidate"] == ["success"]
    assert found["deploy"] == ["skipped"] and found["monitor"] == ["skipped"]
    [choice] = xcoms(manual.run_id, "candidate")
    assert (
        choice["deploy"] is False
        and choice["reason"] == "version 3 awaits a person's approval (mnist-pipeline approve 3)"
    )
    assert "nothing deployed: version 3 awaits a person's approval" in report_text(manual.run_id)

    # `mnist-pipeline approve 3` said yes; the deploy-only run trained nothing and served version 3.
    assert local_runs["approved"] == 0
    found = states(deploy_only)
    assert str(deploy_only.state) == "success", found
    for task in ("download", "validate", "upload", "train", "tune", "select_best", "gate", "register"):
        assert set(found[task]) == {"skipped"}, task
    assert {task: found[task] for task in ("candidate", "deploy", "monitor", "report")} == {
        task: ["success"] for task in ("candidate", "deploy", "monitor", "report")
    }
    [choice] = xcoms(deploy_only.run_id, "candidate")
    [register] = xcoms(manual.run_id, "register")
    assert choice["model"]["model_package_arn"] == register and choice["model"]["version"] == 3
    assert choice["reason"].startswith(f"version 3 (from run {manual.run_id}), approved since the champion")
    current = champion(local_runs["config"], ENDPOINT)
    assert current["version"] == 3 and serving_config(local_sagemaker) == current["endpoint_config_name"]
    described = boto3.client("sagemaker", endpoint_url=local_sagemaker).describe_model_package(
        ModelPackageName=register
    )
    assert described["ApprovalDescription"] == "reviewed by the test"  # a person's words stay
    report = report_text(deploy_only.run_id)
    assert report.startswith("# Deployment report") and "Deploy-only run: version 3" in report


def test_the_champion_is_an_asset_whose_events_say_which_version(local_runs):
    """Each passed check is an event of the mnist_champion asset (what schedules mnist_batch_predict); each upload one
    of mnist_dataset."""
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    runs = {local_runs[name].run_id: name for name in ("deployed", "refused", "rolled_back", "manual", "deploy_only")}
    with create_session() as session:
        rows = session.execute(
            select(AssetModel.name, AssetEvent.source_run_id, AssetEvent.extra)
            .join(AssetEvent, AssetEvent.asset_id == AssetModel.id)
            .where(AssetEvent.source_run_id.in_(runs))
        ).all()
    champions = sorted((runs[run], extra["version"]) for name, run, extra in rows if name == "mnist_champion")
    assert champions == [("deploy_only", 3), ("deployed", 1)]
    datasets = {
        runs[run] for name, run, extra in rows if name == "mnist_dataset" and "/datasets/mnist/" in extra["uri"]
    }
    assert datasets == {"deployed", "refused", "rolled_back", "manual"}
