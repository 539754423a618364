"""The champion gate: the decision rule, and the champion record with its endpoint on the local SageMaker service."""

from __future__ import annotations

import uuid

import boto3
import pytest

from tasks.config import load_config
from tasks.gate import (
    ChampionMismatch,
    champion_uri,
    decide,
    gate,
    read_champion,
    record_champion,
    serving_endpoint_config,
)
from tests.endpoint_helpers import model_artifacts, pack

MODEL = "s3://gate-models/m.tar.gz"


@pytest.mark.parametrize(
    ("best", "champion", "deploy", "why"),
    [
        (0.95, None, True, "no champion"),
        (0.85, None, False, "below min_test_accuracy 0.9000"),
        (0.97, 0.96, True, "champion's 0.9600"),
        (0.958, 0.96, True, "minus tolerance 0.0050"),  # worse, but within the tolerance
        (0.95, 0.96, False, "below the champion's 0.9600 minus tolerance 0.0050"),
        (0.89, 0.80, False, "below min_test_accuracy"),  # a poor champion does not lower the bar
    ],
)
def test_decide(best, champion, deploy, why):
    decision, reason = decide(best, champion, min_test_accuracy=0.9, tolerance=0.005)
    assert decision is deploy
    assert why in reason
    assert f"{best:.4f}" in reason


def test_decide_refuses_a_percentage():
    with pytest.raises(ValueError, match=r"97.1 is not a fraction"):
        decide(97.1, None, 0.9, 0.005)


@pytest.fixture
def sagemaker_config(local_sagemaker, local_aws):
    """The local SageMaker service and a bucket of its own."""
    config = load_config(bucket=f"gate-{uuid.uuid4().hex[:12]}")
    boto3.client("s3", endpoint_url=local_aws).create_bucket(Bucket=config.bucket)
    return config


@pytest.fixture(scope="module")
def serve(local_sagemaker, local_aws, small_mnist, tmp_path_factory):
    """Makes an endpoint serve a real model; returns its endpoint config's name."""
    from tasks.deployment import deploy

    built = model_artifacts(small_mnist, tmp_path_factory.getbasetemp() / "model-artifacts")
    s3 = boto3.client("s3", endpoint_url=local_aws)
    s3.create_bucket(Bucket="gate-models")
    s3.upload_file(
        str(pack(built["good"], tmp_path_factory.mktemp("gate") / "model.tar.gz")), "gate-models", "m.tar.gz"
    )

    def endpoint(name: str) -> str:
        best = {
            "training_job_name": f"{name}-hc10",
            "hidden_channels": 10,
            "model_data_url": MODEL,
            "test_accuracy": 0.97,
        }
        deployed = deploy(best, {"serving_endpoint_config_name": None}, endpoint_name=name, run_id=name,
                          config=load_config(), check_interval=1)  # fmt: skip
        return deployed["endpoint_config_name"]

    return endpoint


def test_champion_record_round_trip(sagemaker_config, local_aws):
    assert read_champion(sagemaker_config, "digits") is None
    uri = record_champion(
        sagemaker_config,
        "digits",
        {"test_accuracy": 0.9714, "model_data_url": "s3://m/model.tar.gz", "endpoint_config_name": "digits-c1"},
    )
    assert (
        uri == champion_uri(sagemaker_config, "digits") == f"{sagemaker_config.s3_root}/endpoints/digits/champion.json"
    )
    champion = read_champion(sagemaker_config, "digits")
    assert champion["test_accuracy"] == 0.9714
    assert champion["endpoint_config_name"] == "digits-c1"
    assert champion["endpoint_name"] == "digits"


def test_champion_record_needs_its_fields(sagemaker_config):
    with pytest.raises(ValueError, match="lacks endpoint_config_name, model_data_url"):
        record_champion(sagemaker_config, "digits", {"test_accuracy": 0.97})
    assert read_champion(sagemaker_config, "digits") is None  # nothing half-written


def test_gate_against_the_champion_serving_now(sagemaker_config, serve):
    name = f"gate-{uuid.uuid4().hex[:8]}"
    # No endpoint yet: only the floor applies.
    first = gate(sagemaker_config, name, 0.95, min_test_accuracy=0.9, tolerance=0.005)
    assert first["deploy"] is True
    assert first["champion_accuracy"] is None and first["serving_endpoint_config_name"] is None

    config_name = serve(name)
    assert serving_endpoint_config(sagemaker_config, name) == config_name
    record_champion(
        sagemaker_config, name, {"test_accuracy": 0.97, "model_data_url": MODEL, "endpoint_config_name": config_name}
    )

    refused = gate(sagemaker_config, name, 0.96, min_test_accuracy=0.9, tolerance=0.005)
    assert refused["deploy"] is False
    assert "below the champion's 0.9700 minus tolerance 0.0050" in refused["reason"]
    assert refused["champion_accuracy"] == 0.97
    assert refused["serving_endpoint_config_name"] == config_name

    passed = gate(sagemaker_config, name, 0.968, min_test_accuracy=0.9, tolerance=0.005)
    assert passed["deploy"] is True
    assert passed["champion_model_data_url"] == MODEL


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("test_accuracy", 0.999, r"its test accuracy is 0\.999, the endpoint config's mnist-pipeline:test-accuracy tag "
                                 r"says '0\.97'"),
        ("model_data_url", "s3://elsewhere/model.tar.gz", r"its model is 's3://elsewhere/model\.tar\.gz', the endpoint "
                                                          r"serves 's3://gate-models/m\.tar\.gz'"),
        ("endpoint_config_name", "another-config", r"it names endpoint config 'another-config', the endpoint serves"),
    ],
)  # fmt: skip
def test_a_champion_record_sagemaker_disagrees_with_is_refused(sagemaker_config, serve, field, value, problem):
    """A record written by whoever can write to the bucket (here: a champion too good to beat) decides nothing."""
    name = f"planted-{uuid.uuid4().hex[:8]}"
    config_name = serve(name)
    record = {"test_accuracy": 0.97, "model_data_url": MODEL, "endpoint_config_name": config_name}
    record_champion(sagemaker_config, name, {**record, field: value})
    with pytest.raises(ChampionMismatch, match=rf"champion record s3://.*/endpoints/{name}/champion\.json does not "
                                               rf"agree with what SageMaker says endpoint {name} serves: {problem}"):  # fmt: skip
        gate(sagemaker_config, name, 0.96, min_test_accuracy=0.9, tolerance=0.005)


def test_gate_ignores_the_champion_of_a_deleted_endpoint(sagemaker_config, serve, local_sagemaker):
    name = f"gone-{uuid.uuid4().hex[:8]}"
    config_name = serve(name)
    record_champion(
        sagemaker_config, name, {"test_accuracy": 0.99, "model_data_url": MODEL, "endpoint_config_name": config_name}
    )
    sagemaker = boto3.client("sagemaker", endpoint_url=local_sagemaker)
    sagemaker.delete_endpoint(EndpointName=name)
    sagemaker.get_waiter("endpoint_deleted").wait(EndpointName=name, WaiterConfig={"Delay": 1})
    result = gate(sagemaker_config, name, 0.95, min_test_accuracy=0.9, tolerance=0.005)
    assert result["deploy"] is True
    assert result["champion_accuracy"] is None
