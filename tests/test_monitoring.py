"""The monitoring check: a smoke load through boto3's sagemaker-runtime, CloudWatch figures, champion and alarms
on a pass, rollback on a failure.

Local mode runs it all for real: model servers publishing their metrics to the local CloudWatch (moto server),
artifacts in the local S3. For the sagemaker backend moto accepts the endpoint calls but serves no model (its
runtime answers a fixed non-prediction body), so those tests show a bad endpoint caught and the rollback calls.
"""

from __future__ import annotations

import json
import re
import uuid

import boto3
import pytest
from botocore.exceptions import ClientError

from tasks import local_endpoints
from tasks.config import load_config
from tasks.gate import gate, read_champion
from tasks.local_aws import connection_uri
from tasks.monitoring import (
    MonitoringCheckFailed,
    Thresholds,
    check_endpoint,
    evaluate,
    load_test_images,
    put_alarms,
    rollback,
    runtime_client,
    smoke_load,
)
from tests.endpoint_helpers import model_artifacts, moto_endpoint, pack
from training.mnist_idx import MNIST_FILES

SERVER = {"workers": 1, "metrics_interval": 1.0}  # metrics reach CloudWatch within a second or two
# Latency limits far above the defaults: a busy 2-core test machine must not fail a healthy model (the limits
# themselves are checked in test_evaluate_names_each_failed_threshold_with_its_value).
CHECK = {"samples": 100, "concurrency": 2, "metrics_timeout": 30.0, "poll_interval": 1.0,
         "thresholds": Thresholds(max_p99_latency_ms=10_000, max_model_latency_ms=5_000)}  # fmt: skip


@pytest.fixture(scope="module")
def local_config(local_aws, tmp_path_factory):
    config = load_config(
        state_dir=str(tmp_path_factory.mktemp("monitoring-state")), bucket=f"mon-{uuid.uuid4().hex[:12]}"
    )
    boto3.client("s3", endpoint_url=local_aws).create_bucket(Bucket=config.bucket)
    yield config
    local_endpoints.stop_all(config)


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


def test_evaluate_names_each_failed_threshold_with_its_value():
    load = {"requests": 50, "live_accuracy": 0.42, "error_rate": 0.1, "p99_ms": 1500.0}
    metrics = {
        "invocations": 40.0, "invocation_4xx_errors": 0.0, "invocation_5xx_errors": 5.0, "waited_s": 30.0,
        "model_latency_average_us": 250_000.0, "cpu_utilization": 180.0, "memory_utilization": 95.5,
    }  # fmt: skip
    failures = evaluate(load, metrics, Thresholds(max_cpu_utilization=150.0), test_accuracy=0.97)
    assert failures == [
        "live accuracy 0.4200 < 0.9000",
        "live accuracy vs test accuracy 0.4200 < 0.9200",
        "smoke error rate 0.1 > 0",
        "smoke p99 latency ms 1500 > 1000",
        "CloudWatch Invocations 40 < 50 requests sent (after waiting 30.0 s)",
        "CloudWatch Invocation5XXErrors 5 > 0",
        "CloudWatch ModelLatency average ms 250 > 200",
        "CloudWatch CPUUtilization 180 > 150",
        "CloudWatch MemoryUtilization 95.5 > 90",
    ]
    healthy = {"requests": 50, "live_accuracy": 0.97, "error_rate": 0.0, "p99_ms": 12.0}
    quiet = {**metrics, "invocations": 50.0, "invocation_5xx_errors": 0.0, "model_latency_average_us": 900.0,
             "memory_utilization": 3.0}  # fmt: skip
    assert evaluate(healthy, quiet, Thresholds(), test_accuracy=0.97) == []
    from_params = Thresholds.from_params({"min_live_accuracy": 0.99, "epochs": 2})  # the DAG's params as they come
    assert evaluate(healthy, quiet, from_params, test_accuracy=0.97) == ["live accuracy 0.9700 < 0.9900"]


def test_local_check_passes_then_catches_a_wrong_model_and_rolls_back(local_config, uploaded, local_aws):
    name, accuracy = "mon", uploaded["test_accuracy"]
    assert gate(local_config, name, accuracy)["deploy"] is True  # no endpoint, no champion yet

    good = local_endpoints.create_or_update_endpoint(name, uploaded["good"], "mon-good", local_config, **SERVER)
    passed = check_endpoint(local_config, good, uploaded["test_data"], accuracy, **CHECK)
    assert passed["passed"] is True and passed["failures"] == []
    assert passed["load"]["errors"] == 0 and passed["load"]["requests"] == 100
    assert passed["load"]["live_accuracy"] == pytest.approx(accuracy)  # all 100 held-out images, as in training
    assert passed["load"]["p50_ms"] <= passed["load"]["p99_ms"]
    assert passed["cloudwatch"]["invocations"] >= 100 and passed["cloudwatch"]["invocation_5xx_errors"] == 0
    assert passed["cloudwatch"]["model_latency_average_us"] > 0 and passed["cloudwatch"]["memory_utilization"] > 0

    champion = read_champion(local_config, name)
    assert champion["endpoint_config_name"] == "mon-good" and champion["model_data_url"] == uploaded["good"]
    alarms = boto3.client("cloudwatch", endpoint_url=local_aws).describe_alarms(AlarmNamePrefix=f"{name}-")
    by_name = {alarm["AlarmName"]: alarm for alarm in alarms["MetricAlarms"]}
    assert set(by_name) == {"mon-invocation-5xx-errors", "mon-model-latency-p99"} == set(passed["alarms"])
    assert by_name["mon-model-latency-p99"]["ExtendedStatistic"] == "p99"
    assert {"Name": "EndpointName", "Value": name} in by_name["mon-invocation-5xx-errors"]["Dimensions"]

    # The gate now measures new models against this champion.
    refused = gate(local_config, name, accuracy - 0.02, min_test_accuracy=0.5, tolerance=0.005)
    assert refused["deploy"] is False and refused["serving_endpoint_config_name"] == "mon-good"

    wrong = local_endpoints.create_or_update_endpoint(
        name, uploaded["shuffled"], "mon-shuffled", local_config, **SERVER
    )
    with pytest.raises(MonitoringCheckFailed) as failed:
        check_endpoint(local_config, wrong, uploaded["test_data"], accuracy, **{**CHECK, "samples": 30})
    message = str(failed.value)
    assert re.search(r"failed: live accuracy 0\.\d{4} < 0\.9000; live accuracy vs test accuracy", message)
    assert message.endswith("Rolled back to endpoint config mon-good, which serves again.")

    # Nothing lost: the previous model answers as before, and it is still the champion.
    assert local_endpoints.describe_endpoint(name, local_config)["EndpointConfigName"] == "mon-good"
    client = runtime_client(local_config, good["runtime_url"])
    again = smoke_load(client, name, *load_test_images(local_config, uploaded["test_data"], 20))
    assert again["errors"] == 0 and again["live_accuracy"] >= 0.9
    assert read_champion(local_config, name)["endpoint_config_name"] == "mon-good"


def test_local_check_catches_a_failing_handler_and_deletes_the_endpoint_it_created(local_config, uploaded):
    name = "mon-new"
    deployment = local_endpoints.create_or_update_endpoint(name, uploaded["raising"], "mon-new-raising", local_config,
                                                           **SERVER)  # fmt: skip
    with pytest.raises(MonitoringCheckFailed) as failed:
        check_endpoint(
            local_config, deployment, uploaded["test_data"], uploaded["test_accuracy"], **{**CHECK, "samples": 20}
        )
    message = str(failed.value)
    assert "live accuracy 0.0000 < 0.9000" in message
    assert "smoke error rate 1 > 0" in message
    assert "CloudWatch Invocation5XXErrors 20 > 0" in message
    assert message.endswith("The endpoint, which this deployment created, was deleted.")
    assert name not in local_endpoints.list_endpoints(local_config)
    assert read_champion(local_config, name) is None


@pytest.fixture
def sagemaker_config(local_aws, monkeypatch):
    """The sagemaker backend against moto, through a connection without retries (moto answers some calls 500)."""
    connection = json.loads(connection_uri(local_aws))
    connection["extra"]["config_kwargs"] = {"retries": {"total_max_attempts": 1}}
    monkeypatch.setenv("AIRFLOW_CONN_AWS_MOTO_ONCE", json.dumps(connection))
    config = load_config(backend="sagemaker", bucket=f"mon-sm-{uuid.uuid4().hex[:12]}", aws_conn_id="aws_moto_once")
    boto3.client("s3", endpoint_url=local_aws).create_bucket(Bucket=config.bucket)
    return config


def _describe(local_aws: str, name: str) -> dict:
    return boto3.client("sagemaker", endpoint_url=local_aws).describe_endpoint(EndpointName=name)


def test_sagemaker_check_deletes_a_created_endpoint_that_answers_nonsense(sagemaker_config, local_aws, small_mnist):
    name = f"sm-{uuid.uuid4().hex[:8]}"
    config_name = moto_endpoint(local_aws, name)
    deployment = {"endpoint_name": name, "endpoint_config_name": config_name, "model_data_url": "s3://m/model.tar.gz",
                  "previous_endpoint_config_name": None, "created": True}  # fmt: skip
    with pytest.raises(MonitoringCheckFailed) as failed:
        check_endpoint(sagemaker_config, deployment, str(small_mnist), 0.97, samples=10, metrics_timeout=0)
    message = str(failed.value)
    assert "smoke error rate 1 > 0" in message
    assert "CloudWatch Invocations 0 < 10 requests sent" in message  # nothing publishes metrics on moto
    assert message.endswith("The endpoint, which this deployment created, was deleted.")
    with pytest.raises(ClientError, match="Could not find endpoint"):
        _describe(local_aws, name)
    assert read_champion(sagemaker_config, name) is None


def test_sagemaker_rollback_updates_the_endpoint_to_its_previous_config(sagemaker_config, local_aws):
    name = f"sm-{uuid.uuid4().hex[:8]}"
    failed_config = moto_endpoint(local_aws, name)
    deployment = {"endpoint_name": name, "endpoint_config_name": failed_config,
                  "previous_endpoint_config_name": "the-previous-config"}  # fmt: skip
    # moto 5.2.5 has no UpdateEndpoint (it answers 500): the request leaves validated by botocore, reaches the
    # server, and the failure is reported with what was attempted. On AWS the endpoint switches back.
    with pytest.raises(RuntimeError, match=r"UpdateEndpoint of sm-\w+ back to endpoint config the-previous-config"):
        rollback(sagemaker_config, deployment)
    assert _describe(local_aws, name)["EndpointConfigName"] == failed_config

    # An endpoint that no longer serves the failed config is left alone (a retried rollback).
    other = {**deployment, "endpoint_config_name": "another-config"}
    assert rollback(sagemaker_config, other) == {"action": "none", "endpoint_name": name,
                                                 "endpoint_config_name": failed_config}  # fmt: skip
    assert _describe(local_aws, name)["EndpointStatus"] == "InService"


def test_alarms_are_created_then_updated(sagemaker_config, local_aws):
    name = f"sm-{uuid.uuid4().hex[:8]}"
    cloudwatch = boto3.client("cloudwatch", endpoint_url=local_aws)
    put_alarms(sagemaker_config, name, max_5xx_errors=0, max_p99_latency_ms=100)
    put_alarms(sagemaker_config, name, max_5xx_errors=3, max_p99_latency_ms=40)
    alarms = {alarm["AlarmName"]: alarm for alarm in cloudwatch.describe_alarms(AlarmNamePrefix=name)["MetricAlarms"]}
    assert sorted(alarms) == [f"{name}-invocation-5xx-errors", f"{name}-model-latency-p99"]
    errors, latency = alarms[f"{name}-invocation-5xx-errors"], alarms[f"{name}-model-latency-p99"]
    assert (errors["MetricName"], errors["Statistic"], errors["Threshold"]) == ("Invocation5XXErrors", "Sum", 3.0)
    assert (latency["MetricName"], latency["ExtendedStatistic"], latency["Threshold"]) == (
        "ModelLatency",
        "p99",
        40_000,
    )
    assert latency["Namespace"] == "AWS/SageMaker" and latency["TreatMissingData"] == "notBreaching"
