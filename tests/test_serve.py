"""The local endpoint server (python -m inference.serve): real server processes on 127.0.0.1, a model artifact
fetched from the local S3 (moto server), boto3's sagemaker-runtime client, and metrics in the local CloudWatch.
The servers get the local AWS as SageMaker's containers get AWS: through the standard environment, no Airflow."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import boto3
import httpx
import numpy as np
import psutil
import pytest
from botocore.exceptions import ClientError

from inference.artifact import ArtifactError, prepare_model_dir, safe_extract
from inference.serve import Endpoint, server_command
from local_sagemaker.processes import free_port, wait_for_http
from tests.conftest import ROOT
from tests.helpers.endpoints import npy_claiming, npy_fields, server_env
from tests.helpers.polling import wait_until

pytest_plugins = ["tests.helpers.model_artifact"]  # the model_dir, model_tarball and test_set fixtures

ENDPOINT = "serve-test"


@contextlib.contextmanager
def running_server(command: list[str], port: int, log_path: Path, env: dict | None = None):
    """Start a server process; yield (url, process) once /ping answers; stop it with SIGTERM."""
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/ping", timeout=180, process=process)
        yield url, process
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        finally:
            with contextlib.suppress(ProcessLookupError):  # anything of its session still alive
                os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def s3_model(local_aws, model_tarball) -> str:
    s3 = boto3.client("s3", endpoint_url=local_aws, region_name="us-east-1")
    s3.create_bucket(Bucket="serve-tests")
    s3.upload_file(str(model_tarball), "serve-tests", "models/job-1/output/model.tar.gz")
    return "s3://serve-tests/models/job-1/output/model.tar.gz"


@pytest.fixture(scope="module")
def server(s3_model, local_aws, tmp_path_factory):
    """Two server processes serving the model.tar.gz from S3, publishing metrics every half second."""
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    port = free_port()
    command = server_command(s3_model, port, endpoint_name=ENDPOINT, workers=2, metrics_interval=0.5)
    with running_server(command, port, log_path, server_env(local_aws)) as (url, process):
        yield url, process
    assert process.returncode == 0, log_path.read_text()


def json_body(images: np.ndarray) -> bytes:
    return json.dumps({"instances": images.tolist()}).encode()


def runtime_client(url: str):
    return boto3.client("sagemaker-runtime", endpoint_url=url, region_name="us-east-1")


def test_ping(server):
    url, _ = server
    assert httpx.get(f"{url}/ping").status_code == 200


def test_invocations(server, test_set):
    url, _ = server
    images, labels = test_set
    reply = httpx.post(f"{url}/invocations", content=json_body(images), headers={"Content-Type": "application/json"})
    assert reply.status_code == 200 and reply.headers["content-type"] == "application/json"
    timing = dict(part.split(";dur=") for part in reply.headers["server-timing"].split(", "))
    assert set(timing) == {"read", "handler"} and all(float(ms) > 0 for ms in timing.values())
    predicted = [p["label"] for p in reply.json()["predictions"]]
    assert np.mean(np.array(predicted) == labels) >= 0.95


def test_boto3_invoke_endpoint_through_endpoint_url(server, test_set):
    url, _ = server
    images, labels = test_set
    client = runtime_client(url)
    response = client.invoke_endpoint(
        EndpointName=ENDPOINT, ContentType="application/json", Accept="application/json", Body=json_body(images[:8])
    )
    assert response["ContentType"] == "application/json"
    assert response["InvokedProductionVariant"] == "AllTraffic"
    predictions = json.loads(response["Body"].read())["predictions"]
    assert [p["label"] for p in predictions] == [p["label"] for p in predictions_over_http(url, images[:8])]
    assert np.mean(np.array([p["label"] for p in predictions]) == labels[:8]) >= 0.75

    # A model that answers 4xx reaches the caller as SageMaker's ModelError, with the model's own status and message.
    with pytest.raises(ClientError) as error:
        client.invoke_endpoint(EndpointName=ENDPOINT, ContentType="application/json", Body=b'{"instances": []}')
    assert error.value.response["Error"]["Code"] == "ModelError"
    assert error.value.response["OriginalStatusCode"] == 400
    assert "no images" in error.value.response["OriginalMessage"]
    with pytest.raises(ClientError) as error:  # refused before the server reads it, and boto3 still gets the answer
        client.invoke_endpoint(EndpointName=ENDPOINT, ContentType="application/x-npy", Body=bytes(7 * 1024 * 1024))
    assert error.value.response["OriginalStatusCode"] == 413
    with pytest.raises(ClientError) as error:
        client.invoke_endpoint(EndpointName="no-such-endpoint", ContentType="application/json", Body=b"{}")
    assert error.value.response["Error"]["Code"] == "ValidationError"


def predictions_over_http(url: str, images: np.ndarray) -> list[dict]:
    reply = httpx.post(f"{url}/invocations", content=json_body(images), headers={"Content-Type": "application/json"})
    return reply.raise_for_status().json()["predictions"]


BAD_REQUESTS = [
    ("application/json", b'{"instances": [[1, 2,', 400, "malformed JSON"),
    ("application/json", b'{"instances": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, "malformed JSON"),
    ("application/json", b'{"instances": [[1, 2, 3]]}', 400, "28x28 or 784"),
    ("application/json", b'{"instances": [[NaN' + b", 0" * 783 + b"]]}", 400, "NaN or infinity"),
    ("application/json", json.dumps({"instances": [[300] * 784]}).encode(), 400, "within 0-255"),
    ("application/json", b"", 400, "empty request body"),
    ("application/x-npy", b"\x93NUMPY\x01\x00 not an array", 400, "not a numeric .npy"),
    # A header that declares 10^12 float64s: refused as the sender's error, never a MemoryError's 500.
    ("application/x-npy", npy_claiming(npy_fields(shape=(10**12,))), 400, "declares shape [1000000000000]"),
    ("text/csv", b"a,b\n", 400, "CSV must hold"),
    ("image/jpeg", b"GIF89a not a jpeg", 400, "not a PNG or JPEG"),
    ("application/xml", b"<digit/>", 415, "unsupported content type"),
    ("application/x-npy", b"\0" * (6 * 1024 * 1024 + 1), 413, "larger than"),
]


def test_bad_requests_get_4xx_json_and_the_server_stays_up(server, test_set):
    url, process = server
    workers = {child.pid for child in psutil.Process(process.pid).children(recursive=True)}
    with httpx.Client(base_url=url, timeout=30) as client:
        for content_type, body, status, expected in BAD_REQUESTS:
            reply = client.post("/invocations", content=body, headers={"Content-Type": content_type})
            assert reply.status_code == status, (content_type, body[:40], reply.text)
            assert reply.headers["content-type"] == "application/json"
            assert expected in reply.json()["error"], reply.json()
        chunked = client.post(
            "/invocations", content=iter([b"\0" * 1024 * 1024] * 7), headers={"Content-Type": "application/x-npy"}
        )
        assert chunked.status_code == 413  # no Content-Length to go by: counted while reading
        assert client.get("/invocations").status_code == 405
        assert client.post("/ping").status_code == 405
        missing = client.post("/predict", content=b"{}")
        assert missing.status_code == 404 and "POST /invocations" in missing.json()["error"]
        assert client.get("/ping").status_code == 200
    assert predictions_over_http(url, test_set[0][:2])
    assert {child.pid for child in psutil.Process(process.pid).children(recursive=True)} == workers  # none crashed


def metric_sums(
    cloudwatch, namespace: str, names: list[str], since: datetime, endpoint: str = ENDPOINT, variant: str = "AllTraffic"
) -> dict[str, dict]:
    dimensions = [{"Name": "EndpointName", "Value": endpoint}, {"Name": "VariantName", "Value": variant}]
    totals = {}
    for name in names:
        points = cloudwatch.get_metric_statistics(
            Namespace=namespace,
            MetricName=name,
            Dimensions=dimensions,
            StartTime=since,
            EndTime=datetime.now(UTC) + timedelta(minutes=1),
            Period=60,
            Statistics=["Sum", "SampleCount", "Minimum", "Maximum"],
        )["Datapoints"]
        totals[name] = {
            "Sum": sum(p["Sum"] for p in points),
            "SampleCount": sum(p["SampleCount"] for p in points),
            "Minimum": min((p["Minimum"] for p in points), default=None),
            "Maximum": max((p["Maximum"] for p in points), default=None),
            "Unit": {p["Unit"] for p in points},
        }
    return totals


def test_metrics_reach_the_local_cloudwatch(server, local_aws, test_set):
    url, _ = server
    cloudwatch = boto3.client("cloudwatch", endpoint_url=local_aws, region_name="us-east-1")
    since = datetime.now(UTC) - timedelta(hours=1)
    names = ["Invocations", "Invocation4XXErrors", "Invocation5XXErrors", "ModelLatency", "OverheadLatency"]

    def totals():
        return metric_sums(cloudwatch, "AWS/SageMaker", names, since)

    def settled():  # the totals once what earlier tests sent has been published (two intervals without change)
        previous = totals()
        while True:
            time.sleep(1.5)
            current = totals()
            if current == previous:
                return current
            previous = current

    before = settled()
    for _ in range(7):
        predictions_over_http(url, test_set[0][:1])
    for _ in range(3):
        httpx.post(f"{url}/invocations", content=b"[]", headers={"Content-Type": "application/json"})
    after = wait_until(
        totals,
        lambda after: after["Invocations"]["Sum"] >= before["Invocations"]["Sum"] + 10,
        timeout=60,
        interval=0.5,
        failure=lambda after: f"metrics did not arrive: {after}",
    )

    def added(name, statistic="Sum"):
        return after[name][statistic] - before[name][statistic]

    assert added("Invocations") == 10 and added("Invocations", "SampleCount") == 10
    assert added("Invocation4XXErrors") == 3 and added("Invocation5XXErrors") == 0
    assert after["Invocations"]["Unit"] == {"None"}
    for latency in ("ModelLatency", "OverheadLatency"):
        assert added(latency, "SampleCount") == 10
        assert after[latency]["Unit"] == {"Microseconds"}
        assert 0 < after[latency]["Minimum"] <= after[latency]["Maximum"] < 10_000_000
    instance = metric_sums(cloudwatch, "/aws/sagemaker/Endpoints", ["CPUUtilization", "MemoryUtilization"], since)
    assert instance["CPUUtilization"]["SampleCount"] > 0 and instance["CPUUtilization"]["Unit"] == {"Percent"}
    assert 0 < instance["MemoryUtilization"]["Maximum"] < 100


def test_a_burst_is_published_at_once_and_what_is_left_at_sigterm(model_dir, local_aws, test_set, tmp_path):
    """With a 30 s interval, the Invocations of a few requests are in CloudWatch within seconds of the last one
    (each process sends its counts when its requests pause, and the collector publishes them); those of the
    requests just before a SIGTERM are there once the server has exited."""
    cloudwatch = boto3.client("cloudwatch", endpoint_url=local_aws, region_name="us-east-1")
    since = datetime.now(UTC) - timedelta(hours=1)

    def invocations() -> float:
        totals = metric_sums(cloudwatch, "AWS/SageMaker", ["Invocations"], since, "flush-test", "blue")
        return totals["Invocations"]["Sum"]

    port = free_port()
    command = server_command(
        str(model_dir), port, endpoint_name="flush-test", workers=2, metrics_interval=30, variant_name="blue"
    )
    with running_server(command, port, tmp_path / "server.log", server_env(local_aws)) as (url, process):
        for _ in range(6):
            predictions_over_http(url, test_set[0][:1])
        answered = time.monotonic()
        while (published := invocations()) < 6:
            assert time.monotonic() - answered < 3, f"{published} of 6 invocations in CloudWatch after 3 s"
            time.sleep(0.1)
        assert published == 6
        for _ in range(4):
            predictions_over_http(url, test_set[0][:1])
        process.terminate()
        assert process.wait(timeout=30) == 0, (tmp_path / "server.log").read_text()
    assert invocations() == 10


def test_the_server_needs_neither_the_pipeline_nor_airflow(s3_model, local_aws, tmp_path):
    """The server imports nothing of tasks/ or Airflow, as the SageMaker container has neither: not even when it
    fetches a model from S3 and builds its CloudWatch client, which import what they need when they run."""
    script = f"""
import argparse, sys
from inference import artifact, metrics, serve
artifact.prepare_model_dir({s3_model!r}, {str(tmp_path)!r})
metrics.MetricsPublisher("import-test", "AllTraffic", 1.0)._cloudwatch()
serve.add_arguments(argparse.ArgumentParser())
imported = sorted({{name.split(".")[0] for name in sys.modules}} & {{"airflow", "tasks"}})
assert not imported, imported
"""
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=server_env(local_aws), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert (next(tmp_path.glob("model-*")) / "code" / "inference.py").is_file()


def test_a_dead_cloudwatch_neither_fails_nor_slows_requests(model_dir, test_set, tmp_path):
    """CloudWatch accepts connections and never answers: the console script's server answers as usual."""
    black_hole = socket.create_server(("127.0.0.1", 0))
    env = server_env(f"http://127.0.0.1:{black_hole.getsockname()[1]}")
    port = free_port()
    command = [
        str(Path(sys.executable).with_name("mnist-pipeline")),
        "serve",
        "--model-dir",
        str(model_dir),
        "--endpoint-name",
        "dead-cloudwatch",
        "--workers",
        "1",
        "--metrics-interval",
        "0.2",
        "--port",
        str(port),
    ]
    with black_hole, running_server(command, port, tmp_path / "server.log", env) as (url, _):
        started, publishing_since, slowest = time.monotonic(), None, 0.0
        # Requests while the publisher waits for an answer (5 s) from the CloudWatch that never gives one.
        while publishing_since is None or time.monotonic() - publishing_since < 2:
            assert time.monotonic() - started < 60, "the server never tried to publish its metrics"
            sent = time.monotonic()
            assert predictions_over_http(url, test_set[0][:1])
            slowest = max(slowest, time.monotonic() - sent)
            if publishing_since is None and select.select([black_hole], [], [], 0)[0]:
                publishing_since = time.monotonic()
    assert slowest < 2.5  # a request held up by the publisher would wait out its 5 s read timeout


def test_a_broken_handler_answers_500_and_keeps_serving(model_dir, tmp_path, caplog):
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    with open(broken / "code" / "inference.py", "a") as handler:
        handler.write("\n\ndef predict_fn(data, model):\n    raise RuntimeError('the model is broken')\n")
    endpoint = Endpoint(str(broken))
    body = json.dumps({"instances": [[0] * 784]}).encode()

    async def requests_together():  # the batch's failure reaches each request that shared it
        return await asyncio.gather(*(endpoint.invoke(body, "application/json", None) for _ in range(3)))

    for status, payload, content_type in asyncio.run(requests_together()):
        assert (status, content_type) == (500, "application/json")
        message = json.loads(payload)["error"]
        assert message == "the model handler failed (RuntimeError); the endpoint's log has the details"
        assert "the model is broken" not in message  # the exception's text stays in the log
    assert "the model is broken" in caplog.text
    # input_fn still judges the input first
    assert asyncio.run(endpoint.invoke(b"{}", "application/json", None))[0] == 400


def test_a_large_batch_is_split_between_the_cores_and_answers_as_one(model_dir, test_set):
    endpoint = Endpoint(model_dir, cpus=2)
    calls = []
    predict_fn = endpoint.handler.predict_fn
    endpoint.handler.predict_fn = lambda data, model: calls.append(len(data)) or predict_fn(data, model)
    images = np.concatenate([test_set[0]] * (300 // len(test_set[0]) + 1))[:300]
    status, payload, _ = asyncio.run(endpoint.invoke(json_body(images), "application/json", None))
    assert status == 200 and calls == [150, 150]
    whole = predict_fn(endpoint.handler.input_fn(json_body(images), "application/json"), endpoint.model)
    probabilities = [p["probabilities"] for p in json.loads(payload)["predictions"]]
    np.testing.assert_allclose(probabilities, whole.numpy(), atol=1e-5)


def test_requests_that_arrive_together_share_one_forward_pass(model_dir, test_set):
    endpoint = Endpoint(model_dir)
    calls = []
    predict_fn = endpoint.handler.predict_fn
    endpoint.handler.predict_fn = lambda data, model: calls.append(len(data)) or predict_fn(data, model)
    images = test_set[0]
    requests = [images[i : i + size] for i, size in ((0, 1), (1, 3), (4, 2), (6, 1))]

    async def together():
        return await asyncio.gather(*(endpoint.invoke(json_body(r), "application/json", None) for r in requests))

    shared = asyncio.run(together())
    assert calls == [7]
    calls.clear()
    alone = [asyncio.run(endpoint.invoke(json_body(r), "application/json", None)) for r in requests]
    assert calls == [1, 3, 2, 1]
    for (status, payload, _), (_, payload_alone, _) in zip(shared, alone, strict=True):
        assert status == 200
        together_probabilities = [p["probabilities"] for p in json.loads(payload)["predictions"]]
        alone_probabilities = [p["probabilities"] for p in json.loads(payload_alone)["predictions"]]
        np.testing.assert_allclose(together_probabilities, alone_probabilities, atol=1e-5)


def test_a_model_that_cannot_load_stops_the_server_instead_of_restarting_it(model_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    (broken / "model.pth").write_bytes(b"not a state dict")
    command = [
        sys.executable,
        "-m",
        "inference.serve",
        "--model-dir",
        str(broken),
        "--workers",
        "2",
        "--no-metrics",
        "--port",
        str(free_port()),
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert result.returncode != 0
    assert "cannot load the model" in result.stderr and "model.pth: not a state_dict" in result.stderr, result.stderr


def test_model_tarball_unpacks_to_a_model_directory(model_tarball, model_dir, tmp_path):
    unpacked = prepare_model_dir(str(model_tarball), tmp_path)
    for name in ("model.pth", "model_config.json", "code/inference.py", "code/models.py"):
        assert (unpacked / name).read_bytes() == (model_dir / name).read_bytes()
    assert prepare_model_dir(str(model_dir), tmp_path) == model_dir.resolve()
    with pytest.raises(ArtifactError, match="no such model directory"):
        prepare_model_dir(str(tmp_path / "missing.tar.gz"), tmp_path)


def evil_tarball(path: Path, member: tarfile.TarInfo, data: bytes = b"") -> Path:
    with tarfile.open(path, "w:gz") as tar:
        harmless = tarfile.TarInfo("model_config.json")
        harmless.size = 2
        tar.addfile(harmless, io.BytesIO(b"{}"))
        member.size = len(data) if member.isfile() else 0
        tar.addfile(member, io.BytesIO(data) if data else None)
    return path


def link(name: str, target: str, kind: bytes) -> tarfile.TarInfo:
    """A tar member of another kind than a file (symbolic or hard link, device)."""
    member = tarfile.TarInfo(name)
    member.type, member.linkname = kind, target
    return member


@pytest.mark.parametrize(
    "member",
    [
        tarfile.TarInfo("../escaped.txt"),
        tarfile.TarInfo("code/../../escaped.txt"),
        link("code/models.py", "/etc/passwd", tarfile.SYMTYPE),
        link("code/models.py", "../../../etc/passwd", tarfile.SYMTYPE),
        link("model.pth", "/etc/passwd", tarfile.LNKTYPE),
        link("code/tty", "", tarfile.CHRTYPE),
    ],
    ids=["dot-dot", "nested-dot-dot", "absolute-symlink", "relative-symlink-out", "hardlink-out", "device"],
)
def test_unsafe_tar_members_are_refused_and_nothing_is_extracted(member, tmp_path):
    archive = evil_tarball(tmp_path / "model.tar.gz", member, b"pwned" if member.isfile() else b"")
    target = tmp_path / "deep" / "target"
    target.mkdir(parents=True)
    with pytest.raises(ArtifactError, match="unsafe member"):
        safe_extract(archive, target)
    assert list(target.iterdir()) == []
    assert not (tmp_path / "deep" / "escaped.txt").exists()
    workdir = tmp_path / "work"
    workdir.mkdir()
    with pytest.raises(ArtifactError, match="unsafe member"):
        prepare_model_dir(str(archive), workdir)
    assert list(workdir.iterdir()) == []  # the half-made model directory is gone


def test_absolute_member_names_land_inside_the_target(tmp_path):
    outside = tmp_path / "outside.txt"
    archive = evil_tarball(tmp_path / "model.tar.gz", tarfile.TarInfo(str(outside)), b"data")
    target = tmp_path / "target"
    target.mkdir()
    safe_extract(archive, target)
    assert not outside.exists()
    assert (target / str(outside).lstrip("/")).read_bytes() == b"data"


def test_the_server_refuses_an_unsafe_archive_and_exits(tmp_path):
    archive = evil_tarball(tmp_path / "model.tar.gz", tarfile.TarInfo("../escaped.txt"), b"pwned")
    result = subprocess.run(
        [sys.executable, "-m", "inference.serve", "--model-dir", str(archive), "--no-metrics"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "unsafe member" in result.stderr
