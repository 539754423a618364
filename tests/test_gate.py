"""The champion gate and the registry behind it: the decision rule; the champion (the latest Approved version the
endpoint serves), what a run deploys under each approval mode, on the local SageMaker service."""

from __future__ import annotations

import uuid

import boto3
import pytest

from tasks.config import load_config
from tasks.deployment import serving_endpoint_config
from tasks.gate import decide, judge
from tasks.registry import APPROVED, REJECTED, approved_to_serve, champion, choose_model, find_version, set_approval
from tests.helpers.endpoints import model_artifacts, pack
from tests.helpers.registry import register as register_version

MODEL = "s3://gate-models/m.tar.gz"
OTHER = "s3://gate-models/other.tar.gz"


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
    from tasks.deployment import roll_out

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
        deployed = roll_out(
            best,
            previous_endpoint_config_name=None,
            endpoint_name=name,
            run_id=name,
            config=load_config(),
            check_interval=1,
        )
        return deployed["endpoint_config_name"]

    return endpoint


@pytest.fixture
def register(sagemaker_config, local_sagemaker):
    def version(config, group: str, model_data_url: str, accuracy: float, run_id: str = "run") -> str:
        return register_version(config, local_sagemaker, group, model_data_url, accuracy, run_id)

    return version


def test_the_champion_is_the_latest_approved_version_the_endpoint_serves(sagemaker_config, serve, register):
    name = f"gate-{uuid.uuid4().hex[:8]}"
    # No endpoint yet: no champion, only the floor applies.
    first = judge(sagemaker_config, name, 0.95, min_test_accuracy=0.9, tolerance=0.005)
    assert first["deploy"] is True and first["champion_accuracy"] is None

    config_name = serve(name)
    assert serving_endpoint_config(sagemaker_config, name) == config_name
    # Serving a model no Approved version names (deployed by hand): still no champion.
    serving = register(sagemaker_config, name, MODEL, 0.97)
    assert champion(sagemaker_config, name) is None
    set_approval(sagemaker_config, serving, APPROVED, "checked by hand")
    found = champion(sagemaker_config, name)
    assert found["model_package_arn"] == serving and found["test_accuracy"] == 0.97
    assert found["endpoint_config_name"] == config_name and found["version"] == 1

    refused = judge(sagemaker_config, name, 0.96, min_test_accuracy=0.9, tolerance=0.005)
    assert refused["deploy"] is False
    assert "below the champion's 0.9700 minus tolerance 0.0050" in refused["reason"]
    assert refused["champion_accuracy"] == 0.97 and refused["champion_version"] == serving
    passed = judge(sagemaker_config, name, 0.968, min_test_accuracy=0.9, tolerance=0.005)
    assert passed["deploy"] is True and passed["champion_model_data_url"] == MODEL

    # A newer Approved version that does not serve (a person approved it) is not the champion: it is what serves
    # next. One with a better claim but Rejected is neither.
    newer = register(sagemaker_config, name, OTHER, 0.99)
    rejected = register(sagemaker_config, name, OTHER, 0.999)
    set_approval(sagemaker_config, rejected, REJECTED, "failed its check")
    assert approved_to_serve(sagemaker_config, name, found) is None  # pending: nothing yet
    set_approval(sagemaker_config, newer, APPROVED, "looked good")
    assert champion(sagemaker_config, name)["model_package_arn"] == serving
    assert approved_to_serve(sagemaker_config, name, found)["model_package_arn"] == newer
    assert judge(sagemaker_config, name, 0.96, min_test_accuracy=0.9)["champion_accuracy"] == 0.97


def test_what_a_run_deploys_under_each_approval_mode(sagemaker_config, serve, register):
    name = f"choose-{uuid.uuid4().hex[:8]}"
    serve(name)
    current = register(sagemaker_config, name, MODEL, 0.97)
    set_approval(sagemaker_config, current, APPROVED, "serves")
    ours = register(sagemaker_config, name, OTHER, 0.98, run_id="this-run")

    auto = choose_model(sagemaker_config, name, enabled=True, approval="auto", registered=ours)
    assert auto["deploy"] is True and auto["model"]["model_package_arn"] == ours
    assert auto["model"]["model_data_url"] == OTHER and auto["model"]["test_accuracy"] == 0.98
    assert auto["previous_endpoint_config_name"] == serving_endpoint_config(sagemaker_config, name)
    assert auto["reason"] == "this run's model, version 2, which the gate let through"

    manual = choose_model(sagemaker_config, name, enabled=True, approval="manual", registered=ours)
    assert manual["deploy"] is False and manual["model"] is None
    assert manual["reason"] == "version 2 awaits a person's approval (mnist-pipeline approve 2)"
    # Approved by a person: the next run (or a deploy-only one, which registers nothing) serves it.
    set_approval(sagemaker_config, find_version(sagemaker_config, name, "2")["ModelPackageArn"], APPROVED, "ok")
    for registered in (None, register(sagemaker_config, name, OTHER, 0.985, run_id="next-run")):
        nxt = choose_model(sagemaker_config, name, enabled=True, approval="manual", registered=registered)
        assert nxt["deploy"] is True and nxt["model"]["version"] == 2
        assert nxt["reason"].startswith("version 2 (from run this-run), approved since the champion was deployed")

    off = choose_model(sagemaker_config, name, enabled=False, approval="auto", registered=ours)
    assert off == {"deploy": False, "reason": "the deploy param is off for this run", "model": None}
    with pytest.raises(ValueError, match="approval must be one of auto, manual, not 'sometimes'"):
        choose_model(sagemaker_config, name, enabled=True, approval="sometimes", registered=None)


def test_find_version_names_what_is_missing(sagemaker_config, register):
    from tasks.registry import VersionNotFound

    name = f"find-{uuid.uuid4().hex[:8]}"
    arn = register(sagemaker_config, name, MODEL, 0.97)
    assert find_version(sagemaker_config, name, "1")["ModelPackageArn"] == arn
    assert find_version(sagemaker_config, name, arn)["ModelPackageVersion"] == 1
    with pytest.raises(VersionNotFound, match=f"model package group {name} has no version 7"):
        find_version(sagemaker_config, name, "7")
    with pytest.raises(VersionNotFound, match="'latest' is neither a version number nor a model package version ARN"):
        find_version(sagemaker_config, name, "latest")


def test_gate_ignores_the_champion_of_a_deleted_endpoint(sagemaker_config, serve, register, local_sagemaker):
    name = f"gone-{uuid.uuid4().hex[:8]}"
    serve(name)
    set_approval(sagemaker_config, register(sagemaker_config, name, MODEL, 0.99), APPROVED, "serves")
    assert champion(sagemaker_config, name)["test_accuracy"] == 0.99
    sagemaker = boto3.client("sagemaker", endpoint_url=local_sagemaker)
    sagemaker.delete_endpoint(EndpointName=name)
    sagemaker.get_waiter("endpoint_deleted").wait(EndpointName=name, WaiterConfig={"Delay": 1})
    result = judge(sagemaker_config, name, 0.95, min_test_accuracy=0.9, tolerance=0.005)
    assert result["deploy"] is True
    assert result["champion_accuracy"] is None
