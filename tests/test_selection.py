"""Selection judges each job by its FinalMetricDataList (metrics.json when SageMaker left the metric out)."""

import hashlib
import io
import json
import tarfile

import boto3
import pytest

from tasks.config import load_config
from tasks.selection import SelectionError, best_of, output_metrics, select_best, trial


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


def put_output(s3, bucket: str, name: str, metrics: dict, member: str = "metrics.json") -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        body = json.dumps(metrics).encode()
        info = tarfile.TarInfo(member)
        info.size = len(body)
        archive.addfile(info, io.BytesIO(body))
    s3.put_object(Bucket=bucket, Key=f"jobs/{name}/output/output.tar.gz", Body=buffer.getvalue())


def test_highest_accuracy_wins_and_ties_go_to_fewer_parameters():
    rows = [
        {"hidden_channels": 32, "test_accuracy": 0.97, "parameters": 30000, "model_data_url": "s3://b/32"},
        {"hidden_channels": 10, "test_accuracy": 0.97, "parameters": 21000, "model_data_url": "s3://b/10"},
        {"hidden_channels": 5, "test_accuracy": 0.96, "parameters": 18000, "model_data_url": "s3://b/5"},
    ]
    assert best_of(rows)["hidden_channels"] == 10
    rows[0]["test_accuracy"] = 0.9701
    assert best_of(rows)["hidden_channels"] == 32
    unknown = [{"hidden_channels": 8, "test_accuracy": 0.9, "parameters": None, "model_data_url": "s3://b/8"},
               {"hidden_channels": 4, "test_accuracy": 0.9, "parameters": None, "model_data_url": "s3://b/4"}]  # fmt: skip
    assert best_of(unknown)["hidden_channels"] == 4
    # A tuner's job it stopped early reports an objective but left no model: never the one served.
    stopped = {"hidden_channels": 64, "test_accuracy": 0.99, "parameters": None, "model_data_url": None}
    assert best_of([*rows, stopped])["hidden_channels"] == 32
    with pytest.raises(SelectionError, match="no training job completed with a model"):
        best_of([stopped])
    with pytest.raises(SelectionError, match="no training job"):
        best_of([])


def test_final_metric_is_percent_and_metrics_json_fills_in():
    metrics = {"test_accuracy": 0.9, "parameters": 99, "history": [{"test_accuracy": 0.8}, {"test_accuracy": 0.9}]}
    row = trial(description("j", 4, 97.14), metrics)
    assert (row["test_accuracy"], row["parameters"], row["accuracy_min"]) == (0.9714, 99, 0.8)
    assert trial(description("j", 4, None), metrics)["test_accuracy"] == 0.9
    with pytest.raises(SelectionError, match=r"training job j reported no test:accuracy .* has train:loss\)"):
        trial(description("j", 4, None), None)


def test_select_best_reads_each_jobs_output_from_s3(local_aws, tmp_path):
    config = load_config(bucket="selection", state_dir=str(tmp_path))
    s3 = boto3.client("s3", endpoint_url=local_aws)
    s3.create_bucket(Bucket="selection")
    put_output(s3, "selection", "a", {"test_accuracy": 0.95, "parameters": 500}, member="./metrics.json")
    put_output(s3, "selection", "b", {"test_accuracy": 0.97, "parameters": 900})
    s3.put_object(Bucket="selection", Key="jobs/b/output/model.tar.gz", Body=b"the model of job b")
    trainings = [{"Training": description(name, hc, acc, "selection")} for name, hc, acc in
                 (("b", 8, 97.0), ("a", 4, 95.0), ("c", 2, 97.0))]  # fmt: skip
    assert output_metrics(trainings[2]["Training"], config) is None  # c left no output.tar.gz
    best = select_best(trainings, config=config)
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
