"""Local endpoints: real model servers and the local runtime on 127.0.0.1, called with boto3's sagemaker-runtime.

The blue/green test keeps three clients invoking the endpoint while it switches models, and requires every one of
their requests to succeed, answered first by the old model and then by the new one.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import boto3
import numpy as np
import psutil
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from tasks import local_endpoints
from tasks.config import load_config
from tests.endpoint_helpers import model_artifacts
from training.mnist_idx import load_mnist

SERVER = {"workers": 1, "metrics_interval": None}  # one process each on 2 cores; CloudWatch is the monitoring's test


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, small_mnist) -> dict:
    """Two models that answer differently: a trained one ("a") and the same with shuffled weights ("b")."""
    built = model_artifacts(small_mnist, tmp_path_factory.getbasetemp() / "model-artifacts")
    return {"a": str(built["good"]), "b": str(built["shuffled"])}


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    config = load_config(state_dir=str(tmp_path_factory.mktemp("endpoint-state")))
    yield config
    local_endpoints.stop_all(config)


@pytest.fixture(scope="module")
def image_body(small_mnist) -> bytes:
    return json.dumps({"instances": [load_mnist(small_mnist)["test_images"][0].tolist()]}).encode()


def _client(url: str):
    # No retries: a request that fails must count as failed, not be sent again.
    return boto3.client("sagemaker-runtime", endpoint_url=url, config=Config(retries={"total_max_attempts": 1}))


def _probabilities(client, name: str, body: bytes) -> list[float]:
    reply = client.invoke_endpoint(EndpointName=name, Body=body, ContentType="application/json")
    assert reply["InvokedProductionVariant"] == "AllTraffic"
    return json.loads(reply["Body"].read())["predictions"][0]["probabilities"]


def test_endpoint_names_are_checked(config):
    with pytest.raises(ValueError, match=r"endpoint name '../evil' is invalid"):
        local_endpoints.create_or_update_endpoint("../evil", "/nowhere", "c1", config)
    with pytest.raises(local_endpoints.EndpointNotFound, match="Could not find local endpoint 'absent'"):
        local_endpoints.describe_endpoint("absent", config)


def test_blue_green_switch_under_load_fails_no_request_then_rollback_and_stop(config, artifacts, image_body, tmp_path):
    created = local_endpoints.create_or_update_endpoint("digits", artifacts["a"], "digits-a", config, **SERVER)
    assert created["created"] is True and created["previous_endpoint_config_name"] is None
    runtime = created["runtime_url"]
    first = local_endpoints.describe_endpoint("digits", config)
    assert first["EndpointStatus"] == "InService" and first["EndpointConfigName"] == "digits-a"
    answer_a = _probabilities(_client(runtime), "digits", image_body)

    answers, failures, stop = [], [], threading.Event()

    def invoke_until_stopped():
        client = _client(runtime)
        while not stop.is_set():
            try:
                answers.append(_probabilities(client, "digits", image_body))
            except Exception as error:
                failures.append(repr(error))

    clients = [threading.Thread(target=invoke_until_stopped) for _ in range(3)]
    for thread in clients:
        thread.start()
    try:
        time.sleep(0.5)
        updated = local_endpoints.create_or_update_endpoint("digits", artifacts["b"], "digits-b", config, **SERVER)
        time.sleep(0.5)
    finally:
        stop.set()
        for thread in clients:
            thread.join()

    assert failures == []
    assert updated["runtime_url"] == runtime  # clients keep one address across the switch
    assert updated["previous_endpoint_config_name"] == "digits-a" and updated["created"] is False
    # Which model answered: requests batched together differ from a lone one's answer in the last float bits.
    served_by_a = [np.allclose(answer, answer_a, atol=1e-5) for answer in answers]
    assert served_by_a[0] and not served_by_a[-1]
    switch = served_by_a.index(False)
    assert not any(served_by_a[switch:])  # once B answers, A never does again
    assert len(answers) > 20
    assert not psutil.pid_exists(first["Pid"])  # the old server was stopped once drained

    # A retry of the same deployment leaves the serving server alone.
    serving = local_endpoints.describe_endpoint("digits", config)
    again = local_endpoints.create_or_update_endpoint("digits", artifacts["b"], "digits-b", config, **SERVER)
    assert again == updated
    assert local_endpoints.describe_endpoint("digits", config)["Pid"] == serving["Pid"]

    # Rollback restores model A behind the same address; a second rollback of the same config does nothing.
    restored = local_endpoints.rollback_endpoint("digits", "digits-b", config)
    assert restored == {"action": "restored", "endpoint_name": "digits", "endpoint_config_name": "digits-a"}
    assert _probabilities(_client(runtime), "digits", image_body) == answer_a
    assert local_endpoints.rollback_endpoint("digits", "digits-b", config)["action"] == "none"
    serving = local_endpoints.describe_endpoint("digits", config)
    assert serving["EndpointConfigName"] == "digits-a"

    # A new server that cannot start fails the update with its log, and changes nothing.
    with pytest.raises(RuntimeError, match=r"(?s)model server for endpoint digits.*no such model directory"):
        local_endpoints.create_or_update_endpoint("digits", str(tmp_path / "missing"), "digits-c", config, **SERVER)
    assert local_endpoints.describe_endpoint("digits", config) == serving
    assert _probabilities(_client(runtime), "digits", image_body) == answer_a

    # The local stack's `down`: every server and the runtime stop.
    runtime_pid = json.loads((Path(config.state_dir) / "local-runtime.json").read_text())["pid"]
    assert local_endpoints.stop_all(config) == ["digits"]
    assert not psutil.pid_exists(serving["Pid"]) and not psutil.pid_exists(runtime_pid)
    assert local_endpoints.list_endpoints(config) == [] and local_endpoints.stop_all(config) == []


def test_rollback_of_a_created_endpoint_deletes_it(config, artifacts, image_body):
    fresh = local_endpoints.create_or_update_endpoint("fresh", artifacts["b"], "fresh-b", config, **SERVER)
    pid = local_endpoints.describe_endpoint("fresh", config)["Pid"]
    result = local_endpoints.rollback_endpoint("fresh", "fresh-b", config)
    assert result == {"action": "deleted", "endpoint_name": "fresh", "endpoint_config_name": None}
    assert "fresh" not in local_endpoints.list_endpoints(config)
    assert not psutil.pid_exists(pid)
    with pytest.raises(ClientError, match="Endpoint fresh not found") as error:
        _probabilities(_client(fresh["runtime_url"]), "fresh", image_body)
    assert error.value.response["Error"]["Code"] == "ValidationError"
    with pytest.raises(local_endpoints.EndpointNotFound):
        local_endpoints.delete_endpoint("fresh", config)
