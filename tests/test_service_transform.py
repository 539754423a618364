"""Batch transform on the local SageMaker service, through boto3: a trained model's real server over S3 objects of
each content type the handler takes, split and batched as SageMaker does, outputs checked against the model run
in this process; failures that name their object and write nothing for it; StopTransformJob; listing; restart."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import time

import boto3
import numpy as np
import psutil
import pytest
from botocore.exceptions import ClientError
from PIL import Image

from inference.artifact import load_handler
from local_sagemaker import protocol
from tests.conftest import EXECUTION_ROLE
from tests.helpers.polling import wait_until

pytest_plugins = ["tests.helpers.model_artifact"]  # the model_dir, model_tarball and test_set fixtures

BUCKET = "service-transform"
ROLE = EXECUTION_ROLE
MODEL = "transform-digits"
LOG_GROUP = "/aws/sagemaker/TransformJobs"
TERMINAL = ("Completed", "Failed", "Stopped")


def validated(operation: str, answer: dict) -> dict:
    """``answer`` as botocore parsed it, checked against the operation's output shape (required members, enums)."""
    protocol.validate_response(operation, {k: v for k, v in answer.items() if k != "ResponseMetadata"})
    return answer


def npy(images: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, images)
    return buffer.getvalue()


def csv(images: np.ndarray) -> bytes:
    return "".join(",".join(map(str, image.ravel())) + "\n" for image in images).encode()


def picture(image: np.ndarray, kind: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, kind)
    return buffer.getvalue()


def job(
    name: str,
    content_type: str,
    source: str,
    *,
    data_type: str = "S3Prefix",
    split: str = "None",
    assemble: str = "None",
    compression: str = "None",
    **extra,
) -> dict:
    return {
        "TransformJobName": name,
        "ModelName": MODEL,
        "TransformInput": {
            "DataSource": {"S3DataSource": {"S3DataType": data_type, "S3Uri": f"s3://{BUCKET}/{source}"}},
            "ContentType": content_type,
            "SplitType": split,
            "CompressionType": compression,
        },
        "TransformOutput": {
            "S3OutputPath": f"s3://{BUCKET}/out/{name}",
            "Accept": "application/json",
            "AssembleWith": assemble,
        },
        "TransformResources": {"InstanceType": "ml.m5.large", "InstanceCount": 1},
        **extra,
    }


def finished(sagemaker, name: str, timeout: float = 120) -> dict:
    described = wait_until(
        lambda: sagemaker.describe_transform_job(TransformJobName=name),
        lambda described: described["TransformJobStatus"] in TERMINAL,
        timeout=timeout,
    )
    return validated("DescribeTransformJob", described)


def servers_of(name: str) -> list[int]:
    """The model servers running for transform job ``name``."""
    mark = f"/transform-job-dirs/{name}/"
    return [
        process.pid
        for process in psutil.process_iter(["cmdline"])
        if "inference.serve" in (cmdline := process.info["cmdline"] or []) and any(mark in arg for arg in cmdline)
    ]


def log_lines(logs, name: str) -> dict[str, list[str]]:
    streams = logs.describe_log_streams(logGroupName=LOG_GROUP, logStreamNamePrefix=f"{name}/")["logStreams"]
    return {
        stream["logStreamName"]: [
            event["message"]
            for event in logs.get_log_events(
                logGroupName=LOG_GROUP, logStreamName=stream["logStreamName"], startFromHead=True
            )["events"]
        ]
        for stream in streams
    }


def documents(body: bytes) -> list[dict]:
    """The JSON documents of an output, concatenated (AssembleWith None) or one a line (Line)."""
    decoder, text, found, at = json.JSONDecoder(), body.decode(), [], 0
    while at < len(text):
        document, at = decoder.raw_decode(text, at)
        found.append(document)
        at += len(text[at:]) - len(text[at:].lstrip())
    return found


def labels(document: dict) -> list[int]:
    return [prediction["label"] for prediction in document["predictions"]]


@pytest.fixture(scope="module")
def handler(model_dir):
    module = load_handler(model_dir)
    return module, module.model_fn(str(model_dir))


def expected(handler, body: bytes, content_type: str) -> list[int]:
    """The labels the model gives ``body`` here, in this process, through the same handlers."""
    module, model = handler
    return module.predict_fn(module.input_fn(body, content_type), model).argmax(1).tolist()


@pytest.fixture(scope="module")
def inputs(local_aws, local_sagemaker, model_tarball, test_set) -> dict[str, bytes]:
    """The model in S3 (under its SHA-256) and in the service; every input object, by key."""
    images, _ = test_set
    s3 = boto3.client("s3", endpoint_url=local_aws)
    s3.create_bucket(Bucket=BUCKET)
    body = model_tarball.read_bytes()
    key = f"models/{hashlib.sha256(body).hexdigest()}/model.tar.gz"
    s3.put_object(Bucket=BUCKET, Key=key, Body=body)
    boto3.client("sagemaker", endpoint_url=local_sagemaker).create_model(
        ModelName=MODEL,
        ExecutionRoleArn=ROLE,
        PrimaryContainer={"Image": "pytorch-inference", "ModelDataUrl": f"s3://{BUCKET}/{key}"},
    )
    objects = {
        "in/npy/a.npy": npy(images[:60]),
        "in/npy/nested/b.npy": npy(images[60:]),
        "in/csv/digits.csv": csv(images),
        # Line 2 over MaxPayloadInMB (1 MB): one record too large for any request.
        "in/csv/long.csv": csv(images[:1]) + b"0," * 600_000 + b"0\n" + csv(images[1:2]),
        # 1.4 MB once unpacked: two requests of at most 1 MB.
        "in/csv-multi/digits.csv.gz": gzip.compress(csv(np.concatenate([images] * 8))),
        "in/mixed/0.json": json.dumps({"instances": images[:50].tolist()}).encode(),
        "in/mixed/1.json": json.dumps({"instances": images[50:].tolist()}).encode(),
        "in/mixed/bad.png": b"this is no picture",
        **{f"in/mixed/{i:02d}.png": picture(images[i], "PNG") for i in range(10)},
        **{f"in/mixed/{i:02d}.jpg": picture(images[i], "JPEG") for i in range(10)},
    }
    for key, body in objects.items():
        s3.put_object(Bucket=BUCKET, Key=key, Body=body)
    # SageMaker's manifests: one content type of the mixed prefix each (bad.png among the PNGs).
    for kind, suffixes in {"json": (".json",), "png": (".png",), "jpeg": (".jpg",)}.items():
        listed = sorted(
            key.removeprefix("in/mixed/") for key in objects if key.startswith("in/mixed/") and key.endswith(suffixes)
        )
        manifest = [{"prefix": f"s3://{BUCKET}/in/mixed/"}, *listed]
        s3.put_object(Bucket=BUCKET, Key=f"manifests/{kind}.manifest", Body=json.dumps(manifest).encode())
    return objects


@pytest.fixture(scope="module")
def sagemaker(local_sagemaker):
    return boto3.client("sagemaker", endpoint_url=local_sagemaker)


@pytest.fixture(scope="module")
def s3(local_aws):
    return boto3.client("s3", endpoint_url=local_aws)


def outputs(s3, name: str) -> dict[str, bytes]:
    listed = s3.list_objects_v2(Bucket=BUCKET, Prefix=f"out/{name}/").get("Contents", [])
    return {
        item["Key"].removeprefix(f"out/{name}/"): s3.get_object(Bucket=BUCKET, Key=item["Key"])["Body"].read()
        for item in listed
    }


JOBS = {
    # Two instances (two servers of one worker each), one object each; the request's extras kept as sent.
    "tx-npy": job(
        "tx-npy",
        "application/x-npy",
        "in/npy/",
        MaxConcurrentTransforms=2,
        TransformResources={"InstanceType": "ml.m5.large", "InstanceCount": 2},
        Environment={"TRANSFORM_TEST": "1"},
        DataProcessing={"InputFilter": "$", "OutputFilter": "$", "JoinSource": "None"},
        Tags=[{"Key": "team", "Value": "digits"}],
        TransformOutput={
            "S3OutputPath": f"s3://{BUCKET}/out/tx-npy/",
            "Accept": "application/json",
            "AssembleWith": "None",
            "KmsKeyId": "alias/transform-test",
        },
    ),
    "tx-csv-single": job(
        "tx-csv-single",
        "text/csv",
        "in/csv/",
        split="Line",
        assemble="Line",
        BatchStrategy="SingleRecord",
        MaxPayloadInMB=1,
        MaxConcurrentTransforms=4,
    ),
    "tx-csv-multi": job(
        "tx-csv-multi",
        "text/csv",
        "in/csv-multi/",
        split="Line",
        assemble="None",
        compression="Gzip",
        BatchStrategy="MultiRecord",
        MaxPayloadInMB=1,
    ),
    "tx-json": job("tx-json", "application/json", "manifests/json.manifest", data_type="ManifestFile", assemble="Line"),
    "tx-png": job(
        "tx-png",
        "image/png",
        "manifests/png.manifest",
        data_type="ManifestFile",
        assemble="Line",
        MaxConcurrentTransforms=2,
    ),
    "tx-jpeg": job("tx-jpeg", "image/jpeg", "manifests/jpeg.manifest", data_type="ManifestFile", assemble="Line"),
}


@pytest.fixture(scope="module")
def done(sagemaker, inputs) -> dict[str, dict]:
    """Every job of JOBS, run together; DescribeTransformJob of each once it has ended."""
    for request in JOBS.values():
        arn = validated("CreateTransformJob", sagemaker.create_transform_job(**request))["TransformJobArn"]
        assert re.fullmatch(r"arn:aws:sagemaker:us-east-1:000000000000:transform-job/tx-[a-z-]+", arn)
    return {name: finished(sagemaker, name) for name in JOBS}


def test_npy_objects_on_two_instances(done, s3, inputs, handler, test_set, local_aws):
    described = done["tx-npy"]
    assert described["TransformJobStatus"] == "Completed" and "FailureReason" not in described
    assert described["CreationTime"] <= described["TransformStartTime"] <= described["TransformEndTime"]
    request = JOBS["tx-npy"]
    for key in ("Environment", "DataProcessing", "TransformOutput", "TransformResources", "ModelName"):
        assert described[key] == request[key]
    assert (described["MaxConcurrentTransforms"], described["MaxPayloadInMB"]) == (2, 6)  # 6: SageMaker's default
    written = outputs(s3, "tx-npy")
    assert set(written) == {"a.npy.out", "nested/b.npy.out"}  # keys under the prefix, .out added
    _, test_labels = test_set
    found = []
    for name, key in (("a.npy.out", "in/npy/a.npy"), ("nested/b.npy.out", "in/npy/nested/b.npy")):
        (document,) = documents(written[name])  # AssembleWith None: the answer as it came
        assert not written[name].endswith(b"\n")
        assert labels(document) == expected(handler, inputs[key], "application/x-npy")
        found += labels(document)
    assert np.mean(np.array(found) == test_labels) >= 0.95  # as well as the model does (model_artifact's bar)
    assert servers_of("tx-npy") == []

    logs = log_lines(boto3.client("logs", endpoint_url=local_aws), "tx-npy")
    assert len(logs) == 2 and all(re.fullmatch(r"tx-npy/i-[0-9a-f]{17}-\d+", stream) for stream in logs)
    (figures,) = [
        json.loads(line.removeprefix("Figures: "))
        for lines in logs.values()
        for line in lines
        if line.startswith("Figures: ")
    ]
    assert (figures["records"], figures["images"], figures["requests"], figures["failed_objects"]) == (2, 100, 2, 0)
    assert 0 < figures["transform_seconds"] < figures["end_to_end_seconds"]


def test_tags_of_a_transform_job(done, sagemaker):
    arn = done["tx-npy"]["TransformJobArn"]
    assert sagemaker.list_tags(ResourceArn=arn)["Tags"] == [{"Key": "team", "Value": "digits"}]


def test_csv_single_records_one_answer_a_line_and_a_record_over_max_payload_fails_its_object(done, s3, inputs, handler):
    described = done["tx-csv-single"]
    assert described["TransformJobStatus"] == "Failed"
    reason = described["FailureReason"]
    assert reason.startswith(
        f"ClientError: 1 of 2 objects failed: s3://{BUCKET}/in/csv/long.csv line 2: "
        "a record of 1200001 bytes exceeds MaxPayloadInMB (1 MB)"
    ), reason
    written = outputs(s3, "tx-csv-single")
    assert set(written) == {"digits.csv.out"}  # nothing of the failed object, not even its good line 1
    lines = written["digits.csv.out"].split(b"\n")
    assert lines[-1] == b"" and len(lines) == 101  # AssembleWith Line: each answer, then a newline
    answers = [json.loads(line) for line in lines[:-1]]
    assert all(len(answer["predictions"]) == 1 for answer in answers)  # SingleRecord: one row per request
    assert [labels(answer)[0] for answer in answers] == expected(handler, inputs["in/csv/digits.csv"], "text/csv")
    assert servers_of("tx-csv-single") == []


def test_gzipped_csv_multi_records_fill_max_payload(done, s3, inputs, handler):
    assert done["tx-csv-multi"]["TransformJobStatus"] == "Completed"
    assert done["tx-csv-multi"]["MaxConcurrentTransforms"] == 1  # SageMaker's default
    body = gzip.decompress(inputs["in/csv-multi/digits.csv.gz"])
    written = outputs(s3, "tx-csv-multi")
    assert set(written) == {"digits.csv.gz.out"}  # named after the object as it is in S3
    answers = documents(written["digits.csv.gz.out"])  # AssembleWith None: the answers back to back
    assert len(answers) == 2 and b"}{" in written["digits.csv.gz.out"]
    # The first request: every row that fits whole in 1 MB with the newlines between them.
    assert len(answers[0]["predictions"]) == body[: 1024 * 1024 + 1].count(b"\n")
    assert [label for answer in answers for label in labels(answer)] == expected(handler, body, "text/csv")


@pytest.mark.parametrize(
    ("name", "suffix", "content_type"), [("tx-json", ".json", "application/json"), ("tx-jpeg", ".jpg", "image/jpeg")]
)
def test_manifest_of_one_content_type_from_a_mixed_prefix(
    done, s3, inputs, handler, test_set, name, suffix, content_type
):
    assert done[name]["TransformJobStatus"] == "Completed"
    sent = {
        key.removeprefix("in/mixed/"): body
        for key, body in inputs.items()
        if key.startswith("in/mixed/") and key.endswith(suffix)
    }
    written = outputs(s3, name)
    assert set(written) == {f"{key}.out" for key in sent}  # only what the manifest lists
    found = []
    for key, body in sorted(sent.items()):
        assert written[f"{key}.out"].endswith(b"}\n")
        (document,) = documents(written[f"{key}.out"])
        assert labels(document) == expected(handler, body, content_type)
        found += labels(document)
    if content_type == "application/json":  # the raw test images, all of them
        _, test_labels = test_set
        assert np.mean(np.array(found) == test_labels) >= 0.95


def test_a_record_the_model_refuses_fails_the_job_naming_object_and_message(done, s3, inputs, handler):
    described = done["tx-png"]
    assert described["TransformJobStatus"] == "Failed"
    assert described["FailureReason"] == (
        f"ClientError: 1 of 11 objects failed: s3://{BUCKET}/in/mixed/bad.png: the model answered 400: "
        "not a PNG or JPEG image (the body could not be identified as one)"
    )
    written = outputs(s3, "tx-png")
    assert set(written) == {f"{i:02d}.png.out" for i in range(10)}  # the others are written, bad.png is not
    for i in range(10):
        assert labels(documents(written[f"{i:02d}.png.out"])[0]) == expected(
            handler, inputs[f"in/mixed/{i:02d}.png"], "image/png"
        )
    assert servers_of("tx-png") == []


def test_list_transform_jobs_filters_sorts_and_pages(done, sagemaker):
    def names(**params) -> list[str]:
        listed = validated("ListTransformJobs", sagemaker.list_transform_jobs(**params))
        return [summary["TransformJobName"] for summary in listed["TransformJobSummaries"]]

    assert names(NameContains="TX-CSV", SortBy="Name", SortOrder="Ascending") == ["tx-csv-multi", "tx-csv-single"]
    failed = sagemaker.list_transform_jobs(NameContains="tx-", StatusEquals="Failed", SortBy="Name")
    assert [(s["TransformJobName"], s["FailureReason"][:11]) for s in failed["TransformJobSummaries"]] == [
        ("tx-png", "ClientError"),
        ("tx-csv-single", "ClientError"),
    ]
    first = sagemaker.list_transform_jobs(NameContains="tx-", SortBy="Name", SortOrder="Ascending", MaxResults=4)
    rest = sagemaker.list_transform_jobs(
        NameContains="tx-", SortBy="Name", SortOrder="Ascending", MaxResults=4, NextToken=first["NextToken"]
    )
    paged = [s["TransformJobName"] for s in first["TransformJobSummaries"] + rest["TransformJobSummaries"]]
    assert paged == sorted(JOBS) and "NextToken" not in rest
    latest = max(described["CreationTime"] for described in done.values())
    assert "tx-npy" not in names(NameContains="tx-", CreationTimeAfter=latest)
    newest_first = names(NameContains="tx-", MaxResults=100)  # CreationTime, Descending: SageMaker's default
    created = [done[name]["CreationTime"] for name in newest_first if name in done]
    assert created == sorted(created, reverse=True)


def test_requests_the_service_cannot_run_are_refused(sagemaker, inputs, done):
    cases = [
        (job("tx-bad", "text/csv", "in/csv/", MaxPayloadInMB=101), "MaxPayloadInMB 101 is over the maximum"),
        (job("tx-bad", "text/csv", "in/csv/", MaxPayloadInMB=30, MaxConcurrentTransforms=4), r"\(4 \* 30\)"),
        (job("tx-bad", "text/csv", "in/csv/", split="RecordIO"), "SplitType RecordIO is not supported"),
        ({**job("tx-bad", "text/csv", "in/csv/"), "ModelName": "absent"}, 'Could not find model "arn:'),
        (job("tx-bad", "text/csv", "in/csv/", DataProcessing={"JoinSource": "Input"}), "JoinSource"),
        (job("tx-npy", "text/csv", "in/csv/"), "a job with this name already exists"),
    ]
    for request, message in cases:
        with pytest.raises(ClientError, match=message):
            sagemaker.create_transform_job(**request)
    with pytest.raises(ClientError, match="Could not find requested job with name tx-absent"):
        sagemaker.describe_transform_job(TransformJobName="tx-absent")
    with pytest.raises(ClientError, match="the transform job is in status Completed"):
        sagemaker.stop_transform_job(TransformJobName="tx-npy")
    assert not sagemaker.list_transform_jobs(NameContains="tx-bad")["TransformJobSummaries"]


def test_stop_transform_job_stops_promptly_and_writes_nothing(sagemaker, s3, inputs, local_aws, test_set):
    images, _ = test_set
    s3.put_object(Bucket=BUCKET, Key="in/slow/rows.csv", Body=csv(np.concatenate([images] * 40)))
    sagemaker.create_transform_job(**job("tx-stop", "text/csv", "in/slow/", split="Line", BatchStrategy="SingleRecord"))
    logs = boto3.client("logs", endpoint_url=local_aws)
    # Once the log says the requests have begun (4,000 of them, one at a time: seconds of work).
    wait_until(
        lambda: any("Transforming" in line for lines in log_lines(logs, "tx-stop").values() for line in lines),
        timeout=60,
        interval=0.1,
    )
    assert servers_of("tx-stop")
    stopped_at = time.monotonic()
    assert validated("StopTransformJob", sagemaker.stop_transform_job(TransformJobName="tx-stop")) is not None
    assert sagemaker.describe_transform_job(TransformJobName="tx-stop")["TransformJobStatus"] in ("Stopping", "Stopped")
    sagemaker.stop_transform_job(TransformJobName="tx-stop")  # again, while it stops: nothing more to do
    described = finished(sagemaker, "tx-stop")
    assert described["TransformJobStatus"] == "Stopped" and time.monotonic() - stopped_at < 10
    assert outputs(s3, "tx-stop") == {} and servers_of("tx-stop") == []
    assert any(line == "Stopped" for lines in log_lines(logs, "tx-stop").values() for line in lines)


def test_a_killed_transform_task_stops_its_job(sagemaker, s3, inputs, test_set):
    """Airflow calls on_kill when it kills a task (marked failed, timed out): the job is stopped, not left running."""
    from tasks.operators import TransformOperator

    s3.put_object(Bucket=BUCKET, Key="in/killed/rows.csv", Body=csv(np.concatenate([test_set[0]] * 40)))
    sent = job("tx-killed", "text/csv", "in/killed/", split="Line", BatchStrategy="SingleRecord")
    sagemaker.create_transform_job(**sent)
    transform = TransformOperator(task_id="transform", config=sent, aws_conn_id="aws_default")
    transform.on_kill()
    assert finished(sagemaker, "tx-killed")["TransformJobStatus"] == "Stopped"
    assert servers_of("tx-killed") == []
    transform.on_kill()  # a second kill of an ended job is harmless


def test_a_job_running_when_the_service_stopped_is_failed_at_restart(tmp_path):
    """A killed service leaves its jobs' model servers running: the ones their records name are stopped at the next
    start, before the jobs end (a process the record names is a stand-in here: what counts is its pid and start)."""
    import sys

    from local_sagemaker import processes
    from local_sagemaker.models import Models
    from local_sagemaker.roles import Roles
    from local_sagemaker.store import Store, now
    from local_sagemaker.transform import KIND, SERVICE_STOPPED, TransformJobs

    store = Store(tmp_path)
    server, record = processes.spawn([sys.executable, "-c", "import time; time.sleep(60)"], env=processes.allowed_env())
    for name, status in (("running", "InProgress"), ("stopping", "Stopping"), ("completed", "Completed")):
        store.put(
            KIND,
            name,
            {
                "TransformJobName": name,
                "TransformJobStatus": status,
                "CreationTime": now(),
                "Local": {"servers": [record] if name == "running" else []},
            },
        )
    roles = Roles("us-east-1", "000000000000")
    TransformJobs(
        store,
        Models(store, "us-east-1", "000000000000", roles=roles),
        tmp_path,
        cpus=1,
        region="us-east-1",
        account="000000000000",
        roles=roles,
        service_url="http://127.0.0.1:9",
    )
    running, stopping, completed = (Store(tmp_path).get(KIND, name) for name in ("running", "stopping", "completed"))
    assert (running["TransformJobStatus"], running["FailureReason"]) == ("Failed", SERVICE_STOPPED)
    assert server.poll() is not None, "the server its record names outlived the restart"
    assert stopping["TransformJobStatus"] == "Stopped" and "TransformEndTime" in stopping
    assert completed["TransformJobStatus"] == "Completed" and "TransformEndTime" not in completed
