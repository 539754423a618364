"""The monitoring check: a smoke load through boto3's sagemaker-runtime, CloudWatch figures, champion and alarms
on a pass, rollback on a failure.

All of it for real, through the provider's hooks: endpoints on the local SageMaker service, their model servers
publishing metrics to the local CloudWatch (moto server), artifacts in the local S3.
"""

from __future__ import annotations

import dataclasses
import re
import threading
import time
import uuid

import boto3
import pytest
from botocore.exceptions import ClientError

from tasks.alarms import put_alarms
from tasks.config import load_config
from tasks.deployment import RolledBack, roll_out
from tasks.gate import judge
from tasks.monitoring import MonitoringCheckFailed, check_endpoint, evaluate, rollback, unjudged
from tasks.policy import Thresholds
from tasks.registry import champion, describe
from tasks.smoke_load import load_test_images, smoke_load, unretried_runtime_client
from tasks.unchecked import roll_back_unchecked, unfinished_deployment
from tests.helpers.endpoints import model_artifacts, pack
from tests.helpers.polling import wait_until
from tests.helpers.registry import register
from training.mnist_idx import MNIST_FILES

# Latency limits far above the defaults: a busy 2-core test machine must not fail a healthy model (the limits
# themselves are checked in test_evaluate_names_each_failed_threshold_with_its_value).
CHECK = {
    "samples": 100,
    "concurrency": 2,
    "metrics_timeout": 30.0,
    "check_interval": 1,
    "thresholds": Thresholds(max_p99_latency_ms=10_000, max_model_latency_ms=5_000),
}


@pytest.fixture(scope="module")
def local_config(local_sagemaker, local_aws, tmp_path_factory):
    config = load_config(
        state_dir=str(tmp_path_factory.mktemp("monitoring-state")), bucket=f"mon-{uuid.uuid4().hex[:12]}"
    )
    boto3.client("s3", endpoint_url=local_aws).create_bucket(Bucket=config.bucket)
    return config


@pytest.fixture(scope="module")
def sagemaker(local_sagemaker):
    return boto3.client("sagemaker", endpoint_url=local_sagemaker)


def serve(
    config,
    endpoint: str,
    uploaded: dict,
    kind: str,
    previous: str | None = None,
    bake_seconds: int = 0,
    run: str | None = None,
) -> dict:
    """What the DAG's deploy task does: the ``kind`` model under a run of its own (``run``, or a new one), created
    or updated on ``endpoint`` (an update keeps the old fleet ``bake_seconds`` once all traffic has moved)."""
    run = run or f"run-{uuid.uuid4().hex[:8]}"
    best = {
        "training_job_name": f"{run}-hc10",
        "hidden_channels": 10,
        "model_data_url": uploaded[kind],
        "test_accuracy": uploaded["test_accuracy"],
    }
    return roll_out(
        best,
        previous_endpoint_config_name=previous,
        endpoint_name=endpoint,
        run_id=run,
        config=config,
        check_interval=1,
        traffic={"bake_seconds": bake_seconds},
    )


@pytest.fixture(scope="module")
def uploaded(local_config, local_aws, small_mnist, tmp_path_factory) -> dict:
    """The test images (an S3 channel) and the artifacts as model.tar.gz in the local S3, as the pipeline has them."""
    built = model_artifacts(small_mnist, tmp_path_factory.getbasetemp() / "model-artifacts")
    s3 = boto3.client("s3", endpoint_url=local_aws)
    channel = f"{local_config.prefix}/data/test-channel"
    for role in ("test_images", "test_labels"):
        s3.upload_file(str(small_mnist / MNIST_FILES[role]), local_config.bucket, f"{channel}/{MNIST_FILES[role]}")
    archives = tmp_path_factory.mktemp("archives")
    uris = {"test_data": f"s3://{local_config.bucket}/{channel}", "test_accuracy": built["test_accuracy"]}
    for kind in ("good", "shuffled", "raising"):
        key = f"{local_config.prefix}/models/{kind}/output/model.tar.gz"
        s3.upload_file(str(pack(built[kind], archives / f"{kind}.tar.gz")), local_config.bucket, key)
        uris[kind] = f"s3://{local_config.bucket}/{key}"
    return uris


def send_bad_requests(config, endpoint: str, count: int) -> None:
    """``count`` requests the model refuses (a body that is no JSON), as anyone may send them."""
    client = unretried_runtime_client(config)
    for _ in range(count):
        with pytest.raises(ClientError, match="ModelError"):
            client.invoke_endpoint(EndpointName=endpoint, Body=b"{not json", ContentType="application/json")


def load_found(**changes) -> dict:
    """What the check's own load found: a healthy model's answers to 200 requests, but for ``changes``."""
    return {"requests": 200, "live_accuracy": 0.97, "error_rate": 0.0, "p99_ms": 12.0, **changes}


def endpoint_metrics(**changes) -> dict:
    """The endpoint's CloudWatch figures over the check: 200 quiet invocations, but for ``changes``."""
    return {
        "invocations": 200.0,
        "invocation_4xx_errors": 0.0,
        "invocation_5xx_errors": 0.0,
        "waited_s": 1.0,
        "model_latency_average_us": 900.0,
        "cpu_utilization": 50.0,
        "memory_utilization": 3.0,
        **changes,
    }


def test_evaluate_names_each_failed_threshold_with_its_value():
    load = load_found(requests=50, live_accuracy=0.42, error_rate=0.1, p99_ms=1500.0)
    metrics = endpoint_metrics(
        invocations=40.0,
        invocation_5xx_errors=5.0,
        waited_s=30.0,
        model_latency_average_us=250_000.0,
        cpu_utilization=180.0,
        memory_utilization=95.5,
    )
    failures = evaluate(load, metrics, Thresholds(max_cpu_utilization=150.0, min_rate_requests=40), test_accuracy=0.97)
    assert failures == [
        "live accuracy 0.4200 < 0.9000",
        "live accuracy vs test accuracy 0.4200 < 0.9200",
        "smoke error rate 0.1 > 0",
        "smoke p99 latency ms 1500 > 1000",
        "CloudWatch Invocations 40 < 50 requests sent (after waiting 30.0 s)",
        "CloudWatch 5XX rate 0.125 > 0.05 (5 of 40 invocations)",
        "CloudWatch ModelLatency average ms 250 > 200",
        "CloudWatch CPUUtilization 180 > 150",
        "CloudWatch MemoryUtilization 95.5 > 90",
    ]
    healthy = load_found(requests=50)
    quiet = {
        **metrics,
        "invocations": 50.0,
        "invocation_5xx_errors": 0.0,
        "model_latency_average_us": 900.0,
        "memory_utilization": 3.0,
    }
    assert evaluate(healthy, quiet, Thresholds(), test_accuracy=0.97) == []
    from_params = Thresholds.from_params({"min_live_accuracy": 0.99, "epochs": 2})  # the DAG's params as they come
    assert evaluate(healthy, quiet, from_params, test_accuracy=0.97) == ["live accuracy 0.9700 < 0.9900"]


def test_a_stranger_s_bad_requests_do_not_veto_a_deployment_but_a_real_failure_rate_does():
    """The verdict rests on what the check can attribute: its own load, and the endpoint's 5XX rate over enough
    invocations. Anyone can send requests that fail: 4XX are theirs, and a handful of 5XX among few invocations
    (or a few among many) cannot tell a failing model from a few bad callers."""
    healthy, quiet = load_found(), endpoint_metrics()
    thresholds = Thresholds()
    assert (thresholds.max_5xx_rate, thresholds.min_rate_requests) == (0.05, 100)
    assert evaluate(healthy, quiet, thresholds, test_accuracy=0.97) == [] and unjudged(quiet, thresholds) == []

    # Strangers' 4XX beside the load, and a handful of their 5XX: 5 of 230 invocations is 2%, under the 5%.
    strangers = {**quiet, "invocations": 230.0, "invocation_4xx_errors": 25.0, "invocation_5xx_errors": 5.0}
    assert evaluate(healthy, strangers, thresholds, test_accuracy=0.97) == []
    assert unjudged(strangers, thresholds) == [
        "CloudWatch Invocation4XXErrors 25: client errors (the load's own count among its errors)"
    ]
    # A short load: 6 5XX of 60 invocations is 10%, but too few invocations to judge a rate.
    short = {**healthy, "requests": 50}
    few = {**quiet, "invocations": 60.0, "invocation_5xx_errors": 6.0}
    assert evaluate(short, few, thresholds, test_accuracy=0.97) == []
    assert unjudged(few, thresholds) == [
        "CloudWatch 5XX rate 0.1 (6 of 60 invocations): too few invocations to judge (at least 100)"
    ]

    # A real failure rate fails it, whoever's requests met it; so does the load's own error, a 4XX included.
    failing = {**quiet, "invocations": 250.0, "invocation_5xx_errors": 40.0}
    assert evaluate(healthy, failing, thresholds, test_accuracy=0.97) == [
        "CloudWatch 5XX rate 0.16 > 0.05 (40 of 250 invocations)"
    ]
    refused = {**healthy, "error_rate": 1 / 200}
    assert evaluate(refused, strangers, thresholds, test_accuracy=0.97) == ["smoke error rate 0.005 > 0"]


def test_the_check_passes_then_catches_a_wrong_model_and_rolls_back(
    local_config, uploaded, local_aws, sagemaker, local_sagemaker
):
    name, accuracy = "mon", uploaded["test_accuracy"]
    assert judge(local_config, name, accuracy)["deploy"] is True  # no endpoint, no champion yet
    versions = {
        kind: register(local_config, local_sagemaker, name, uploaded[kind], accuracy) for kind in ("good", "shuffled")
    }

    good = serve(local_config, name, uploaded, "good")
    # A stranger's bad requests as the check starts, in the minute its CloudWatch window begins with: 4XX, theirs.
    if time.time() % 60 > 50:
        time.sleep(60 - time.time() % 60)
    stranger = threading.Thread(target=send_bad_requests, args=(local_config, name, 10))
    stranger.start()
    passed = check_endpoint(local_config, good, uploaded["test_data"], accuracy, **CHECK, version=versions["good"])
    stranger.join()
    assert passed["passed"] is True and passed["failures"] == []
    assert passed["cloudwatch"]["invocation_4xx_errors"] == 10 and passed["notes"] == [
        "CloudWatch Invocation4XXErrors 10: client errors (the load's own count among its errors)"
    ]
    assert passed["load"]["errors"] == 0 and passed["load"]["requests"] == 100
    assert passed["load"]["live_accuracy"] == pytest.approx(accuracy)  # all 100 held-out images, as in training
    assert passed["load"]["p50_ms"] <= passed["load"]["p99_ms"]
    assert passed["cloudwatch"]["invocations"] >= 100 and passed["cloudwatch"]["invocation_5xx_errors"] == 0
    assert passed["cloudwatch"]["model_latency_average_us"] > 0 and passed["cloudwatch"]["memory_utilization"] > 0

    # Its version Approved: the champion.
    current = champion(local_config, name)
    assert current["model_package_arn"] == versions["good"] == passed["champion"]
    assert current["endpoint_config_name"] == good["endpoint_config_name"]
    assert current["model_data_url"] == uploaded["good"]
    assert "passed its monitoring check on mon" in describe(local_config, versions["good"])["ApprovalDescription"]
    alarms = boto3.client("cloudwatch", endpoint_url=local_aws).describe_alarms(AlarmNamePrefix=f"{name}-")
    by_name = {alarm["AlarmName"]: alarm for alarm in alarms["MetricAlarms"]}
    assert set(by_name) == {"mon-invocation-5xx-errors", "mon-model-latency-p99"} == set(passed["alarms"])
    assert by_name["mon-model-latency-p99"]["ExtendedStatistic"] == "p99"
    for query in by_name["mon-invocation-5xx-errors"]["Metrics"][:2]:  # the 5XX errors and the invocations
        assert {"Name": "EndpointName", "Value": name} in query["MetricStat"]["Metric"]["Dimensions"]

    # The gate now measures new models against this champion.
    refused = judge(local_config, name, accuracy - 0.02, min_test_accuracy=0.5, tolerance=0.005)
    assert refused["deploy"] is False and refused["champion_version"] == versions["good"]

    # An update checked while it bakes: the failed check stops it, and the old fleet, kept meanwhile, serves again.
    wrong = serve(local_config, name, uploaded, "shuffled", previous=good["endpoint_config_name"], bake_seconds=600)
    assert wrong["baking"] is True
    with pytest.raises(MonitoringCheckFailed) as failed:
        check_endpoint(
            local_config,
            wrong,
            uploaded["test_data"],
            accuracy,
            **{**CHECK, "samples": 30},
            version=versions["shuffled"],
        )
    message = str(failed.value)
    assert re.search(r"failed: live accuracy 0\.\d{4} < 0\.9000; live accuracy vs test accuracy", message)
    assert message.endswith(
        f"Rolled back to endpoint config {good['endpoint_config_name']}, which serves again "
        f"(the update stopped by its alarm {name}-invocation-5xx-errors)."
    )
    assert failed.value.result["rollback"]["by"] == f"alarm {name}-invocation-5xx-errors"
    rolled_back = sagemaker.describe_endpoint(EndpointName=name)
    assert "rolled back" in rolled_back["FailureReason"] and "is in ALARM" in rolled_back["FailureReason"]

    # Nothing lost: the previous model answers as before, and it is still the champion.
    assert sagemaker.describe_endpoint(EndpointName=name)["EndpointConfigName"] == good["endpoint_config_name"]
    client = unretried_runtime_client(local_config)
    again = smoke_load(client, name, *load_test_images(local_config, uploaded["test_data"], 20))
    assert again["errors"] == 0 and again["live_accuracy"] >= 0.9
    assert champion(local_config, name)["endpoint_config_name"] == good["endpoint_config_name"]
    rejected = describe(local_config, versions["shuffled"])
    assert rejected["ModelApprovalStatus"] == "Rejected" and "live accuracy" in rejected["ApprovalDescription"]

    # A rollback retried after it took finds nothing to undo.
    assert rollback(local_config, wrong, check_interval=1) == {
        "action": "none",
        "endpoint_name": name,
        "endpoint_config_name": good["endpoint_config_name"],
    }

    # A good update passes while it bakes, and becomes the champion once the bake is over.
    better = serve(local_config, name, uploaded, "good", previous=good["endpoint_config_name"], bake_seconds=4)
    assert better["baking"] is True
    passed = check_endpoint(local_config, better, uploaded["test_data"], accuracy, **{**CHECK, "samples": 30})
    assert passed["passed"] is True
    described = sagemaker.describe_endpoint(EndpointName=name)
    assert (described["EndpointStatus"], described["EndpointConfigName"]) == (
        "InService",
        better["endpoint_config_name"],
    )
    assert champion(local_config, name)["endpoint_config_name"] == better["endpoint_config_name"]
    sagemaker.delete_endpoint(EndpointName=name)


def test_the_check_catches_a_failing_handler_and_deletes_the_endpoint_it_created(local_config, uploaded, sagemaker):
    name = "mon-new"
    deployment = serve(local_config, name, uploaded, "raising")
    # 20 requests are enough to judge the endpoint's 5XX rate here.
    judged = dataclasses.replace(CHECK["thresholds"], min_rate_requests=20)
    with pytest.raises(MonitoringCheckFailed) as failed:
        check_endpoint(
            local_config,
            deployment,
            uploaded["test_data"],
            uploaded["test_accuracy"],
            **{**CHECK, "samples": 20, "thresholds": judged},
        )
    message = str(failed.value)
    assert "live accuracy 0.0000 < 0.9000" in message
    assert "smoke error rate 1 > 0" in message
    assert "CloudWatch 5XX rate 1 > 0.05 (20 of 20 invocations)" in message
    assert message.endswith("The endpoint, which this deployment created, was deleted.")
    sagemaker.get_waiter("endpoint_deleted").wait(EndpointName=name, WaiterConfig={"Delay": 1})
    with pytest.raises(ClientError, match="Could not find endpoint"):
        sagemaker.describe_endpoint(EndpointName=name)
    assert champion(local_config, name) is None


def test_alarms_are_created_then_updated(local_config, local_aws):
    name = f"sm-{uuid.uuid4().hex[:8]}"
    cloudwatch = boto3.client("cloudwatch", endpoint_url=local_aws)
    put_alarms(local_config, name, max_5xx_rate=0.05, min_rate_requests=100, alarm_p99_model_latency_ms=100)
    put_alarms(local_config, name, max_5xx_rate=0.2, min_rate_requests=30, alarm_p99_model_latency_ms=40)
    alarms = {alarm["AlarmName"]: alarm for alarm in cloudwatch.describe_alarms(AlarmNamePrefix=name)["MetricAlarms"]}
    assert sorted(alarms) == [f"{name}-invocation-5xx-errors", f"{name}-model-latency-p99"]
    errors, latency = alarms[f"{name}-invocation-5xx-errors"], alarms[f"{name}-model-latency-p99"]
    # The errors alarm is a rate: metric math over the minute's 5XX errors and invocations, from 30 invocations.
    assert errors["Threshold"] == 0.2 and "MetricName" not in errors
    queries = {query["Id"]: query for query in errors["Metrics"]}
    assert queries["error_rate"]["Expression"] == "IF(invocations >= 30, FILL(errors, 0) / invocations, 0)"
    assert [query["Id"] for query in errors["Metrics"] if query["ReturnData"]] == ["error_rate"]
    for query_id, metric in (("errors", "Invocation5XXErrors"), ("invocations", "Invocations")):
        stat = queries[query_id]["MetricStat"]
        assert (stat["Metric"]["MetricName"], stat["Stat"], stat["Period"]) == (metric, "Sum", 60)
        assert {"Name": "EndpointName", "Value": name} in stat["Metric"]["Dimensions"]
    assert (latency["MetricName"], latency["ExtendedStatistic"], latency["Threshold"]) == (
        "ModelLatency",
        "p99",
        40_000,
    )
    assert latency["Namespace"] == "AWS/SageMaker" and latency["TreatMissingData"] == "notBreaching"


def test_a_check_that_cannot_finish_undoes_the_deployment(local_config, uploaded, sagemaker):
    """Not only a failed threshold: an exception inside the check (here its test images cannot be read) leaves no
    unchecked model serving; the endpoint this deployment created is deleted."""
    name = "mon-broken"
    deployment = serve(local_config, name, uploaded, "good")
    missing = f"s3://{local_config.bucket}/no-such-test-data"
    with pytest.raises(MonitoringCheckFailed) as failed:
        check_endpoint(local_config, deployment, missing, uploaded["test_accuracy"], **CHECK)
    message = str(failed.value)
    assert "failed: the check could not finish: " in message
    assert message.endswith("The endpoint, which this deployment created, was deleted.")
    assert failed.value.result["passed"] is False and failed.value.result["rollback"]["action"] == "deleted"
    sagemaker.get_waiter("endpoint_deleted").wait(EndpointName=name, WaiterConfig={"Delay": 1})
    assert champion(local_config, name) is None


def test_a_deployment_left_unchecked_is_undone_after_the_run(local_config, uploaded, sagemaker, local_sagemaker):
    """The run's teardown. A deployment whose check never finished (its task killed before it could roll back:
    monitoring None) is undone; a checked one is left alone. A deploy that returned nothing (it failed, or its
    timeout ended it, after its request) leaves no deployment to undo from: the teardown finds this run's config on
    the endpoint (by the run's name for it) and undoes it from the candidate's previous_endpoint_config_name (an
    update under way is stopped and the old fleet serves again; an endpoint the run created is deleted), and the
    version is Rejected. What the run did not make is left alone."""
    name, accuracy, first_run = "mon-unchecked", uploaded["test_accuracy"], f"run-{uuid.uuid4().hex[:8]}"
    first = serve(local_config, name, uploaded, "good", run=first_run)  # created by its run, checked
    assert roll_back_unchecked(local_config, first, {"passed": True}, check_interval=1) is None
    assert sagemaker.describe_endpoint(EndpointName=name)["EndpointStatus"] == "InService"

    run = f"run-{uuid.uuid4().hex[:8]}"
    version = register(local_config, local_sagemaker, name, uploaded["shuffled"], accuracy, run_id=run)
    best = {
        "training_job_name": f"{run}-hc10",
        "hidden_channels": 10,
        "model_data_url": uploaded["shuffled"],
        "test_accuracy": accuracy,
    }
    choice = {
        "deploy": True,
        "model": {**best, "model_package_arn": version},
        "previous_endpoint_config_name": first["endpoint_config_name"],
    }
    teardown = {
        "choice": choice,
        "endpoint_name": name,
        "check_interval": 1,
        "settle_timeout": 120.0,
        "version": version,
    }
    # Another run's teardown: nothing of it on the endpoint, nothing touched.
    assert roll_back_unchecked(local_config, None, None, **teardown, run_id="run-elsewhere") is None

    # This run's deploy sends its UpdateEndpoint (linear steps held ten minutes each) and is still waiting on it:
    # as far as the run knows it returned nothing, as when its task is killed.
    def deploying() -> None:
        with pytest.raises(RolledBack):
            roll_out(
                best,
                previous_endpoint_config_name=first["endpoint_config_name"],
                endpoint_name=name,
                run_id=run,
                config=local_config,
                check_interval=1,
                traffic={"traffic_shift": "linear", "percent": 50, "wait_seconds": 600},
            )

    deploying_thread = threading.Thread(target=deploying)
    deploying_thread.start()
    wait_until(
        lambda: "PendingDeploymentSummary" in sagemaker.describe_endpoint(EndpointName=name),
        timeout=120,
        failure="the update never showed its new fleet",
    )
    undone = roll_back_unchecked(local_config, None, None, **teardown, run_id=run)
    deploying_thread.join(timeout=60)
    assert not deploying_thread.is_alive()
    assert undone["passed"] is False and "the deploy task returned nothing" in undone["failures"][0]
    assert undone["rollback"] == {
        "action": "restored",
        "endpoint_name": name,
        "endpoint_config_name": first["endpoint_config_name"],
        "by": f"alarm {name}-invocation-5xx-errors",
    }
    described = sagemaker.describe_endpoint(EndpointName=name)
    assert (described["EndpointStatus"], described["EndpointConfigName"]) == (
        "InService",
        first["endpoint_config_name"],
    )
    rejected = describe(local_config, version)
    assert rejected["ModelApprovalStatus"] == "Rejected" and "returned nothing" in rejected["ApprovalDescription"]
    assert roll_back_unchecked(local_config, None, None, **teardown, run_id=run) is None  # undone once

    # The first run's endpoint, found the same way had its deploy returned nothing: created by it, so deleted.
    found = unfinished_deployment(
        local_config,
        {**choice, "previous_endpoint_config_name": None},
        name,
        first_run,
        settle_timeout=60,
        check_interval=1,
    )
    assert (found["endpoint_config_name"], found["created"]) == (first["endpoint_config_name"], True)
    # Its check never finished: undone from what its deploy returned.
    undone = roll_back_unchecked(local_config, first, None, check_interval=1)
    assert undone["passed"] is False and undone["rollback"]["action"] == "deleted"
    assert "never finished" in undone["failures"][0]
    sagemaker.get_waiter("endpoint_deleted").wait(EndpointName=name, WaiterConfig={"Delay": 1})
    assert roll_back_unchecked(local_config, None, None) is None  # nothing deployed, nothing to undo


def test_the_check_reads_its_test_files_as_the_dataset_s_manifest_says(local_config, local_aws, small_mnist):
    """From S3 (the training channel), the test files are checked against SHA256SUMS, and it against its address."""
    from tasks.mnist_data import upload_dataset
    from training.channel import ChannelError

    uri = upload_dataset(small_mnist, local_config)
    images, labels = load_test_images(local_config, uri, 10)
    assert images.shape == (10, 28, 28) and len(labels) == 10
    bucket, prefix = uri.removeprefix("s3://").split("/", 1)
    boto3.client("s3", endpoint_url=local_aws).put_object(
        Bucket=bucket,
        Key=f"{prefix}{MNIST_FILES['test_labels']}",
        Body=(small_mnist / MNIST_FILES["train_labels"]).read_bytes(),
    )
    with pytest.raises(ChannelError, match=f"{MNIST_FILES['test_labels']}: its SHA-256 is .*, SHA256SUMS says"):
        load_test_images(local_config, uri, 10)
