"""Training jobs on the local SageMaker service, through boto3 as the provider calls it: real processes, real S3.

The scripts here are small stand-ins for train.py that show what the service gives them (environment, arguments,
directories) and misbehave on purpose; the real train.py runs on two hosts below and in the DAG tests.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import shutil
import sys
import tarfile
import textwrap
from pathlib import Path

import boto3
import pytest
from botocore.exceptions import ClientError

from tasks.training_jobs import build_sourcedir, build_training_job_request
from tests.conftest import EXECUTION_ROLE
from tests.helpers.jobs import put_script, training, training_operator
from tests.helpers.polling import wait_until

BUCKET = "service-training"
SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time
    host = os.environ["SM_CURRENT_HOST"]
    mode = dict(zip(sys.argv[1::2], sys.argv[2::2])).get("--mode", "ok")
    for epoch, (loss, accuracy) in enumerate([(0.9, "90.00"), (0.3, "97.14")], 1):
        print(f"Train Epoch: {epoch} [64/600 (10%)], Train Loss: {loss:.6f};", flush=True)
        print(f"Test Average loss: {loss / 3:.4f}, Test Accuracy: {accuracy}%;", flush=True)
    if mode == "fail":
        with open(os.path.join(os.environ["SM_OUTPUT_DIR"], "failure"), "w") as failure:
            failure.write("ValueError: hidden_channels must be positive")
        print("Traceback: the last words of the script", flush=True)
        sys.exit(3)
    if mode == "hang":
        print("hanging", flush=True)
        time.sleep(120)
    if mode == "slow":  # long enough for another caller to find it InProgress, whatever the machine's load
        time.sleep(5)
    if host == "algo-1":
        keys = [k for k in os.environ if k.startswith(("SM_", "MASTER_", "OMP_"))]
        channel = os.environ["SM_CHANNEL_TRAINING"]
        data = {os.path.relpath(os.path.join(d, f), channel): open(os.path.join(d, f)).read()
                for d, _, files in os.walk(channel) for f in files}
        seen = {"argv": sys.argv[1:], "cwd": os.getcwd(), "env": {k: os.environ[k] for k in keys}, "data": data,
                "all_env": sorted(os.environ)}
        with open(os.path.join(os.environ["SM_MODEL_DIR"], "seen.json"), "w") as out:
            json.dump(seen, out)
        with open(os.path.join(os.environ["SM_OUTPUT_DATA_DIR"], "metrics.json"), "w") as out:
            json.dump({"test_accuracy": 0.9714, "parameters": 1234}, out)
    """
)


@pytest.fixture(scope="module")
def clients(local_sagemaker, local_aws):
    s3 = boto3.client("s3", endpoint_url=local_aws)
    s3.create_bucket(Bucket=BUCKET)
    put_script(s3, BUCKET, "code/sourcedir.tar.gz", SCRIPT)
    for name in ("train-images-idx3-ubyte.gz", "sub/t10k-labels-idx1-ubyte.gz"):
        s3.put_object(Bucket=BUCKET, Key=f"data/{name}", Body=name.encode())
    sagemaker = boto3.client("sagemaker", endpoint_url=local_sagemaker)
    logs = boto3.client("logs", endpoint_url=local_aws)
    return sagemaker, s3, logs


def request(name: str, mode: str = "ok", **overrides) -> dict:
    arguments = {
        "job_name": name,
        "hyperparameters": {"mode": mode, "epochs": 2},
        "training_data_uri": f"s3://{BUCKET}/data/",
        "sourcedir_uri": f"s3://{BUCKET}/code/sourcedir.tar.gz",
        "output_uri": f"s3://{BUCKET}/training-jobs",
        "role_arn": EXECUTION_ROLE,
        "region": "us-east-1",
        "instance_type": "ml.m5.xlarge",
        "instance_count": 1,
        "experiment_name": "e",
        "trial_name": "t",
        "tags": {"test": "yes"},
    }
    built = build_training_job_request(**(arguments | overrides))
    built.pop("ExperimentConfig")
    return built


def wait(sagemaker, name: str, timeout: float = 120) -> dict:
    return wait_until(
        lambda: sagemaker.describe_training_job(TrainingJobName=name),
        lambda described: described["TrainingJobStatus"] not in ("InProgress", "Stopping"),
        timeout=timeout,
        fail=False,
    )


def test_a_job_runs_as_sagemaker_runs_it(clients, tmp_path):
    sagemaker, s3, logs = clients
    sent = request("svc-ok")
    assert sagemaker.create_training_job(**sent)["TrainingJobArn"].endswith(":training-job/svc-ok")
    described = wait(sagemaker, "svc-ok")
    assert described["TrainingJobStatus"] == "Completed", described.get("FailureReason")
    assert [t["Status"] for t in described["SecondaryStatusTransitions"]] == [
        "Starting",
        "Downloading",
        "Training",
        "Uploading",
        "Completed",
    ]
    model_uri = f"s3://{BUCKET}/training-jobs/svc-ok/output/model.tar.gz"
    assert described["ModelArtifacts"] == {"S3ModelArtifacts": model_uri}
    assert {m["MetricName"]: m["Value"] for m in described["FinalMetricDataList"]} == {
        "train:loss": 0.3,
        "test:loss": 0.1,
        "test:accuracy": 97.14,
    }
    assert described["HyperParameters"] == sent["HyperParameters"]
    assert described["TrainingTimeInSeconds"] >= 1 and described["BillableTimeInSeconds"] >= 1

    model = s3.get_object(Bucket=BUCKET, Key="training-jobs/svc-ok/output/model.tar.gz")["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(model)) as archive:
        seen = json.load(archive.extractfile("seen.json"))
    # `--key value` for each hyperparameter, sorted, none of the sagemaker_* ones.
    assert seen["argv"] == ["--epochs", "2", "--mode", "ok"]
    assert seen["data"] == {name: name for name in ("train-images-idx3-ubyte.gz", "sub/t10k-labels-idx1-ubyte.gz")}
    assert json.loads(seen["env"]["SM_HOSTS"]) == ["algo-1"] and seen["env"]["SM_CURRENT_HOST"] == "algo-1"
    assert seen["env"]["MASTER_ADDR"] == "127.0.0.1"
    # An allow-listed environment: no credentials, no Airflow settings or connections.
    assert not [key for key in seen["all_env"] if key.startswith(("AWS_SECRET", "AIRFLOW", "AWS_ACCESS"))]
    assert not Path(seen["env"]["SM_CHANNEL_TRAINING"]).exists()  # the channel copies go once the job ends
    output = s3.get_object(Bucket=BUCKET, Key="training-jobs/svc-ok/output/output.tar.gz")["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(output)) as archive:
        assert json.load(archive.extractfile("metrics.json"))["parameters"] == 1234

    # The log, in CloudWatch Logs where the provider's print_log reads it.
    [stream] = logs.describe_log_streams(logGroupName="/aws/sagemaker/TrainingJobs", logStreamNamePrefix="svc-ok/")[
        "logStreams"
    ]
    assert stream["logStreamName"].startswith("svc-ok/algo-1-")
    events = logs.get_log_events(logGroupName="/aws/sagemaker/TrainingJobs", logStreamName=stream["logStreamName"])
    assert any("Test Accuracy: 97.14%;" in event["message"] for event in events["events"])


def test_json_encoded_hyperparameters_are_decoded_as_the_training_toolkit_decodes_them(clients):
    """The SDK's framework estimators (and much user code) send each value JSON-encoded ("\\"train.py\\""): SageMaker's
    training toolkit decodes every value that parses and keeps the rest as given, so such a job trains there."""
    sagemaker, s3, _ = clients
    sent = request("svc-json")
    sent["HyperParameters"] = {
        **{key: json.dumps(value) for key, value in sent["HyperParameters"].items()},  # sagemaker_program too
        "lr": "0.001",
        "layers": "[4, 8]",
        "options": '{"b": 2, "a": "x"}',
        "name": "not json",
        "x": "1",
    }
    sagemaker.create_training_job(**sent)
    described = wait(sagemaker, "svc-json")
    assert described["TrainingJobStatus"] == "Completed", described.get("FailureReason")
    assert described["HyperParameters"] == sent["HyperParameters"]  # answered as sent
    model = s3.get_object(Bucket=BUCKET, Key="training-jobs/svc-json/output/model.tar.gz")["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(model)) as archive:
        seen = json.load(archive.extractfile("seen.json"))
    # The toolkit's arguments: sorted, a one-letter key as -x, a mapping as k=v pairs, the sagemaker_* ones left out.
    assert seen["argv"] == [
        "--epochs",
        "2",
        "--layers",
        "[4, 8]",
        "--lr",
        "0.001",
        "--mode",
        "ok",
        "--name",
        "not json",
        "--options",
        "a=x,b=2",
        "-x",
        "1",
    ]
    env = seen["env"]
    assert (env["SM_HP_MODE"], env["SM_HP_LAYERS"], env["SM_HP_OPTIONS"]) == ("ok", "[4,8]", '{"a":"x","b":2}')
    assert json.loads(env["SM_HPS"]) == {
        "epochs": "2",
        "mode": "ok",
        "lr": 0.001,
        "layers": [4, 8],
        "options": {"b": 2, "a": "x"},
        "name": "not json",
        "x": 1,
    }
    assert not [key for key in env if key.startswith("SM_HP_SAGEMAKER")]


CONTAINER_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    # The paths a container's script spells: /opt/ml is where the service put this host's.
    config = {name: json.load(open(f"/opt/ml/input/config/{name}.json"))
              for name in ("resourceconfig", "hyperparameters", "inputdataconfig")}
    host = config["resourceconfig"]["current_host"]
    seen = {"config": config, "argv": sys.argv[1:], "python": sys.executable, "cwd": os.getcwd(),
            "data": sorted(os.listdir("/opt/ml/input/data/training")),
            "env": {k: os.environ.get(k) for k in ("SM_CURRENT_HOST", "SAGEMAKER_BASE_DIR", "SM_MODEL_DIR",
                                                   "TRAINING_JOB_NAME", "TRAINING_JOB_ARN", "GREETING")}}
    with open(os.path.join(sys.argv[2], f"{host}.json"), "w") as out:
        json.dump(seen, out)
    print("Test Accuracy: 50.00%;", flush=True)
    """
)


def test_a_containers_command_runs_on_each_host_with_its_own_opt_ml(clients):
    """ContainerEntrypoint and ContainerArguments, as a framework image runs them: the command as given (its Python
    the service's own), each host's /opt/ml a directory of the job's, mapped in the command and in the script's
    channel, with the config files SageMaker writes there; the model directory shared, as uploaded."""
    sagemaker, s3, _ = clients
    s3.put_object(Bucket=BUCKET, Key="container/code/run.py", Body=CONTAINER_SCRIPT.encode())
    sent = request("svc-container", instance_count=2)
    sent["AlgorithmSpecification"] |= {
        "ContainerEntrypoint": ["/usr/local/bin/python3", "-u"],
        "ContainerArguments": ["/opt/ml/input/data/code/run.py", "--out", "/opt/ml/model"],
    }
    del sent["HyperParameters"]  # none at all, not even sagemaker_program: the command is the code
    sent["InputDataConfig"].append(
        {
            "ChannelName": "code",
            "DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": f"s3://{BUCKET}/container/code/"}},
        }
    )
    sent["Environment"] = {"GREETING": "hello"}
    sagemaker.create_training_job(**sent)
    described = wait(sagemaker, "svc-container")
    assert described["TrainingJobStatus"] == "Completed", described.get("FailureReason")
    model = s3.get_object(Bucket=BUCKET, Key="training-jobs/svc-container/output/model.tar.gz")["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(model)) as archive:
        assert sorted(archive.getnames()) == ["algo-1.json", "algo-2.json"]
        seen = {host: json.load(archive.extractfile(f"{host}.json")) for host in ("algo-1", "algo-2")}
    bases = {host: s["env"]["SAGEMAKER_BASE_DIR"] for host, s in seen.items()}
    assert len(set(bases.values())) == 2 and not any(base.startswith("/opt/ml") for base in bases.values())
    for host, s in seen.items():
        assert s["config"]["resourceconfig"]["current_host"] == s["env"]["SM_CURRENT_HOST"] == host
        assert s["config"]["resourceconfig"]["hosts"] == ["algo-1", "algo-2"]
        assert s["config"]["hyperparameters"] == {}
        assert s["config"]["inputdataconfig"]["code"]["TrainingInputMode"] == "File"
        assert s["argv"] == ["--out", f"{bases[host]}/model"] and s["cwd"] == str(Path(bases[host]).resolve())
        assert s["python"] == sys.executable  # the image's python3 is the service's interpreter, not the host's
        assert s["data"] == ["sub", "train-images-idx3-ubyte.gz"]
        assert s["env"]["TRAINING_JOB_NAME"] == "svc-container" and s["env"]["GREETING"] == "hello"
        assert s["env"]["TRAINING_JOB_ARN"] == described["TrainingJobArn"]
    assert {m["MetricName"]: m["Value"] for m in described["FinalMetricDataList"]}["test:accuracy"] == 50.0


@pytest.mark.parametrize(
    ("command", "why"),
    [
        (["/usr/bin/curl", "http://example.com"], "'/usr/bin/curl' is neither an interpreter of a framework image"),
        (["python3", "-c", "print(1)"], "'-c' is not a script under /opt/ml"),
        (["python3", "train.py"], "'train.py' is not a script under /opt/ml"),
        (["python3", "/opt/ml/input/../../../etc/passwd"], "is not a script under /opt/ml"),
        (["bash", "-c", "curl http://example.com"], "'curl' is not a script under /opt/ml"),
        (["/bin/sh", "-c", "/opt/ml/input/data/code/run.sh; rm -rf /"], "the -c line holds ';'"),
        (["bash", "-c", "/opt/ml/input/data/code/run.sh | tee /tmp/x"], "the -c line holds '|'"),
        (["bash", "-c", "/opt/ml/input/data/code/$(whoami)"], "the -c line holds"),
        (["bash", "-c", "chmod 777 /opt/ml/input/data/code/run.sh"], "chmod may only make a script executable"),
        (["bash", "-c", "'unclosed"], "the -c line cannot be read"),
    ],
)
def test_a_container_command_may_run_only_the_jobs_scripts(command, why):
    """The service runs a job's command on its own machine: a request may name only scripts the job brings, run by a
    framework image's interpreters, never a program of the host (unit: no stack)."""
    from local_sagemaker.container import command as container_command
    from local_sagemaker.protocol import ValidationException

    with pytest.raises(ValidationException) as caught:
        container_command({"ContainerEntrypoint": command[:1], "ContainerArguments": command[1:]})
    assert why in caught.value.message and "runs only a script under /opt/ml" in caught.value.message


def test_the_sdks_command_runs_as_given_with_opt_ml_mapped(tmp_path):
    """ModelTrainer's command and driver channel, mapped for a host whose /opt/ml is ``tmp_path`` (unit)."""
    from local_sagemaker.container import command as container_command
    from local_sagemaker.container import map_files

    sdk = {
        "ContainerEntrypoint": ["/bin/bash"],
        "ContainerArguments": [
            "-c",
            "chmod +x /opt/ml/input/data/sm_drivers/sm_train.sh && /opt/ml/input/data/sm_drivers/sm_train.sh",
        ],
    }
    parsed = container_command(sdk)
    assert parsed.channels() == {"sm_drivers"}
    script = f"{tmp_path}/input/data/sm_drivers/sm_train.sh"
    assert parsed.argv_for(tmp_path) == [shutil.which("bash"), "-c", f"chmod +x {script} && {script}"]
    assert container_command({"ContainerArguments": ["/opt/ml/input/data/code/run"]}).argv_for(tmp_path) == [
        f"{tmp_path}/input/data/code/run"
    ]  # a script alone runs by itself, as an image's entrypoint runs its arguments
    assert container_command({"TrainingImage": "x"}) is None  # script mode
    drivers = tmp_path / "input" / "data" / "sm_drivers"
    drivers.mkdir(parents=True)
    (drivers / "env.py").write_text('MODEL = "/opt/ml/model"\nOTHER = ["/opt/mlflow", "/x/opt/ml/y", "/opt/ml"]\n')
    (drivers / "data.bin").write_bytes(b"\x00\x01 nothing to map")
    copy = tmp_path / "copy.py"
    copy.hardlink_to(drivers / "env.py")
    assert map_files(drivers, tmp_path) == 1
    assert (drivers / "env.py").read_text() == (
        f'MODEL = "{tmp_path}/model"\nOTHER = ["/opt/mlflow", "/x/opt/ml/y", "{tmp_path}"]\n'
    )
    assert copy.read_text().startswith('MODEL = "/opt/ml/model"')  # a hard-linked copy keeps its own


def test_names_are_unique(clients):
    sagemaker, _, _ = clients
    sagemaker.create_training_job(**request("svc-twice"))
    with pytest.raises(ClientError) as caught:
        sagemaker.create_training_job(**request("svc-twice"))
    assert caught.value.response["Error"]["Code"] == "ResourceInUse"
    wait(sagemaker, "svc-twice")


def test_missing_jobs_are_named(clients):
    sagemaker, _, _ = clients
    with pytest.raises(ClientError) as caught:
        sagemaker.describe_training_job(TrainingJobName="svc-never")
    assert caught.value.response["Error"] == {"Code": "ValidationException", "Message": "Requested resource not found."}


def test_a_failing_script_fails_the_job_with_its_log(clients):
    sagemaker, s3, _ = clients
    sagemaker.create_training_job(**request("svc-fail", "fail"))
    described = wait(sagemaker, "svc-fail")
    assert described["TrainingJobStatus"] == "Failed"
    reason = described["FailureReason"]
    assert reason.startswith("AlgorithmError: ValueError: hidden_channels must be positive")
    assert reason.endswith("Traceback: the last words of the script")
    assert s3.list_objects_v2(Bucket=BUCKET, Prefix="training-jobs/svc-fail/").get("KeyCount") == 0


def test_stop_ends_the_processes(clients):
    sagemaker, _, _ = clients
    sagemaker.create_training_job(**request("svc-stop", "hang"))
    wait_until(lambda: training(sagemaker, "svc-stop"), timeout=60)
    sagemaker.stop_training_job(TrainingJobName="svc-stop")
    stopped = wait(sagemaker, "svc-stop", timeout=30)
    assert (stopped["TrainingJobStatus"], stopped["SecondaryStatus"]) == ("Stopped", "Stopped")
    with pytest.raises(ClientError, match="in status Stopped"):
        sagemaker.stop_training_job(TrainingJobName="svc-stop")


def test_max_runtime_ends_the_processes(clients):
    sagemaker, _, _ = clients
    sagemaker.create_training_job(**request("svc-late", "hang", max_runtime_seconds=3))
    late = wait(sagemaker, "svc-late", timeout=60)
    assert (late["TrainingJobStatus"], late["SecondaryStatus"]) == ("Stopped", "MaxRuntimeExceeded")
    assert "MaxRuntimeInSeconds=3" in late["FailureReason"]


def test_list_filters_sorts_and_pages(clients):
    sagemaker, _, _ = clients
    for name in ("svc-list-b", "svc-list-a", "svc-list-c"):
        sagemaker.create_training_job(**request(name))
    for name in ("svc-list-b", "svc-list-a", "svc-list-c"):
        wait(sagemaker, name)
    names = [
        job["TrainingJobName"]
        for page in sagemaker.get_paginator("list_training_jobs").paginate(
            NameContains="svc-list", SortBy="Name", SortOrder="Descending", PaginationConfig={"PageSize": 2}
        )
        for job in page["TrainingJobSummaries"]
    ]
    assert names == ["svc-list-c", "svc-list-b", "svc-list-a"]
    completed = sagemaker.list_training_jobs(StatusEquals="Completed", NameContains="svc-list")
    assert len(completed["TrainingJobSummaries"]) == 3
    assert sagemaker.list_training_jobs(StatusEquals="Failed", NameContains="svc-list")["TrainingJobSummaries"] == []


def test_a_malformed_request_gets_sagemakers_error(clients, local_sagemaker):
    from botocore.config import Config

    unchecked = boto3.client("sagemaker", endpoint_url=local_sagemaker, config=Config(parameter_validation=False))
    bad = request("bad name!")
    with pytest.raises(ClientError) as caught:
        unchecked.create_training_job(**bad)
    assert caught.value.response["Error"]["Code"] == "ValidationException"
    assert "at 'trainingJobName' failed to satisfy constraint" in caught.value.response["Error"]["Message"]


@pytest.mark.parametrize("program", ["../../../../bin/evil.py", "/tmp/evil.py", "code/../../evil.py", "-c"])
def test_the_entry_point_must_be_a_file_inside_the_jobs_code(clients, program):
    sagemaker, _, _ = clients
    bad = request(f"outside-{abs(hash(program)) % 1000}")
    bad["HyperParameters"]["sagemaker_program"] = program
    with pytest.raises(ClientError) as caught:
        sagemaker.create_training_job(**bad)
    assert caught.value.response["Error"]["Code"] == "ValidationException"
    assert (
        f"sagemaker_program {program!r} must name a file inside the job's code"
        in caught.value.response["Error"]["Message"]
    )
    with pytest.raises(ClientError):
        sagemaker.describe_training_job(TrainingJobName=bad["TrainingJobName"])  # nothing was made


@pytest.mark.parametrize(
    ("count", "code", "message"),
    [
        (
            9,
            "ResourceLimitExceeded",
            "is 8 Instances, with current utilization of 0 Instances and a request delta of 9",
        ),
        (100_000, "ResourceLimitExceeded", "a request delta of 100000 Instances"),
        (0, "ValidationException", "Value 0 at 'resourceConfig.instanceCount' failed to satisfy constraint"),
    ],
)
def test_a_job_of_more_instances_than_the_quota_is_refused_and_nothing_starts(clients, count, code, message):
    """Each instance is a process here: a request for thousands would fork thousands."""
    from botocore.config import Config

    sagemaker = boto3.client(
        "sagemaker", endpoint_url=clients[0].meta.endpoint_url, config=Config(parameter_validation=False)
    )  # as a raw HTTP request could send it
    bad = request(f"instances-{count}")
    bad["ResourceConfig"]["InstanceCount"] = count
    with pytest.raises(ClientError) as caught:
        sagemaker.create_training_job(**bad)
    assert caught.value.response["Error"]["Code"] == code
    assert message in caught.value.response["Error"]["Message"]
    with pytest.raises(ClientError):
        sagemaker.describe_training_job(TrainingJobName=bad["TrainingJobName"])  # nothing was made


def test_the_real_entry_point_trains_on_two_hosts(clients, local_aws, small_mnist):
    """train.py joins the two local "hosts" into one DDP job (gloo over loopback); the experiment records it."""
    sagemaker, s3, logs = clients
    s3.put_object(Bucket=BUCKET, Key="code/real/sourcedir.tar.gz", Body=build_sourcedir())
    for path in small_mnist.iterdir():
        s3.put_object(Bucket=BUCKET, Key=f"mnist/{path.name}", Body=path.read_bytes())
    sagemaker.create_experiment(ExperimentName="svc-experiment")
    sagemaker.create_trial(TrialName="svc-trial", ExperimentName="svc-experiment")
    sent = request(
        "svc-ddp",
        hyperparameters={"hidden_channels": 4, "epochs": 1},
        instance_count=2,
        training_data_uri=f"s3://{BUCKET}/mnist/",
        sourcedir_uri=f"s3://{BUCKET}/code/real/sourcedir.tar.gz",
    )
    sent["ExperimentConfig"] = {"ExperimentName": "svc-experiment", "TrialName": "svc-trial"}
    sagemaker.create_training_job(**sent)
    described = wait(sagemaker, "svc-ddp", timeout=300)
    assert described["TrainingJobStatus"] == "Completed", described.get("FailureReason")
    assert "test:accuracy" in {m["MetricName"] for m in described["FinalMetricDataList"]}
    streams = logs.describe_log_streams(logGroupName="/aws/sagemaker/TrainingJobs", logStreamNamePrefix="svc-ddp/")
    assert sorted(s["logStreamName"].split("/")[1].rsplit("-", 1)[0] for s in streams["logStreams"]) == [
        "algo-1",
        "algo-2",
    ]
    model = s3.get_object(Bucket=BUCKET, Key="training-jobs/svc-ddp/output/model.tar.gz")["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(model)) as archive:
        assert {"model.pth", "model_config.json"} <= set(archive.getnames())
    [component] = sagemaker.list_trial_components(TrialName="svc-trial")["TrialComponentSummaries"]
    assert component["TrialComponentName"] == "svc-ddp-aws-training-job"
    recorded = sagemaker.describe_trial_component(TrialComponentName="svc-ddp-aws-training-job")
    assert recorded["Status"]["PrimaryStatus"] == "Completed"
    assert recorded["Parameters"]["hidden_channels"] == {"NumberValue": 4.0}
    assert "test:accuracy" in {metric["MetricName"] for metric in recorded["Metrics"]}


def test_trial_components_are_listed_within_their_creation_time_bounds(clients):
    """ListTrialComponents' CreatedAfter and CreatedBefore (its names for the creation time bounds) keep only the
    components created after, or before, the time they give."""
    sagemaker, _, _ = clients
    sagemaker.create_experiment(ExperimentName="svc-bounds")
    sagemaker.create_trial(TrialName="svc-bounds-trial", ExperimentName="svc-bounds")
    created = {}
    for name in ("svc-bound-early", "svc-bound-late"):
        sent = request(name) | {"ExperimentConfig": {"ExperimentName": "svc-bounds", "TrialName": "svc-bounds-trial"}}
        sagemaker.create_training_job(**sent)
        created[name] = wait(sagemaker, name)["CreationTime"]
    between = created["svc-bound-early"] + (created["svc-bound-late"] - created["svc-bound-early"]) / 2

    def listed(**bound) -> list[str]:
        summaries = sagemaker.list_trial_components(TrialName="svc-bounds-trial", **bound)["TrialComponentSummaries"]
        return [summary["TrialComponentName"] for summary in summaries]

    assert sorted(listed()) == ["svc-bound-early-aws-training-job", "svc-bound-late-aws-training-job"]
    assert listed(CreatedAfter=between) == ["svc-bound-late-aws-training-job"]
    assert listed(CreatedBefore=between) == ["svc-bound-early-aws-training-job"]


@pytest.mark.parametrize(
    ("describe", "arn"),
    [
        ({"ExperimentName": "svc-nowhere"}, "experiment/svc-nowhere"),
        ({"TrialName": "svc-nowhere"}, "experiment-trial/svc-nowhere"),
        ({"TrialComponentName": "svc-nowhere"}, "experiment-trial-component/svc-nowhere"),
    ],
)
def test_a_missing_experiment_trial_or_component_is_named_by_the_arn_it_would_have(clients, describe, arn):
    """The ARN in the not-found message is of the type SageMaker gives the resource when it is created."""
    sagemaker, _, _ = clients
    call = {
        "ExperimentName": sagemaker.describe_experiment,
        "TrialName": sagemaker.describe_trial,
        "TrialComponentName": sagemaker.describe_trial_component,
    }[next(iter(describe))]
    with pytest.raises(ClientError) as caught:
        call(**describe)
    assert caught.value.response["Error"]["Code"] == "ResourceNotFound"
    assert f":{arn}' does not exist." in caught.value.response["Error"]["Message"]


def test_the_providers_deferred_operator_completes_through_its_trigger(clients):
    """Deferrable mode: the trigger's aiobotocore client keeps the connection's per-service endpoints, so it polls
    the local SageMaker service as the operator itself does."""
    import asyncio

    from airflow.providers.amazon.aws.operators.sagemaker import SageMakerTrainingOperator
    from airflow.providers.common.compat.sdk import TaskDeferred

    train = SageMakerTrainingOperator(
        task_id="train",
        config=request("svc-deferred"),
        deferrable=True,
        check_interval=1,
        print_log=False,
        aws_conn_id="aws_default",
        region_name="us-east-1",
    )
    with pytest.raises(TaskDeferred) as deferred:
        train.execute({})

    async def first_event():
        async for event in deferred.value.trigger.run():
            return event

    event = asyncio.run(first_event())
    assert event.payload == {"status": "success", "job_name": "svc-deferred"}
    assert train.execute_complete({}, event.payload)["Training"]["TrainingJobStatus"] == "Completed"


def test_the_training_operator_streams_the_log_and_ends_with_the_job(clients, capfd):
    """print_log on: the job's own log lines reach the task's log, and the task sees the end of the job at the next
    check_interval, not at the provider's fixed 30 s (tasks.operators)."""

    train = training_operator(request("svc-logged"), print_log=True)
    result = train.execute({})
    described = clients[0].describe_training_job(TrainingJobName="svc-logged")
    assert result["Training"]["TrainingJobStatus"] == "Completed"
    noticed = datetime.datetime.now(datetime.UTC) - described["TrainingEndTime"]
    assert noticed < datetime.timedelta(seconds=10), noticed  # the provider alone: up to 30 s more
    printed = "".join(capfd.readouterr())  # the task's log, as Airflow's logging writes it here
    assert "Test Accuracy: 97.14%" in printed, printed[-2000:]  # the training script's own line


def test_a_retry_waits_for_the_job_its_killed_try_left_running(clients):
    """A try SIGKILLed before its on_kill could run leaves its job InProgress: the retry waits for that job."""

    sagemaker = clients[0]
    sagemaker.create_training_job(**request("svc-adopted", mode="slow"))  # what the killed try started
    train = training_operator(request("svc-adopted", mode="slow"), action_if_job_exists="timestamp")
    result = train.execute({})
    assert result["Training"]["TrainingJobName"] == "svc-adopted"
    assert result["Training"]["TrainingJobStatus"] == "Completed"
    jobs = sagemaker.list_training_jobs(NameContains="svc-adopted")["TrainingJobSummaries"]
    assert [job["TrainingJobName"] for job in jobs] == ["svc-adopted"]  # no second job


def test_a_killed_training_task_stops_its_job(clients):
    """Airflow calls on_kill when it kills a task (marked failed, timed out): the job is stopped, not left running."""
    import threading

    sagemaker = clients[0]
    train = training_operator(request("svc-killed", mode="hang"))
    outcome = []

    def run():
        try:
            outcome.append(train.execute({}))
        except Exception as error:
            outcome.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    wait_until(
        lambda: [
            job
            for job in sagemaker.list_training_jobs(NameContains="svc-killed")["TrainingJobSummaries"]
            if training(sagemaker, job["TrainingJobName"])
        ],
        timeout=60,
    )
    train.on_kill()
    described = wait(sagemaker, "svc-killed", timeout=30)
    thread.join(timeout=30)
    assert described["TrainingJobStatus"] == "Stopped"
    assert outcome and "ended Stopped" in str(outcome[0])  # the task fails: its job did not complete
    train.on_kill()  # a second kill of an ended job is harmless


def test_code_and_data_run_only_as_their_checksums_say(clients):
    """A content-addressed sourcedir.tar.gz whose body is not what its key names, or a dataset file that is not what
    its manifest lists, fails the job naming the object; files beside a manifest that it does not list are not
    downloaded; and the pipeline replaces a planted object at its code's address instead of using it."""
    import hashlib

    sagemaker, s3, _ = clients
    genuine = s3.get_object(Bucket=BUCKET, Key="code/sourcedir.tar.gz")["Body"].read()
    address = hashlib.sha256(genuine).hexdigest()
    s3.put_object(Bucket=BUCKET, Key=f"code/{address}/sourcedir.tar.gz", Body=genuine + b"planted")
    sagemaker.create_training_job(
        **request("svc-planted-code", sourcedir_uri=f"s3://{BUCKET}/code/{address}/sourcedir.tar.gz")
    )
    failed = wait(sagemaker, "svc-planted-code")
    assert failed["TrainingJobStatus"] == "Failed"
    assert (
        f"sagemaker_submit_directory s3://{BUCKET}/code/{address}/sourcedir.tar.gz does not match the SHA-256"
        in (failed["FailureReason"])
    )

    files = {"train-images-idx3-ubyte.gz": b"images", "t10k-labels-idx1-ubyte.gz": b"labels"}
    manifest = "".join(f"{hashlib.sha256(body).hexdigest()}  {name}\n" for name, body in files.items()).encode()
    dataset = f"datasets/{hashlib.sha256(manifest).hexdigest()}"
    for name, body in files.items():
        s3.put_object(Bucket=BUCKET, Key=f"{dataset}/{name}", Body=body)
    s3.put_object(Bucket=BUCKET, Key=f"{dataset}/SHA256SUMS", Body=manifest)
    s3.put_object(Bucket=BUCKET, Key=f"{dataset}/extra.py", Body=b"print('not listed')")
    sagemaker.create_training_job(**request("svc-listed-data", training_data_uri=f"s3://{BUCKET}/{dataset}/"))
    completed = wait(sagemaker, "svc-listed-data")
    assert completed["TrainingJobStatus"] == "Completed", completed.get("FailureReason")
    seen = json.loads(_model_file(s3, "svc-listed-data", "seen.json"))
    assert sorted(seen["data"]) == ["SHA256SUMS", "t10k-labels-idx1-ubyte.gz", "train-images-idx3-ubyte.gz"]

    s3.put_object(Bucket=BUCKET, Key=f"{dataset}/train-images-idx3-ubyte.gz", Body=b"swapped")
    sagemaker.create_training_job(**request("svc-swapped-data", training_data_uri=f"s3://{BUCKET}/{dataset}/"))
    failed = wait(sagemaker, "svc-swapped-data")
    assert failed["TrainingJobStatus"] == "Failed"
    assert f"s3://{BUCKET}/{dataset}/train-images-idx3-ubyte.gz does not match the SHA-256" in failed["FailureReason"]


def _model_file(s3, job: str, name: str) -> bytes:
    archive = s3.get_object(Bucket=BUCKET, Key=f"training-jobs/{job}/output/model.tar.gz")["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        return tar.extractfile(name).read()


def test_a_crash_of_the_service_leaves_no_training_process_running(clients, local_aws, tmp_path):
    """A service of its own, SIGKILLed while two jobs train: their processes outlive it. The next start on the same
    state directory stops them, the one its record names and the one the crash kept out of its record, and fails
    both jobs saying why."""
    import psutil

    from local_sagemaker import launch, processes
    from local_sagemaker.training import LOG_GROUP
    from tests.conftest import KEYS

    logs = clients[2]
    state = tmp_path / "state"

    def start():
        return launch.start(state, local_aws, credentials=KEYS.sagemaker.environment(), cpus=2, metrics_interval=1)

    started, hosts = start(), {}
    try:
        client = boto3.client("sagemaker", endpoint_url=started.url)
        names = ("crashed-recorded", "crashed-unrecorded")
        for name in names:
            client.create_training_job(**request(name, "hang"))

        # Killed once the scripts are quiet: one still printing would die of the broken pipe on its own.
        def quiet(name: str) -> bool:
            with contextlib.suppress(logs.exceptions.ResourceNotFoundException):  # until the first job makes it
                streams = logs.describe_log_streams(logGroupName=LOG_GROUP, logStreamNamePrefix=f"{name}/")
                for stream in streams["logStreams"]:
                    events = logs.get_log_events(logGroupName=LOG_GROUP, logStreamName=stream["logStreamName"])
                    return any(event["message"] == "hanging" for event in events["events"])
            return False

        assert processes.wait_until(lambda: all(quiet(name) for name in names), 60, interval=0.5)
        # Each host is in its job's record (written as it starts, before it could print).
        records = {name: json.loads((state / "training-jobs" / f"{name}.json").read_text()) for name in names}
        hosts = {name: record["Local"]["processes"][0] for name, record in records.items()}
        processes.live(started.record).kill()
        psutil.wait_procs([psutil.Process(started.record["pid"])], timeout=10)
        assert all(processes.live(host) for host in hosts.values()), "a crash does not end the jobs' processes"
        # A crash between a host's start and its record: the record names no process.
        path = state / "training-jobs" / "crashed-unrecorded.json"
        path.write_text(json.dumps({**records["crashed-unrecorded"], "Local": {"processes": []}}))

        started = start()
        client = boto3.client("sagemaker", endpoint_url=started.url)
        for name, host in hosts.items():
            assert processes.live(host) is None, f"{name}'s process outlived the restart"
            described = client.describe_training_job(TrainingJobName=name)
            assert (described["TrainingJobStatus"], described["SecondaryStatus"]) == ("Failed", "Failed")
            assert described["FailureReason"] == (
                "InternalServerError: the local SageMaker service restarted while the job ran; its training "
                f"processes still running (pids {host['pid']}) were stopped"
            )
    finally:
        launch.stop(started.record)
        processes.stop(hosts.values(), grace=1)  # nothing left behind by a failure here
