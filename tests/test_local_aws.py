"""The local AWS keeps its state in a file across restarts, and answers no cross-origin browser request.

Real local AWS processes on 127.0.0.1, killed (SIGKILL, as a crash would) and started again on the same file.
"""

from __future__ import annotations

import gzip
import http.client
import io
import json
import os
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

import boto3
import pytest
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import ClientError

from tasks.s3 import checksums
from tests.conftest import start_test_aws

MiB = 1024 * 1024
BUCKET = "local-aws-state"


class Server:
    """Local AWS servers started one after another on one state file, as `mnist-pipeline up` after a crash would."""

    def __init__(self, state_file):
        self.state_file = state_file
        self.log = state_file.parent / "local-aws.log"
        self.process = None

    def start(self) -> str:
        self.log.unlink(missing_ok=True)
        self.process, endpoint_url = start_test_aws(
            self.state_file.parent, state_file=self.state_file, log_path=self.log
        )
        return endpoint_url

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()

    def restart(self) -> str:
        self.kill()
        return self.start()


@pytest.fixture
def server(tmp_path):
    server = Server(tmp_path / "state" / "local-aws.jsonl")
    yield server
    if server.process is not None and server.process.poll() is None:
        server.kill()


def s3(endpoint_url: str):
    return boto3.client("s3", endpoint_url=endpoint_url)


def put_verified(client, key: str, body: bytes) -> None:
    """As the dataset upload sends objects: with the MD5 and SHA-256 that S3 checks the body against."""
    client.put_object(Bucket=BUCKET, Key=key, Body=body, **checksums(body))


def stored(client) -> dict[str, bytes]:
    keys = [item["Key"] for item in client.list_objects_v2(Bucket=BUCKET).get("Contents", [])]
    return {key: client.get_object(Bucket=BUCKET, Key=key)["Body"].read() for key in keys}


def tarball(payload: bytes) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        member = tarfile.TarInfo("model.pth")
        member.size = len(payload)
        archive.addfile(member, io.BytesIO(payload))
    return buffer.getvalue()


def test_objects_metrics_alarms_logs_and_topics_survive_a_crash(server):
    endpoint_url = server.start()
    client = s3(endpoint_url)
    client.create_bucket(Bucket=BUCKET)
    objects = {
        "datasets/train-images-idx3-ubyte.gz": gzip.compress(os.urandom(2 * MiB)),
        "models/a b+c%d/output.tar.gz": tarball(os.urandom(MiB)),
    }
    for key, body in objects.items():
        put_verified(client, key, body)
    # A multipart upload: the replayed server gives it a new upload ID, which the recorded parts must follow.
    objects["models/large.bin"] = os.urandom(6 * MiB)
    client.upload_fileobj(
        io.BytesIO(objects["models/large.bin"]),
        BUCKET,
        "models/large.bin",
        Config=TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB),
    )
    with pytest.raises(ClientError, match="NoSuchBucket"):  # recorded too, and fails again on replay
        client.put_object(Bucket="no-such-bucket", Key="x", Body=b"x")
    heads = {key: client.head_object(Bucket=BUCKET, Key=key, ChecksumMode="ENABLED") for key in objects}

    cloudwatch = boto3.client("cloudwatch", endpoint_url=endpoint_url)
    sent_at = datetime.now(UTC).replace(microsecond=0)
    cloudwatch.put_metric_data(
        Namespace="mnist", MetricData=[{"MetricName": "Latency", "Value": 42.0, "Timestamp": sent_at}]
    )
    cloudwatch.put_metric_alarm(
        AlarmName="mnist-latency",
        Namespace="mnist",
        MetricName="Latency",
        Statistic="Average",
        Period=60,
        EvaluationPeriods=1,
        Threshold=100.0,
        ComparisonOperator="GreaterThanThreshold",
    )
    logs = boto3.client("logs", endpoint_url=endpoint_url)
    logs.create_log_group(logGroupName="/mnist/endpoint")
    logs.create_log_stream(logGroupName="/mnist/endpoint", logStreamName="variant-a")
    logs.put_log_events(
        logGroupName="/mnist/endpoint",
        logStreamName="variant-a",
        logEvents=[{"timestamp": int(time.time() * 1000), "message": "served 100 predictions"}],
    )
    topic_arn = boto3.client("sns", endpoint_url=endpoint_url).create_topic(Name="mnist-alarms")["TopicArn"]

    endpoint_url = server.restart()

    client = s3(endpoint_url)
    assert stored(client) == objects
    for key, head in heads.items():
        after = client.head_object(Bucket=BUCKET, Key=key, ChecksumMode="ENABLED")
        assert (after["ETag"], after.get("ChecksumSHA256")) == (head["ETag"], head.get("ChecksumSHA256")), key
    assert "ChecksumSHA256" in heads["datasets/train-images-idx3-ubyte.gz"]
    cloudwatch = boto3.client("cloudwatch", endpoint_url=endpoint_url)
    datapoints = cloudwatch.get_metric_statistics(
        Namespace="mnist",
        MetricName="Latency",
        StartTime=sent_at - timedelta(minutes=5),
        EndTime=sent_at + timedelta(minutes=5),
        Period=60,
        Statistics=["Maximum"],
    )["Datapoints"]
    assert [point["Maximum"] for point in datapoints] == [42.0]
    assert [alarm["AlarmName"] for alarm in cloudwatch.describe_alarms()["MetricAlarms"]] == ["mnist-latency"]
    events = boto3.client("logs", endpoint_url=endpoint_url).get_log_events(
        logGroupName="/mnist/endpoint", logStreamName="variant-a"
    )["events"]
    assert [event["message"] for event in events] == ["served 100 predictions"]
    topics = boto3.client("sns", endpoint_url=endpoint_url).list_topics()["Topics"]
    assert [topic["TopicArn"] for topic in topics] == [topic_arn]


def test_restarts_record_new_requests_but_not_the_replayed_ones(server):
    client = s3(server.start())
    client.create_bucket(Bucket=BUCKET)
    put_verified(client, "first", b"1" * 10_000)
    assert stored(client) == {"first": b"1" * 10_000}  # reads: nothing to replay, dropped from the file

    client = s3(server.restart())
    recorded = server.state_file.read_bytes()
    assert [json.loads(line)["method"] for line in recorded.splitlines()] == ["PUT", "PUT"]
    server.restart()
    server.restart()
    assert server.state_file.read_bytes() == recorded

    client = s3(server.restart())
    put_verified(client, "second", b"2" * 10_000)
    client = s3(server.restart())
    assert stored(client) == {"first": b"1" * 10_000, "second": b"2" * 10_000}


def test_a_request_cut_short_by_a_crash_is_skipped(server):
    client = s3(server.start())
    client.create_bucket(Bucket=BUCKET)
    put_verified(client, "kept", b"kept")
    put_verified(client, "torn", os.urandom(MiB))
    server.kill()
    with server.state_file.open("r+b") as recording:  # cut the last line in half, as a crash mid-write would
        recording.truncate(server.state_file.stat().st_size - MiB // 2)

    client = s3(server.start())
    assert stored(client) == {"kept": b"kept"}
    assert "local-aws.jsonl:3: skipping a recorded request that cannot be read" in server.log.read_text()
    put_verified(client, "after", b"after")  # not glued to the torn line: it was dropped before recording went on
    client = s3(server.restart())
    assert stored(client) == {"after": b"after", "kept": b"kept"}
    assert "skipping" not in server.log.read_text()


def test_concurrent_uploads_are_recorded_whole(server):
    client = s3(server.start())
    client.create_bucket(Bucket=BUCKET)
    # Over 8 KiB each: moto writes such a request in two writes, which other requests' would otherwise split.
    bodies = {f"part-{number}": os.urandom(256 * 1024) for number in range(32)}
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda key: client.put_object(Bucket=BUCKET, Key=key, Body=bodies[key]), bodies))

    client = s3(server.restart())
    assert "skipping" not in server.log.read_text()
    assert stored(client) == bodies


@pytest.fixture(scope="module")
def local_aws_without_state(tmp_path_factory):
    process, endpoint_url = start_test_aws(tmp_path_factory.mktemp("local-aws"))
    yield endpoint_url
    process.kill()
    process.wait()


@pytest.mark.parametrize(
    ("method", "path", "headers"),
    [
        ("GET", "/", {}),  # S3 ListBuckets
        ("GET", "/moto-api/", {}),
        ("OPTIONS", "/", {"Access-Control-Request-Method": "PUT"}),
        ("OPTIONS", f"/{BUCKET}/key", {"Access-Control-Request-Method": "PUT", "Access-Control-Request-Headers": "x"}),
    ],
)
def test_cross_origin_requests_get_no_cors_headers(local_aws_without_state, method, path, headers):
    endpoint = urlsplit(local_aws_without_state)
    connection = http.client.HTTPConnection(endpoint.hostname, endpoint.port, timeout=10)
    connection.request(method, path, headers={"Origin": "https://evil.example", **headers})
    response = connection.getresponse()
    response.read()
    connection.close()
    assert not [name for name, _ in response.getheaders() if name.lower().startswith("access-control-")]


def test_the_compose_service_keeps_its_state_across_a_stop(tmp_path):
    """`python -m local_aws`, as docker-compose runs it: in the foreground, stopped by SIGTERM, started again."""
    import signal
    import subprocess
    import sys

    from cli.local_aws import scratch_principals
    from local_sagemaker.processes import free_port
    from tests.conftest import KEYS

    port, state_file, ready = free_port(), tmp_path / "volume" / "local-aws.jsonl", tmp_path / "ready"
    url = f"http://127.0.0.1:{port}"
    principals = tmp_path / "principals.json"
    principals.write_text(json.dumps(scratch_principals(KEYS)))

    def serve() -> subprocess.Popen:
        """Started, and ready as the compose health check sees it: answering, with its state back."""
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "local_aws",
                "--principals",
                str(principals),
                "--port",
                str(port),
                "--state-file",
                str(state_file),
                "--ready-file",
                str(ready),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert process.poll() is None and time.monotonic() < deadline, "the local AWS did not become ready"
            time.sleep(0.1)
        return process

    process = serve()
    try:
        s3(url).create_bucket(Bucket=BUCKET)
        put_verified(s3(url), "summary.json", b'{"accuracy": 0.99}')
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) in (0, -signal.SIGTERM)
        assert not ready.exists()
        process = serve()
        assert stored(s3(url)) == {"summary.json": b'{"accuracy": 0.99}'}
    finally:  # SIGTERM: it stops its IAM evaluator first (a SIGKILL would leave that running)
        process.terminate()
        process.wait(timeout=30)
