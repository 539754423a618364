"""Data capture on the local SageMaker service: an endpoint whose config has a DataCaptureConfig writes its sampled
invocations to S3 in SageMaker's format and key layout, as its model's execution role; a role that may not write
loses records, never invocations; and the capture never waits in the request path (local_sagemaker.capture).

One endpoint serves the stack tests; what needs no model server (sampling, modes, encodings, the bounded buffer) is
tried on the capture's own code, in this process, with a writer that keeps what it is given."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import threading
import time
import types

import boto3
import httpx
import numpy as np
import pytest
from botocore.config import Config

from local_sagemaker import capture
from local_sagemaker.endpoints import Endpoints
from tests.conftest import EXECUTION_ROLE
from tests.helpers.endpoints import serve_trained_model
from tests.helpers.polling import wait_until
from tests.test_service_endpoints import settled
from training.mnist_idx import load_mnist

BUCKET = "service-capture"
ENDPOINT = "capture-digits"
DESTINATION = f"s3://{BUCKET}/capture"
DATA_CAPTURE = {
    "InitialSamplingPercentage": 100,
    "DestinationS3Uri": DESTINATION,
    "CaptureOptions": [{"CaptureMode": "Input"}, {"CaptureMode": "Output"}],
    "CaptureContentTypeHeader": {"JsonContentTypes": ["application/json"]},
}
UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
KEY = re.compile(rf"capture/{ENDPOINT}/AllTraffic/(\d{{4}})/(\d\d)/(\d\d)/(\d\d)/(\d\d)-(\d\d)-(\d{{3}})-{UUID}\.jsonl")


@pytest.fixture(scope="module")
def endpoint(local_sagemaker, local_aws, small_mnist, tmp_path_factory) -> str:
    """An endpoint serving a trained model whose config captures every invocation's input and output."""
    sagemaker, _ = serve_trained_model(
        local_sagemaker,
        local_aws,
        small_mnist,
        tmp_path_factory,
        BUCKET,
        "model.tar.gz",
        ENDPOINT,
        DataCaptureConfig=DATA_CAPTURE,
    )
    assert settled(sagemaker, ENDPOINT)["EndpointStatus"] == "InService"
    yield ENDPOINT
    sagemaker.delete_endpoint(EndpointName=ENDPOINT)


@pytest.fixture(scope="module")
def image(small_mnist) -> np.ndarray:
    return load_mnist(small_mnist)["test_images"][0]


def counts(local_sagemaker: str) -> dict:
    return httpx.get(f"{local_sagemaker}{capture.COUNTS_PATH}").json().get(ENDPOINT, {})


def captured_objects(s3, timeout: float = 15, at_least: int = 1) -> dict[str, list[dict]]:
    """The capture's objects under the endpoint's prefix, by key, each as its records, once there are
    ``at_least`` records."""

    def objects() -> dict[str, list[dict]]:
        listed = s3.list_objects_v2(Bucket=BUCKET, Prefix=f"capture/{ENDPOINT}/").get("Contents", [])
        return {
            item["Key"]: [
                json.loads(line) for line in s3.get_object(Bucket=BUCKET, Key=item["Key"])["Body"].iter_lines()
            ]
            for item in listed
        }

    return wait_until(
        objects,
        lambda found: sum(map(len, found.values())) >= at_least,
        timeout=timeout,
        failure=lambda found: f"{sum(map(len, found.values()))} records written, not {at_least}",
    )


def test_each_answered_invocation_is_one_record_in_sagemakers_format_and_key_layout(
    endpoint, image, local_aws, local_sagemaker, local_sagemaker_runtime
):
    runtime = boto3.client("sagemaker-runtime", endpoint_url=local_sagemaker_runtime)
    s3 = boto3.client("s3", endpoint_url=local_aws)
    as_json = json.dumps({"instances": [image.tolist()]}).encode()
    as_npy = io.BytesIO()
    np.save(as_npy, image.astype(np.uint8))
    answers = [
        runtime.invoke_endpoint(EndpointName=endpoint, Body=body, ContentType=kind, **extra)
        for body, kind, extra in (
            (as_json, "application/json", {"InferenceId": "first-digit"}),
            (as_npy.getvalue(), "application/x-npy", {}),
        )
    ]
    # An invocation the model refuses is not an inference: nothing of it is captured.
    with pytest.raises(runtime.exceptions.ModelError):
        runtime.invoke_endpoint(EndpointName=endpoint, Body=b"{not json", ContentType="application/json")

    objects = captured_objects(s3, at_least=2)
    records = [record for key in sorted(objects) for record in objects[key]]
    assert len(records) == 2, records
    for key, in_object in objects.items():
        year, month, day, hour, minute, second, _ = KEY.fullmatch(key).groups()
        # The key's hour is its every record's, its minute and second its first record's.
        assert {record["eventMetadata"]["inferenceTime"][:13] for record in in_object} == {
            f"{year}-{month}-{day}T{hour}"
        }
        assert in_object[0]["eventMetadata"]["inferenceTime"] == f"{year}-{month}-{day}T{hour}:{minute}:{second}Z"

    outputs = [answer["Body"].read() for answer in answers]
    by_input = {record["captureData"]["endpointInput"]["encoding"]: record for record in records}
    first = by_input["JSON"]
    assert re.fullmatch(UUID, first["eventMetadata"]["eventId"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", first["eventMetadata"]["inferenceTime"])
    assert first == {
        "captureData": {
            "endpointInput": {
                "observedContentType": "application/json",
                "mode": "INPUT",
                "data": as_json.decode(),
                "encoding": "JSON",
            },
            "endpointOutput": {
                "observedContentType": answers[0]["ContentType"],
                "mode": "OUTPUT",
                "data": outputs[0].decode(),
                "encoding": "JSON",
            },
        },
        "eventMetadata": {
            "eventId": first["eventMetadata"]["eventId"],
            "inferenceId": "first-digit",
            "inferenceTime": first["eventMetadata"]["inferenceTime"],
        },
        "eventVersion": "0",
    }
    npy = by_input["BASE64"]
    assert npy["captureData"]["endpointInput"]["observedContentType"] == "application/x-npy"
    assert base64.b64decode(npy["captureData"]["endpointInput"]["data"]) == as_npy.getvalue()
    assert npy["captureData"]["endpointOutput"]["encoding"] == "JSON"
    assert json.loads(npy["captureData"]["endpointOutput"]["data"]) == json.loads(outputs[1])
    assert "inferenceId" not in npy["eventMetadata"]
    assert counts(local_sagemaker) == {"Captured": 2, "Written": 2, "Objects": len(objects), "Dropped": {}}


def test_describe_endpoint_shows_the_capture_of_the_config_it_serves(endpoint, local_sagemaker):
    described = boto3.client("sagemaker", endpoint_url=local_sagemaker).describe_endpoint(EndpointName=endpoint)
    assert described["DataCaptureConfig"] == {
        "EnableCapture": True,
        "CaptureStatus": "Started",
        "CurrentSamplingPercentage": 100,
        "DestinationS3Uri": DESTINATION,
    }


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"InitialSamplingPercentage": 101},
            "Value '101' at 'dataCaptureConfig.initialSamplingPercentage' failed to "
            "satisfy constraint: Member must have value less than or equal to 100",
        ),
        (
            {"DestinationS3Uri": f"{BUCKET}/capture"},
            f"Value '{BUCKET}/capture' at 'dataCaptureConfig.destinationS3Uri' "
            "failed to satisfy constraint: Member must satisfy regular expression pattern",
        ),
        ({"DestinationS3Uri": f"https://{BUCKET}/capture"}, "is not an S3 URI of the form s3://bucket/prefix"),
        (
            {"CaptureOptions": [{"CaptureMode": "Both"}]},
            "Value 'Both' at 'dataCaptureConfig.captureOptions.1.member."
            "captureMode' failed to satisfy constraint: Member must satisfy enum value set: [Input, Output, "
            "InputAndOutput]",
        ),
        (
            {"CaptureOptions": [{"CaptureMode": "InputAndOutput"}, {"CaptureMode": "Output"}]},
            "capture the output more than once",
        ),
        (
            {"CaptureOptions": []},
            "Value '[]' at 'dataCaptureConfig.captureOptions' failed to satisfy constraint: "
            "Member must have length greater than or equal to 1",
        ),
    ],
)
def test_a_data_capture_config_sagemaker_refuses_is_refused_and_nothing_is_made(
    endpoint, local_sagemaker, change, message
):
    # What botocore would refuse before sending (an empty list), sent anyway: the service refuses it too.
    sagemaker = boto3.client("sagemaker", endpoint_url=local_sagemaker, config=Config(parameter_validation=False))
    with pytest.raises(sagemaker.exceptions.ClientError) as refused:
        sagemaker.create_endpoint_config(
            EndpointConfigName="capture-refused",
            ProductionVariants=[{"VariantName": "AllTraffic", "ModelName": endpoint, "InitialInstanceCount": 1}],
            DataCaptureConfig={**DATA_CAPTURE, **change},
        )
    assert refused.value.response["Error"]["Code"] == "ValidationException"
    assert message in refused.value.response["Error"]["Message"]
    with pytest.raises(sagemaker.exceptions.ClientError, match="Could not find endpoint configuration"):
        sagemaker.describe_endpoint_config(EndpointConfigName="capture-refused")


def test_a_role_that_may_not_write_loses_its_records_not_its_invocations(
    endpoint, image, local_aws, local_sagemaker, local_sagemaker_runtime
):
    s3 = boto3.client("s3", endpoint_url=local_aws)
    runtime = boto3.client("sagemaker-runtime", endpoint_url=local_sagemaker_runtime)
    body = json.dumps({"instances": [image.tolist()]}).encode()
    before = counts(local_sagemaker)
    deny = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Deny",
                "Principal": "*",
                "Action": "s3:PutObject",
                "Resource": f"arn:aws:s3:::{BUCKET}/capture/*",
                "Condition": {"ArnEquals": {"aws:PrincipalArn": EXECUTION_ROLE}},
            }
        ],
    }
    s3.put_bucket_policy(Bucket=BUCKET, Policy=json.dumps(deny))
    try:
        for _ in range(5):
            answer = runtime.invoke_endpoint(EndpointName=endpoint, Body=body, ContentType="application/json")
            assert answer["ResponseMetadata"]["HTTPStatusCode"] == 200
        after = wait_until(
            lambda: counts(local_sagemaker), lambda after: after["Dropped"].get("AccessDenied", 0) >= 5, timeout=15
        )
    finally:
        s3.delete_bucket_policy(Bucket=BUCKET)
    assert after["Captured"] == before.get("Captured", 0) + 5
    assert after["Written"] == before.get("Written", 0)
    assert after["Dropped"] == {"AccessDenied": 5}


# -- the capture's own code, in this process ------------------------------------------------------------------------


def config(**change) -> dict:
    return {**DATA_CAPTURE, **change}


def invocation(
    body: bytes = b'{"instances": [1]}',
    content_type: str = "application/json",
    answer: bytes = b'{"predictions": [2]}',
    answer_type: str = "application/json",
):
    """The runtime's request and the model server's reply, as DataCapture.record reads them."""
    request = types.SimpleNamespace(headers={"Content-Type": content_type}, fields={}, body=body)
    return request, types.SimpleNamespace(headers={"content-type": answer_type}, body=answer)


class Writer:
    """Where the capture's objects go instead of S3: kept, and, while ``gate`` is clear, waited for."""

    def __init__(self):
        self.objects: dict[str, bytes] = {}
        self.gate = threading.Event()
        self.gate.set()

    def put(self, role: str, source: str, bucket: str, key: str, body: bytes) -> None:
        assert (role, source, bucket) == (EXECUTION_ROLE, f"arn:{ENDPOINT}", BUCKET)
        self.gate.wait()
        self.objects[key] = body

    def records(self) -> list[dict]:
        return [json.loads(line) for body in self.objects.values() for line in body.splitlines()]


def run_capture(writer: Writer, work, **bounds) -> capture.DataCapture:
    """Run ``work(data_capture)`` (a coroutine function) on a started DataCapture, then close it."""

    async def main():
        data_capture = capture.DataCapture(None, lambda name: f"arn:{name}", put=writer.put, **bounds)
        data_capture.start()
        await work(data_capture)
        await data_capture.close()
        return data_capture

    return asyncio.run(main())


@pytest.mark.parametrize("percentage", [0, 50, 100])
def test_each_invocation_is_captured_with_the_configs_sampling_percentage(percentage):
    writer, settings = Writer(), capture.settings(config(InitialSamplingPercentage=percentage), EXECUTION_ROLE)

    async def invoke(data_capture):
        for _ in range(1000):
            data_capture.record(ENDPOINT, settings, "AllTraffic", *invocation())

    done = run_capture(writer, invoke)
    written = len(writer.records())
    if percentage in (0, 100):
        assert written == 10 * percentage
    else:  # binomial(1000, 0.5): 500 ± 16; outside 400-600 once in more than a billion runs
        assert 400 <= written <= 600
    assert done.counts() == (
        {}
        if percentage == 0
        else {
            ENDPOINT: {
                "Captured": written,
                "Written": written,
                "Objects": -(-written // capture.BATCH_RECORDS),
                "Dropped": {},
            },
        }
    )


def test_only_the_sides_the_capture_options_ask_for_are_written_each_in_its_encoding():
    writer = Writer()
    header = {"JsonContentTypes": ["application/json"], "CsvContentTypes": ["text/csv"]}
    only_input = capture.settings(
        config(CaptureOptions=[{"CaptureMode": "Input"}], CaptureContentTypeHeader=header), EXECUTION_ROLE
    )
    only_output = capture.settings(config(CaptureOptions=[{"CaptureMode": "Output"}]), EXECUTION_ROLE)
    no_header = capture.settings({**config(), "CaptureContentTypeHeader": None}, EXECUTION_ROLE)

    async def invoke(data_capture):
        data_capture.record(ENDPOINT, only_input, "AllTraffic", *invocation(b"1,2\n", "text/csv; charset=utf-8"))
        data_capture.record(ENDPOINT, only_input, "AllTraffic", *invocation(b"\xff\xfe", "application/json"))
        data_capture.record(ENDPOINT, only_output, "AllTraffic", *invocation(answer_type="application/JSON"))
        data_capture.record(ENDPOINT, no_header, "AllTraffic", *invocation())

    run_capture(writer, invoke)
    sides = sorted((record["captureData"] for record in writer.records()), key=json.dumps)
    assert sides == sorted(
        [
            {
                "endpointInput": {
                    "observedContentType": "text/csv; charset=utf-8",
                    "mode": "INPUT",
                    "data": "1,2\n",
                    "encoding": "CSV",
                }
            },
            # Not the text its content type says: kept whole, in base64.
            {
                "endpointInput": {
                    "observedContentType": "application/json",
                    "mode": "INPUT",
                    "data": "//4=",
                    "encoding": "BASE64",
                }
            },
            {
                "endpointOutput": {
                    "observedContentType": "application/JSON",
                    "mode": "OUTPUT",
                    "data": '{"predictions": [2]}',
                    "encoding": "JSON",
                }
            },
            # No CaptureContentTypeHeader: SageMaker writes every body in base64.
            {
                "endpointInput": {
                    "observedContentType": "application/json",
                    "mode": "INPUT",
                    "data": base64.b64encode(b'{"instances": [1]}').decode(),
                    "encoding": "BASE64",
                },
                "endpointOutput": {
                    "observedContentType": "application/json",
                    "mode": "OUTPUT",
                    "data": base64.b64encode(b'{"predictions": [2]}').decode(),
                    "encoding": "BASE64",
                },
            },
        ],
        key=json.dumps,
    )


def test_records_of_two_hours_go_to_two_objects_named_by_their_first_records_time():
    writer = Writer()
    settings = capture.settings(config(), EXECUTION_ROLE)
    # 2026-12-07 10:59:59.987 and 11:00:00.004 UTC
    times = iter([1796641199.987, 1796641200.004, 1796641200.5])

    async def invoke(data_capture):
        clock = capture.time.time
        capture.time.time = lambda: next(times)
        try:
            for _ in range(3):
                data_capture.record(ENDPOINT, settings, "AllTraffic", *invocation())
        finally:
            capture.time.time = clock

    run_capture(writer, invoke)
    keys = sorted(writer.objects)
    assert [re.sub(UUID, "<uuid>", key) for key in keys] == [
        f"capture/{ENDPOINT}/AllTraffic/2026/12/07/10/59-59-987-<uuid>.jsonl",
        f"capture/{ENDPOINT}/AllTraffic/2026/12/07/11/00-00-004-<uuid>.jsonl",
    ]
    assert [len(writer.objects[key].splitlines()) for key in keys] == [1, 2]
    assert json.loads(writer.objects[keys[1]].splitlines()[1])["eventMetadata"]["inferenceTime"] == (
        "2026-12-07T11:00:00Z"
    )


@pytest.mark.parametrize("bound", ["records", "bytes"])
def test_a_full_buffer_drops_and_counts_records_and_never_waits(monkeypatch, bound):
    """A writer that does not return (S3 hanging) holds its batch; what does not fit beside it is dropped at once,
    and what is left when the service stops is counted too."""
    monkeypatch.setattr(capture, "CLOSE_SECONDS", 0.3)
    monkeypatch.setattr(capture, "FLUSH_SECONDS", 0.1)
    writer, settings = Writer(), capture.settings(config(), EXECUTION_ROLE)
    writer.gate.clear()
    request, reply = invocation(body=b"x" * 1000)
    size = capture.RECORD_OVERHEAD + len(request.body) + len(reply.body)
    bounds = {"buffer_records": 50} if bound == "records" else {"buffer_bytes": 50 * size}
    spent = []

    async def invoke(data_capture):
        for _ in range(20):  # taken by the writer, which now waits
            data_capture.record(ENDPOINT, settings, "AllTraffic", request, reply)
        await asyncio.sleep(0.3)
        for _ in range(1000):
            started = time.perf_counter()
            data_capture.record(ENDPOINT, settings, "AllTraffic", request, reply)
            spent.append(time.perf_counter() - started)

    try:
        done = run_capture(writer, invoke, **bounds)
    finally:
        writer.gate.set()  # the writer's thread ends
    assert sum(spent) < 1.0  # a thousand calls take a few milliseconds: none waited for the writer
    assert done.counts() == {
        ENDPOINT: {"Captured": 50, "Written": 0, "Objects": 0, "Dropped": {"BufferFull": 970, "ServiceStopped": 50}}
    }


def test_a_route_carries_the_capture_of_its_config_and_none_without_one():
    server = {"url": "http://127.0.0.1:1", "variant": "AllTraffic", "weight": 1.0, "role": EXECUTION_ROLE}
    with_capture = Endpoints._targets({"config": "with", "servers": [server], "data_capture": DATA_CAPTURE})
    assert with_capture[0].capture == capture.Settings(
        destination=DESTINATION,
        percentage=100,
        input=True,
        output=True,
        json_types=frozenset({"application/json"}),
        csv_types=frozenset(),
        role=EXECUTION_ROLE,
    )
    assert Endpoints._targets({"config": "without", "servers": [server], "data_capture": None})[0].capture is None
    assert capture.settings(config(EnableCapture=False), EXECUTION_ROLE) is None
    assert capture.summary(config(EnableCapture=False, KmsKeyId="alias/capture")) == {
        "EnableCapture": False,
        "CaptureStatus": "Stopped",
        "CurrentSamplingPercentage": 100,
        "DestinationS3Uri": DESTINATION,
        "KmsKeyId": "alias/capture",
    }
