"""The runtime port speaks HTTP/1.1 as the RFCs require, tried over raw sockets: trailers never change the request
that was checked, every early close is answered in its turn, header bytes are bounded as they arrive, Expect:
100-continue is honoured in order, and slow or too many clients are bounded.

The first tests go through the session's local SageMaker service to a real model server. The timers and the
connection cap are tried on a runtime of the same code started in this process with short limits, since the
service's own wait a minute."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time

import boto3
import pytest
from botocore.config import Config

from local_sagemaker import runtime_http
from local_sagemaker.routing import Router
from local_sagemaker.runtime import Runtime
from tests.helpers.endpoints import serve_trained_model
from tests.helpers.polling import wait_until
from tests.helpers.signing import signed_headers
from tests.test_service_endpoints import Raw, invocation, settled
from training.mnist_idx import load_mnist

BUCKET = "runtime-http"
ENDPOINT = "http-digits"


@pytest.fixture(scope="module")
def endpoint(local_sagemaker, local_aws, small_mnist, tmp_path_factory) -> str:
    """An endpoint serving a trained model; its name."""
    sagemaker, _ = serve_trained_model(
        local_sagemaker, local_aws, small_mnist, tmp_path_factory, BUCKET, "good/model.tar.gz", ENDPOINT
    )
    assert settled(sagemaker, ENDPOINT)["EndpointStatus"] == "InService"
    yield ENDPOINT
    sagemaker.delete_endpoint(EndpointName=ENDPOINT)


@pytest.fixture(scope="module")
def body(small_mnist) -> bytes:
    return json.dumps({"instances": [load_mnist(small_mnist)["test_images"][0].tolist()]}).encode()


def chunked(path: str, body: bytes, trailers: bytes = b"", pieces: int = 3) -> bytes:
    """A signed request whose body is sent chunked, in ``pieces`` chunks, then ``trailers`` (raw field lines)."""
    headers = {"Host": "runtime", "Content-Type": "application/json", "Transfer-Encoding": "chunked"}
    signed = signed_headers("POST", f"http://runtime{path}", headers, body)
    head = "".join(f"{name}: {value}\r\n" for name, value in signed.items())
    size = -(-len(body) // pieces)
    parts = [body[i : i + size] for i in range(0, len(body), size)]
    framed = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in parts)
    return f"POST {path} HTTP/1.1\r\n{head}\r\n".encode("latin-1") + framed + b"0\r\n" + trailers + b"\r\n"


def send_all(raw: Raw, data: bytes) -> None:
    """Send what the runtime may stop reading, once it has answered."""
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        raw.send(data)


def answered(raw: Raw) -> dict:
    status, headers, answer = raw.reply()
    assert status == 200, answer
    assert headers["x-amzn-invoked-production-variant"] == "AllTraffic"
    return json.loads(answer)


def refused(raw: Raw, status: int, message: str) -> None:
    got, headers, answer = raw.reply()
    assert (got, headers["connection"]) == (status, "close"), answer
    assert message in json.loads(answer)["message"]
    assert raw.closed()


def test_trailer_fields_never_change_the_request_that_was_checked(endpoint, body, local_sagemaker_runtime):
    """A Content-Type trailer would make the model parse JSON as .npy, a target-variant trailer would route to a
    variant that does not exist: both are kept apart from the header section, and the request is served as sent."""
    raw = Raw(local_sagemaker_runtime)
    trailers = b"Content-Type: application/x-npy\r\nX-Amzn-SageMaker-Target-Variant: Absent\r\n"
    raw.send(chunked(f"/endpoints/{endpoint}/invocations", body, trailers))
    assert len(answered(raw)["predictions"]) == 1
    raw.send(invocation(endpoint, body))  # and the connection serves on
    assert len(answered(raw)["predictions"]) == 1


@pytest.mark.parametrize(
    "last, status, message",
    [
        (b"POST /endpoints/x/invocations HTTP/1.1\r\nContent-Length: x\r\n\r\n", 400, "Malformed HTTP request"),
        (b"GET / HTTP/1.1\r\nHost: runtime\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n", 400, "upgrades"),
        (b"CONNECT runtime:443 HTTP/1.1\r\nHost: runtime:443\r\n\r\n", 400, "upgrades"),
        (
            b"POST /endpoints/x/invocations HTTP/1.1\r\nHost: runtime\r\nX-Long: " + b"a" * 70_000 + b"\r\n\r\n",
            431,
            "Request headers exceed 65536 bytes",
        ),
    ],
    ids=["malformed", "upgrade", "connect", "header-section"],
)
def test_a_request_that_ends_its_connection_is_answered_after_the_ones_before_it(
    endpoint, body, local_sagemaker_runtime, last, status, message
):
    raw = Raw(local_sagemaker_runtime)
    raw.send(invocation(endpoint, body) * 2 + last + invocation(endpoint, body))
    for _ in range(2):
        assert len(answered(raw)["predictions"]) == 1
    refused(raw, status, message)  # then nothing more: the request after it is never read


def test_a_body_past_the_discard_limit_is_answered_after_the_ones_before_it(endpoint, body, local_sagemaker_runtime):
    raw = Raw(local_sagemaker_runtime)
    head = b"POST /endpoints/x/invocations HTTP/1.1\r\nHost: runtime\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunk = b"%x\r\n%s\r\n" % (1 << 20, b" " * (1 << 20))
    sending = threading.Thread(target=send_all, args=(raw, invocation(endpoint, body) + head + chunk * 66))
    sending.start()
    assert len(answered(raw)["predictions"]) == 1
    refused(raw, 413, "exceeds the maximum of 6291456 bytes")
    sending.join()


def test_header_bytes_are_bounded_as_they_arrive(endpoint, local_sagemaker_runtime):
    """One field that never ends is refused once it passes the limit, not buffered until it ends; so is a trailer
    field, or a chunk extension, that never ends."""
    raw = Raw(local_sagemaker_runtime)
    raw.send(b"POST /endpoints/x/invocations HTTP/1.1\r\nHost: runtime\r\nX-Endless: ")
    for _ in range(40):  # up to 4 MB, in pieces of 100 KB, and the field never ends
        try:
            raw.send(b"a" * 100_000)
        except (BrokenPipeError, ConnectionResetError):
            break
    refused(raw, 431, "Request headers exceed 65536 bytes")

    raw = Raw(local_sagemaker_runtime)
    raw.send(
        b"POST /endpoints/x/invocations HTTP/1.1\r\nHost: runtime\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"1\r\na\r\n0\r\nX-Endless: "
    )
    for _ in range(40):
        try:
            raw.send(b"a" * 100_000)
        except (BrokenPipeError, ConnectionResetError):
            break
    refused(raw, 400, "Chunk framing and trailer fields exceed 65536 bytes")


def test_expect_continue_is_answered_in_order(endpoint, body, local_sagemaker_runtime):
    """A refused length gets its final status at once, and the body is never asked for; an accepted one gets its
    100 Continue only after the answers to the requests before it."""
    raw = Raw(local_sagemaker_runtime)
    raw.send(invocation(endpoint, b"", {"Content-Length": str(7 * 1024 * 1024), "Expect": "100-continue"}))
    refused(raw, 413, "Request payload of 7340032 bytes exceeds")

    raw = Raw(local_sagemaker_runtime)
    request = invocation(endpoint, body, {"Expect": "100-continue"})
    head, _, _ = request.partition(b"\r\n\r\n")
    raw.send(invocation(endpoint, body) + head + b"\r\n\r\n")
    assert len(answered(raw)["predictions"]) == 1  # first the answer to the request before it
    while b"\r\n\r\n" not in raw.buffer:
        raw._read()
    assert raw.buffer.startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
    raw.buffer = raw.buffer.removeprefix(b"HTTP/1.1 100 Continue\r\n\r\n")
    raw.send(body)
    assert len(answered(raw)["predictions"]) == 1


@pytest.fixture
def short_runtime(monkeypatch):
    """A runtime of the same code on a free port of this process, with a deadline of half a second for a request
    to arrive, one second of idleness, and at most three connections. Its URL."""
    monkeypatch.setattr(runtime_http, "REQUEST_ARRIVAL_TIMEOUT", 0.5)
    monkeypatch.setattr(runtime_http, "IDLE_CLIENT_TIMEOUT", 1.0)
    monkeypatch.setattr(runtime_http, "LINGER_SECONDS", 0.2)
    loop = asyncio.new_event_loop()
    server = Runtime(Router(), "000000000000", access=None, region="us-east-1")
    server.max_connections = 3
    listening = socket.create_server(("127.0.0.1", 0))
    port = listening.getsockname()[1]
    listening.close()
    loop.run_until_complete(server.start("127.0.0.1", port))
    thread = threading.Thread(target=loop.run_forever)
    thread.start()
    yield f"http://127.0.0.1:{port}"
    asyncio.run_coroutine_threadsafe(server.close(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join()
    loop.close()


def test_a_request_that_stalls_is_answered_408_and_closed(short_runtime):
    for partial in (
        b"POST /endpoints/x/invocations HTTP/1.1\r\nHost: runt",  # mid-headers
        b"POST /endpoints/x/invocations HTTP/1.1\r\nHost: runtime\r\nContent-Length: 100\r\n\r\n0123456789",  # mid-body
    ):
        raw = Raw(short_runtime)
        raw.send(partial)
        started = time.monotonic()
        refused(raw, 408, "did not arrive whole within 0.5 seconds")
        assert 0.4 < time.monotonic() - started < 5
    raw = Raw(short_runtime)  # a connection that sends nothing is closed once idle
    started = time.monotonic()
    assert raw.closed() and 0.9 < time.monotonic() - started < 5


def test_connections_past_the_cap_are_answered_503(short_runtime):
    held = [Raw(short_runtime) for _ in range(3)]
    time.sleep(0.1)
    extra = Raw(short_runtime)
    refused(extra, 503, "connections open, its most")
    held.pop().sock.close()
    time.sleep(0.1)
    again = Raw(short_runtime)  # a place is free again: this one is held open, not refused
    again.sock.settimeout(0.3)
    with pytest.raises(TimeoutError):
        again.sock.recv(1)
    for raw in (*held, again):
        raw.sock.close()


def test_a_response_stream_carries_the_models_answer_as_botocore_reads_it(endpoint, body, local_sagemaker_runtime):
    client = boto3.client("sagemaker-runtime", endpoint_url=local_sagemaker_runtime)
    whole = json.loads(
        client.invoke_endpoint(EndpointName=endpoint, Body=body, ContentType="application/json")["Body"].read()
    )
    streamed = client.invoke_endpoint_with_response_stream(
        EndpointName=endpoint, Body=body, ContentType="application/json", Accept="application/json"
    )
    assert streamed["InvokedProductionVariant"] == "AllTraffic"
    assert streamed["ContentType"] == "application/json"
    parts = [event["PayloadPart"]["Bytes"] for event in streamed["Body"]]
    assert parts and json.loads(b"".join(parts)) == whole
    with pytest.raises(client.exceptions.ValidationError, match="Endpoint absent of account"):
        client.invoke_endpoint_with_response_stream(EndpointName="absent", Body=body, ContentType="application/json")


def test_an_error_inside_a_stream_is_what_botocore_raises():
    """The framing of an error event, read by botocore's own event-stream parser as boto3 reads a response."""
    from botocore.eventstream import EventStream
    from botocore.exceptions import EventStreamError
    from botocore.parsers import EventStreamJSONParser

    from local_sagemaker import eventstream

    model = boto3.client("sagemaker-runtime", region_name="us-east-1").meta.service_model
    shape = model.operation_model("InvokeEndpointWithResponseStream").output_shape.members["Body"]
    framed = eventstream.event("PayloadPart", b'{"predictions": ') + eventstream.exception(
        "ModelStreamError", {"Message": "the model server's answer broke off", "ErrorCode": "ModelStreamError"}
    )

    class Raw:
        def stream(self):
            yield framed

    events = iter(EventStream(Raw(), shape, EventStreamJSONParser(), "InvokeEndpointWithResponseStream"))
    assert next(events) == {"PayloadPart": {"Bytes": b'{"predictions": '}}
    with pytest.raises(EventStreamError, match=r"ModelStreamError.*broke off"):
        next(events)


@pytest.fixture(scope="module")
def async_endpoint(endpoint, local_sagemaker, local_aws) -> dict:
    """An endpoint of the same model with an AsyncInferenceConfig, whose outcomes are told to a topic that a queue
    hears: its name, the output and failure prefixes, and the queue's URL."""
    sns, sqs = boto3.client("sns", endpoint_url=local_aws), boto3.client("sqs", endpoint_url=local_aws)
    topic = sns.create_topic(Name="async-outcomes")["TopicArn"]
    queue = sqs.create_queue(QueueName="async-outcomes")["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=queue_arn, Attributes={"RawMessageDelivery": "true"})
    name = "http-async"
    sagemaker = boto3.client("sagemaker", endpoint_url=local_sagemaker)
    sagemaker.create_endpoint_config(
        EndpointConfigName=name,
        ProductionVariants=[{"VariantName": "AllTraffic", "ModelName": endpoint, "InitialInstanceCount": 1}],
        AsyncInferenceConfig={
            "ClientConfig": {"MaxConcurrentInvocationsPerInstance": 2},
            "OutputConfig": {
                "S3OutputPath": f"s3://{BUCKET}/async/out",
                "S3FailurePath": f"s3://{BUCKET}/async/failed",
                "NotificationConfig": {"SuccessTopic": topic, "ErrorTopic": topic},
            },
        },
    )
    sagemaker.create_endpoint(EndpointName=name, EndpointConfigName=name)
    assert settled(sagemaker, name)["EndpointStatus"] == "InService"
    yield {"name": name, "queue": queue}
    sagemaker.delete_endpoint(EndpointName=name)


def stored(s3, uri: str, timeout: float = 60) -> bytes:
    bucket, key = uri.removeprefix("s3://").split("/", 1)

    def body() -> bytes | None:
        try:
            return s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        except s3.exceptions.NoSuchKey:
            return None

    return wait_until(body, lambda found: found is not None, timeout=timeout, failure=f"nothing at {uri}")


def test_async_inference_puts_each_outcome_where_it_said_and_tells_the_topic(
    async_endpoint, endpoint, body, local_aws, local_sagemaker_runtime
):
    s3, sqs = boto3.client("s3", endpoint_url=local_aws), boto3.client("sqs", endpoint_url=local_aws)
    client = boto3.client("sagemaker-runtime", endpoint_url=local_sagemaker_runtime)
    name = async_endpoint["name"]
    whole = json.loads(
        client.invoke_endpoint(EndpointName=endpoint, Body=body, ContentType="application/json")["Body"].read()
    )
    s3.put_object(Bucket=BUCKET, Key="async/in/one.json", Body=body)

    from_s3 = client.invoke_endpoint_async(
        EndpointName=name,
        InputLocation=f"s3://{BUCKET}/async/in/one.json",
        ContentType="application/json",
        InferenceId="from-s3",
    )
    assert from_s3["InferenceId"] == "from-s3"
    assert from_s3["OutputLocation"] == f"s3://{BUCKET}/async/out/from-s3.out"
    assert from_s3["FailureLocation"] == f"s3://{BUCKET}/async/failed/from-s3-error.out"
    inline = client.invoke_endpoint_async(
        EndpointName=name,
        Body=body,
        ContentType="application/json",
        S3OutputPathExtension="inline",
        Filename="answer.json",
    )
    assert inline["OutputLocation"] == f"s3://{BUCKET}/async/out/inline/answer.json"
    broken = client.invoke_endpoint_async(EndpointName=name, Body=b"{not json", ContentType="application/json")

    assert json.loads(stored(s3, from_s3["OutputLocation"])) == whole
    assert json.loads(stored(s3, inline["OutputLocation"])) == whole
    assert "predictions" not in stored(s3, broken["FailureLocation"]).decode()
    told = {}
    deadline = time.monotonic() + 30
    while len(told) < 3 and time.monotonic() < deadline:
        for message in sqs.receive_message(QueueUrl=async_endpoint["queue"], MaxNumberOfMessages=10).get(
            "Messages", []
        ):
            notice = json.loads(message["Body"])
            told[notice["inferenceId"]] = notice
    assert told["from-s3"]["invocationStatus"] == "Completed"
    assert told["from-s3"]["responseParameters"]["sageMakerOutputLocation"] == from_s3["OutputLocation"]
    assert told["from-s3"]["requestParameters"]["inputLocation"] == f"s3://{BUCKET}/async/in/one.json"
    assert told[broken["InferenceId"]]["invocationStatus"] == "Failed"
    assert told[broken["InferenceId"]]["eventName"] == "InferenceResult"

    # What botocore would refuse before sending, sent anyway: the runtime refuses it too.
    unchecked = boto3.client(
        "sagemaker-runtime", endpoint_url=local_sagemaker_runtime, config=Config(parameter_validation=False)
    )
    for call, message in (
        (lambda: client.invoke_endpoint_async(EndpointName=endpoint, Body=body), "not an asynchronous inference"),
        (lambda: client.invoke_endpoint_async(EndpointName=name), "exactly one of Body and InputLocation"),
        (lambda: client.invoke_endpoint_async(EndpointName=name, InputLocation="nowhere"), "inputLocation"),
        (
            lambda: unchecked.invoke_endpoint_async(EndpointName=name, Body=body, RequestTTLSeconds=5),
            "requestTTLSeconds",
        ),
    ):
        with pytest.raises(client.exceptions.ValidationError, match=message):
            call()
