"""The local backend runs a CreateTrainingJob request as SageMaker's container would: real processes, real S3.

The scripts here are small stand-ins for train.py that show what the runner gives them (environment, arguments,
directories) and misbehave on purpose; the real train.py runs in the DAG tests.
"""

import io
import json
import tarfile
import textwrap
from pathlib import Path

import boto3
import pytest

from tasks.config import load_config
from tasks.local_backend import TrainingJobError, run_script, run_training_job, threads_per_job, user_args
from tasks.training_jobs import build_training_job_request

SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time
    host = os.environ["SM_CURRENT_HOST"]
    mode = dict(zip(sys.argv[1::2], sys.argv[2::2])).get("--mode", "ok")
    for epoch, (loss, accuracy) in enumerate([(0.9, "90.00"), (0.3, "97.14")], 1):
        print(f"Train Epoch: {epoch} [64/600 (10%)], Train Loss: {loss:.6f};", flush=True)
        print(f"Test Average loss: {loss / 3:.4f}, Test Accuracy: {accuracy}%;", flush=True)
    if mode == "fail" and host == "algo-2" or mode == "fail-all":
        with open(os.path.join(os.environ["SM_OUTPUT_DIR"], "failure"), "w") as failure:
            failure.write("ValueError: hidden_channels must be positive")
        print("Traceback: the last words of the script", flush=True)
        sys.exit(3)
    if mode == "hang":
        time.sleep(60)
    if host == "algo-1":
        keys = [k for k in os.environ if k.startswith(("SM_", "MASTER_", "OMP_"))]
        channel = os.environ["SM_CHANNEL_TRAINING"]
        data = {os.path.relpath(os.path.join(d, f), channel): open(os.path.join(d, f)).read()
                for d, _, files in os.walk(channel) for f in files}
        seen = {"argv": sys.argv[1:], "cwd": os.getcwd(), "env": {k: os.environ[k] for k in keys}, "data": data}
        with open(os.path.join(os.environ["SM_MODEL_DIR"], "seen.json"), "w") as out:
            json.dump(seen, out)
        os.makedirs(os.path.join(os.environ["SM_MODEL_DIR"], "code"))
        open(os.path.join(os.environ["SM_MODEL_DIR"], "code", "inference.py"), "w").close()
        with open(os.path.join(os.environ["SM_OUTPUT_DATA_DIR"], "metrics.json"), "w") as out:
            json.dump({"test_accuracy": 0.9714, "parameters": 1234}, out)
    elif mode == "ddp":
        with open(os.path.join(os.environ["SM_OUTPUT_DIR"], "algo-2.json"), "w") as out:
            json.dump({k: os.environ[k] for k in ("SM_CURRENT_HOST", "SM_HOSTS", "MASTER_ADDR", "MASTER_PORT")}, out)
    """
)


@pytest.fixture
def code_dir(tmp_path) -> Path:
    directory = tmp_path / "code"
    directory.mkdir()
    (directory / "train.py").write_text(SCRIPT)
    return directory


def run(code_dir, tmp_path, mode="ok", **kwargs):
    lines = []
    hyperparameters = {"mode": mode, "epochs": "2", "sagemaker_program": "train.py", "sagemaker_region": "x"}
    result = run_script(
        "train.py", code_dir, hyperparameters, ml_dir=tmp_path / "ml", channels={"training": tmp_path / "data"},
        job_name="job-1", on_line=lines.append, **kwargs,
    )  # fmt: skip
    return result, lines


def test_script_gets_the_sagemaker_environment_and_arguments(code_dir, tmp_path):
    result, lines = run(code_dir, tmp_path, cpus=3)
    assert result.ok and result.returncode == 0
    assert result.metrics == {"train:loss": 0.3, "test:loss": 0.1, "test:accuracy": 97.14}  # the last of each
    assert lines[0] == "Invoking script with the following command: train.py --epochs 2 --mode ok"
    assert "Train Loss: 0.300000;" in lines[-2]
    seen = json.loads((tmp_path / "ml" / "model" / "seen.json").read_text())
    env = seen["env"]
    assert seen["argv"] == ["--epochs", "2", "--mode", "ok"]
    assert seen["cwd"] == str(code_dir)
    assert json.loads(env["SM_HOSTS"]) == ["algo-1"] and env["SM_CURRENT_HOST"] == "algo-1"
    assert env["SM_NUM_CPUS"] == env["OMP_NUM_THREADS"] == "3"
    assert env["SM_NUM_GPUS"] == "0"
    assert env["SM_CHANNEL_TRAINING"] == str(tmp_path / "data") and json.loads(env["SM_CHANNELS"]) == ["training"]
    assert env["SM_MODEL_DIR"] == str(tmp_path / "ml" / "model")
    assert env["SM_OUTPUT_DATA_DIR"] == str(tmp_path / "ml" / "output" / "data")
    assert json.loads(env["SM_HPS"]) == {"mode": "ok", "epochs": 2}  # JSON values decoded, sagemaker_* left out
    assert env["SM_HP_EPOCHS"] == "2"
    training_env = json.loads(env["SM_TRAINING_ENV"])
    assert training_env["job_name"] == "job-1" and training_env["hyperparameters"]["epochs"] == 2
    assert training_env["channel_input_dirs"] == {"training": str(tmp_path / "data")}
    hyperparameters_file = tmp_path / "ml" / "input" / "config" / "hyperparameters.json"
    assert json.loads(hyperparameters_file.read_text())["sagemaker_program"] == "train.py"


def test_two_instances_run_as_two_hosts_of_one_job(code_dir, tmp_path):
    result, lines = run(code_dir, tmp_path, mode="ddp", instance_count=2, cpus=2)
    assert result.ok
    first = json.loads((tmp_path / "ml" / "model" / "seen.json").read_text())["env"]
    second = json.loads((tmp_path / "ml" / "output" / "algo-2.json").read_text())
    assert json.loads(first["SM_HOSTS"]) == json.loads(second["SM_HOSTS"]) == ["algo-1", "algo-2"]
    assert second["SM_CURRENT_HOST"] == "algo-2"
    assert (first["MASTER_ADDR"], first["MASTER_PORT"]) == (second["MASTER_ADDR"], second["MASTER_PORT"])
    assert first["SM_NUM_CPUS"] == "1"  # two processes share the job's two cores
    assert {line.split("]")[0] for line in lines[1:]} == {"[algo-1", "[algo-2"}


def test_a_failing_host_fails_the_job_and_stops_its_peers(code_dir, tmp_path):
    result, _ = run(code_dir, tmp_path, mode="fail", instance_count=2, max_runtime_seconds=50)
    assert (result.ok, result.returncode, result.timed_out) == (False, 3, False)
    assert result.seconds < 30  # algo-1 was not left to wait
    assert result.failure == "ValueError: hidden_channels must be positive"
    assert "[algo-2] Traceback: the last words of the script" in result.log_tail


def test_max_runtime_stops_the_job(code_dir, tmp_path):
    result, lines = run(code_dir, tmp_path, mode="hang", max_runtime_seconds=2)
    assert result.timed_out and not result.ok
    assert result.seconds < 20
    assert "MaxRuntimeInSeconds (2 s) exceeded" in lines[-1]


def test_threads_share_the_cores():
    assert [threads_per_job(2, n) for n in (1, 2, 5)] == [2, 1, 1]
    assert [threads_per_job(16, n) for n in (1, 3, 5, 40)] == [16, 5, 3, 1]
    assert user_args({"b": "2", "a": "x", "sagemaker_program": "t.py"}) == ["--a", "x", "--b", "2"]


# -- the whole job against the local S3 ------------------------------------------------------------------------


@pytest.fixture
def job(local_aws, tmp_path, code_dir):
    """A request whose code and data are in the local S3, as the DAG's upload steps leave them."""
    config = load_config(bucket="local-backend", state_dir=str(tmp_path / "state"))
    s3 = boto3.client("s3", endpoint_url=local_aws)
    s3.create_bucket(Bucket=config.bucket)
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        tar.add(code_dir / "train.py", arcname="train.py")
    s3.put_object(Bucket=config.bucket, Key="code/sourcedir.tar.gz", Body=archive.getvalue())
    for name in ("train-images-idx3-ubyte.gz", "sub/t10k-labels-idx1-ubyte.gz"):
        s3.put_object(Bucket=config.bucket, Key=f"data/{name}", Body=name.encode())

    def make(mode: str, **overrides) -> dict:
        arguments = {
            "job_name": f"job-{mode}",
            "hyperparameters": {"mode": mode, "epochs": 2},
            "training_data_uri": f"s3://{config.bucket}/data/",
            "sourcedir_uri": f"s3://{config.bucket}/code/sourcedir.tar.gz",
            "output_uri": f"s3://{config.bucket}/training-jobs",
            "role_arn": config.role_arn,
            "region": config.region,
            "instance_type": "ml.m5.xlarge",
            "instance_count": 1,
            "experiment_name": "e",
            "trial_name": "t",
            "tags": {},
        }
        return build_training_job_request(**(arguments | overrides))

    return config, s3, make


def test_training_job_runs_the_request_and_uploads_like_sagemaker(job):
    config, s3, make = job
    request = make("ok")
    described = run_training_job(request, config=config, concurrent_jobs=1)["Training"]
    assert described["TrainingJobStatus"] == "Completed"
    model_uri = "s3://local-backend/training-jobs/job-ok/output/model.tar.gz"
    assert described["ModelArtifacts"] == {"S3ModelArtifacts": model_uri}
    assert {m["MetricName"]: m["Value"] for m in described["FinalMetricDataList"]}["test:accuracy"] == 97.14
    assert described["HyperParameters"] == request["HyperParameters"]
    assert described["TrainingTimeInSeconds"] >= 1 and "TrainingStartTime" in described
    json.dumps(described)  # fit for XCom

    with tarfile.open(
        fileobj=io.BytesIO(s3.get_object(Bucket="local-backend", Key=model_uri.split("/", 3)[3])["Body"].read())
    ) as model:
        assert {"seen.json", "code/inference.py"} <= set(model.getnames())
        seen = json.load(model.extractfile("seen.json"))
    # The channel's objects, with the prefix's layout, in the job directory while the job ran (then removed).
    assert seen["data"] == {name: name for name in ("train-images-idx3-ubyte.gz", "sub/t10k-labels-idx1-ubyte.gz")}
    data_dir = Path(seen["env"]["SM_CHANNEL_TRAINING"])
    assert data_dir == Path(config.state_dir) / "training-jobs" / "job-ok" / "input" / "data" / "training"
    assert not data_dir.exists()
    output = s3.get_object(Bucket="local-backend", Key="training-jobs/job-ok/output/output.tar.gz")["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(output)) as archive:
        assert json.load(archive.extractfile("metrics.json"))["parameters"] == 1234


def test_a_failing_script_fails_the_job_with_its_log(job):
    config, s3, make = job
    with pytest.raises(TrainingJobError) as caught:
        run_training_job(make("fail-all"), config=config)
    message = str(caught.value)
    assert "Training job job-fail-all failed: AlgorithmError: ValueError: hidden_channels must be positive" in message
    assert message.endswith("Traceback: the last words of the script")
    assert "Test Accuracy: 97.14%;" in message
    assert s3.list_objects_v2(Bucket="local-backend", Prefix="training-jobs/job-fail-all").get("KeyCount") == 0


def test_a_job_past_its_max_runtime_fails(job):
    config, _, make = job
    with pytest.raises(TrainingJobError, match="MaxRuntimeExceeded: the job ran past MaxRuntimeInSeconds=1"):
        run_training_job(make("hang", max_runtime_seconds=1), config=config)


def test_a_channel_without_data_is_named(job):
    config, _, make = job
    with pytest.raises(TrainingJobError, match="channel training: no objects under s3://local-backend/nothing/"):
        run_training_job(make("ok", training_data_uri="s3://local-backend/nothing/"), config=config)


def test_the_real_entry_point_trains_on_two_hosts(small_mnist, tmp_path):
    """train.py joins the two local "hosts" into one DDP job (gloo over loopback) and only algo-1 saves."""
    lines = []
    result = run_script(
        "train.py", Path(__file__).resolve().parents[1] / "training", {"hidden_channels": "4", "epochs": "1"},
        ml_dir=tmp_path / "ml", channels={"training": small_mnist}, job_name="ddp", instance_count=2, cpus=2,
        on_line=lines.append, max_runtime_seconds=240,
    )  # fmt: skip
    assert result.ok, "\n".join(result.log_tail)
    assert any(line.startswith("[algo-1]") and "world size 2" in line for line in lines)
    assert "test:accuracy" in result.metrics
    assert {"model.pth", "model_config.json"} <= {path.name for path in (tmp_path / "ml" / "model").iterdir()}
    assert (tmp_path / "ml" / "output" / "data" / "metrics.json").is_file()
