"""The local backend: runs a CreateTrainingJob request on this machine, as a SageMaker training container would.

`run_training_job(request)` takes the very request the sagemaker backend sends (tasks.training_jobs): it fetches
`sagemaker_submit_directory` and each input channel from S3 through the AWS connection, lays out an /opt/ml-like
job directory under the state dir, and runs `sagemaker_program` with the SageMaker `SM_*` environment and the
hyperparameters as `--key value`, one process per instance (InstanceCount > 1: distributed data parallel over
loopback). Then, as SageMaker does: FinalMetricDataList from the request's MetricDefinitions (the last match of
each), `model.tar.gz` of the model dir and `output.tar.gz` of the output data dir under
`<S3OutputPath>/<job>/output/`, and a DescribeTrainingJob-shaped answer (`{"Training": {...}}`, as the provider's
SageMakerTrainingOperator returns). `run_script` is the process part alone, for runs without S3 (the CLI sweep).

Imported by the DAG at parse time: airflow hooks are imported inside the functions.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import dataclasses
import datetime
import hashlib
import io
import json
import logging
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from tasks.config import PipelineConfig, load_config
from tasks.local_aws import free_port
from tasks.training_jobs import METRIC_DEFINITIONS

log = logging.getLogger(__name__)

# The Airflow pool of local training tasks, one slot per core (the local stack creates it): no more jobs run at
# once than there are cores, and each job's threads come from the same count (`threads_per_job`).
TRAINING_POOL = "local_training"
LOG_TAIL_LINES = 40
STOP_GRACE_SECONDS = 10  # SIGTERM, then this long before SIGKILL (SageMaker gives 120 s)


class TrainingJobError(RuntimeError):
    """The training script failed or ran past MaxRuntimeInSeconds; the message ends with the tail of its log."""


@dataclasses.dataclass
class ScriptResult:
    returncode: int  # the exit status of the (first) failed host, else 0
    timed_out: bool
    metrics: dict[str, float]  # metric name → last value the log showed
    log_tail: list[str]
    seconds: float
    failure: str  # what the script wrote to output/failure (SageMaker's FailureReason), if anything

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


def threads_per_job(cpus: int, concurrent_jobs: int) -> int:
    """Cores per job when ``concurrent_jobs`` share ``cpus`` (at most ``cpus`` of them run at once)."""
    return max(1, cpus // max(1, min(concurrent_jobs, cpus)))


# -- running the entry point -------------------------------------------------------------------------------------


def user_args(hyperparameters: Mapping[str, str]) -> list[str]:
    """`--key value` for each hyperparameter SageMaker passes to the script (not the sagemaker_* ones), sorted."""
    args = []
    for key, value in sorted(hyperparameters.items()):
        if not key.startswith("sagemaker_"):
            args += [f"--{key}", str(value)]
    return args


def _decoded(value: str):
    """Hyperparameters as SM_HPS shows them: JSON values decoded, anything else kept as the string."""
    try:
        return json.loads(value)
    except ValueError:
        return value


def _gpu_count() -> int:
    if not shutil.which("nvidia-smi"):
        return 0
    listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False).stdout
    return sum(line.startswith("GPU ") for line in listing.splitlines())


def _environments(
    *, job_name: str, ml_dir: Path, code_dir: Path, program: str, hyperparameters: Mapping[str, str],
    channels: Mapping[str, Path], instance_count: int, cpus: int,
) -> list[dict[str, str]]:  # fmt: skip
    """The environment of each host's process: what the SageMaker training toolkit sets, plus loopback DDP."""
    hosts = [f"algo-{i + 1}" for i in range(instance_count)]
    hps = {key: _decoded(value) for key, value in hyperparameters.items() if not key.startswith("sagemaker_")}
    gpus_per_host = _gpu_count() // instance_count
    threads = max(1, cpus // instance_count)
    base = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join([str(code_dir), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "OMP_NUM_THREADS": str(threads),
        "SM_HOSTS": json.dumps(hosts),
        "SM_NUM_CPUS": str(threads),
        "SM_NUM_GPUS": str(gpus_per_host),
        "SM_MODEL_DIR": str(ml_dir / "model"),
        "SM_OUTPUT_DIR": str(ml_dir / "output"),
        "SM_OUTPUT_DATA_DIR": str(ml_dir / "output" / "data"),
        "SM_INPUT_DIR": str(ml_dir / "input"),
        "SM_INPUT_CONFIG_DIR": str(ml_dir / "input" / "config"),
        "SM_CHANNELS": json.dumps(sorted(channels)),
        "SM_HPS": json.dumps(hps),
        "SM_USER_ENTRY_POINT": program,
        "SM_MODULE_DIR": hyperparameters.get("sagemaker_submit_directory", str(code_dir)),
        "SM_USER_ARGS": json.dumps(user_args(hyperparameters)),
        "SM_NETWORK_INTERFACE_NAME": "lo",
        # The hosts' names resolve only inside SageMaker's network: here every host is a process on loopback.
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        **{f"SM_CHANNEL_{name.upper()}": str(path) for name, path in channels.items()},
        **{f"SM_HP_{key.upper()}": str(value) for key, value in hyperparameters.items()},
    }
    environments = []
    for index, host in enumerate(hosts):
        env = {**base, "SM_CURRENT_HOST": host}
        if gpus_per_host:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(index * gpus_per_host + g) for g in range(gpus_per_host))
        env["SM_TRAINING_ENV"] = json.dumps(
            {
                "job_name": job_name,
                "current_host": host,
                "hosts": hosts,
                "hyperparameters": hps,
                "channel_input_dirs": {name: str(path) for name, path in channels.items()},
                "model_dir": env["SM_MODEL_DIR"],
                "output_data_dir": env["SM_OUTPUT_DATA_DIR"],
                "output_dir": env["SM_OUTPUT_DIR"],
                "input_dir": env["SM_INPUT_DIR"],
                "module_dir": env["SM_MODULE_DIR"],
                "user_entry_point": program,
                "num_cpus": threads,
                "num_gpus": gpus_per_host,
                "network_interface_name": "lo",
            }
        )
        environments.append(env)
    return environments


def _stream(process: subprocess.Popen, host: str, lines: queue.Queue) -> None:
    for line in process.stdout:
        lines.put((host, line.rstrip("\n")))
    lines.put((host, None))  # this host's log ended


def _stop(processes: Iterable[subprocess.Popen]) -> None:
    """SIGTERM each process group (the script and anything it started), SIGKILL what outlives the grace period."""
    alive = [process for process in processes if process.poll() is None]
    for process in alive:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    for process in alive:
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def run_script(
    program: str,
    code_dir: Path,
    hyperparameters: Mapping[str, str],
    *,
    ml_dir: Path,
    channels: Mapping[str, Path],
    job_name: str,
    instance_count: int = 1,
    cpus: int = 1,
    max_runtime_seconds: float | None = None,
    metric_definitions: Iterable[Mapping[str, str]] = METRIC_DEFINITIONS,
    on_line: Callable[[str], None] | None = None,
) -> ScriptResult:
    """Run ``program`` from ``code_dir`` in script mode, one process per instance, with ``ml_dir`` as /opt/ml.

    Every log line goes to ``on_line`` (default: this module's logger, i.e. the Airflow task log), prefixed with
    its host when there are several. Returns when every process has ended, or stops them all once one fails (a
    host that died leaves its peers waiting) or ``max_runtime_seconds`` has passed.
    """
    on_line = on_line or log.info
    for directory in ("model", "output/data", "input/config"):
        (ml_dir / directory).mkdir(parents=True, exist_ok=True)
    (ml_dir / "input" / "config" / "hyperparameters.json").write_text(json.dumps(dict(hyperparameters), indent=2))
    (ml_dir / "input" / "config" / "inputdataconfig.json").write_text(
        json.dumps({name: {"TrainingInputMode": "File"} for name in channels})
    )
    patterns = {definition["Name"]: re.compile(definition["Regex"]) for definition in metric_definitions}
    environments = _environments(
        job_name=job_name, ml_dir=ml_dir, code_dir=code_dir, program=program, hyperparameters=hyperparameters,
        channels=channels, instance_count=instance_count, cpus=cpus,
    )  # fmt: skip
    command = [sys.executable, program, *user_args(hyperparameters)]
    on_line(f"Invoking script with the following command: {' '.join(command[1:])}")

    metrics: dict[str, float] = {}
    tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)

    def show(host: str, line: str) -> None:
        shown = f"[{host}] {line}" if instance_count > 1 else line
        tail.append(shown)
        on_line(shown)
        for name, pattern in patterns.items():
            if match := pattern.search(line):
                with contextlib.suppress(ValueError):
                    metrics[name] = float(match.group(1))

    started = time.monotonic()
    deadline = started + max_runtime_seconds if max_runtime_seconds else None
    lines: queue.Queue = queue.Queue()
    processes, readers, timed_out = [], [], False
    try:
        for env in environments:
            process = subprocess.Popen(
                command, cwd=code_dir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True,
            )  # fmt: skip
            processes.append(process)
            readers.append(threading.Thread(target=_stream, args=(process, env["SM_CURRENT_HOST"], lines), daemon=True))
            readers[-1].start()
        open_logs = len(processes)
        # Until every host has closed its log and exited (a log can end a moment before its process does).
        while open_logs or any(process.poll() is None for process in processes):
            with contextlib.suppress(queue.Empty):
                host, line = lines.get(timeout=0.2)
                if line is None:
                    open_logs -= 1
                else:
                    show(host, line)
            if deadline and time.monotonic() > deadline:
                timed_out = True
                on_line(f"MaxRuntimeInSeconds ({max_runtime_seconds:.0f} s) exceeded: stopping the job")
                break
            if any(process.poll() not in (None, 0) for process in processes):
                break  # a failed host: its peers would wait for it forever
        own_codes = [process.poll() for process in processes]  # before anything was stopped
    finally:
        _stop(processes)  # whatever still runs: peers of a failed host, a job past its time, an interrupted task
    for reader in readers:  # what the processes wrote before they ended (the failing host's last words)
        reader.join(timeout=5)
    while not lines.empty():
        host, line = lines.get()
        if line is not None:
            show(host, line)
    codes = [process.wait() for process in processes]
    failure_file = ml_dir / "output" / "failure"
    return ScriptResult(
        # The host that failed on its own, rather than a peer stopped after it.
        returncode=next((code for code in own_codes if code), None) or next((code for code in codes if code), 0),
        timed_out=timed_out,
        metrics=metrics,
        log_tail=list(tail),
        seconds=time.monotonic() - started,
        failure=failure_file.read_text().strip() if failure_file.is_file() else "",
    )


# -- the training job: S3 in, S3 out ---------------------------------------------------------------------------


def _split(uri: str) -> tuple[str, str]:
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    return S3Hook.parse_s3_url(uri)


def _fetch_sourcedir(s3, uri: str, code_dir: Path) -> None:
    bucket, key = _split(uri)
    body = s3.conn.get_object(Bucket=bucket, Key=key)["Body"].read()
    code_dir.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(body), mode="r:gz") as archive:
        archive.extractall(code_dir, filter="data")  # refuses absolute paths, `..` and links out of code_dir


def _fetch_channel(s3, channel: Mapping, target: Path) -> Path:
    """Download an S3Prefix channel (every object under the prefix) into ``target``, keeping relative paths."""
    source = channel["DataSource"]["S3DataSource"]
    bucket, prefix = _split(source["S3Uri"])
    keys = s3.list_keys(bucket_name=bucket, prefix=prefix) or []
    if not keys:
        raise TrainingJobError(f"channel {channel['ChannelName']}: no objects under {source['S3Uri']}")
    for key in keys:
        relative = key[len(prefix) :].lstrip("/") or Path(key).name
        destination = target / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        s3.conn.download_file(bucket, key, str(destination))
    log.info("Channel %s: %d files from %s", channel["ChannelName"], len(keys), source["S3Uri"])
    return target


def _upload_tree(s3, directory: Path, uri: str) -> str:
    """Pack ``directory`` (entries relative to it, as SageMaker packs /opt/ml/model) and upload it to ``uri``."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for path in sorted(directory.rglob("*")):
            archive.add(path, arcname=path.relative_to(directory).as_posix(), recursive=False)
    body = buffer.getvalue()
    bucket, key = _split(uri)
    s3.conn.put_object(
        Bucket=bucket, Key=key, Body=body, ChecksumSHA256=base64.b64encode(hashlib.sha256(body).digest()).decode()
    )
    return uri


def _describe(request: Mapping, **fields) -> dict:
    """DescribeTrainingJob's answer for a job run here, made JSON-safe as the provider's operator makes it."""
    keys = ("TrainingJobName", "HyperParameters", "AlgorithmSpecification", "RoleArn", "InputDataConfig",
            "OutputDataConfig", "ResourceConfig", "StoppingCondition", "ExperimentConfig")  # fmt: skip
    description = {key: request[key] for key in keys if key in request} | fields
    return json.loads(json.dumps(description, default=repr))  # datetimes as the operator's XCom shows them


def run_training_job(request: Mapping, *, config: PipelineConfig | None = None, concurrent_jobs: int = 1) -> dict:
    """Run a CreateTrainingJob request here; return ``{"Training": <DescribeTrainingJob-shaped dict>}``.

    A rerun of the same job (a task retry) starts from a clean job directory and overwrites the artifacts, as a
    new SageMaker job would. Raises TrainingJobError, with the tail of the log, when the script fails or runs past
    MaxRuntimeInSeconds.
    """
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    config = config or load_config()
    name = request["TrainingJobName"]
    hyperparameters = request["HyperParameters"]
    resources = request["ResourceConfig"]
    ml_dir = Path(config.state_dir) / "training-jobs" / name
    shutil.rmtree(ml_dir, ignore_errors=True)
    s3 = S3Hook(aws_conn_id=config.aws_conn_id, region_name=config.region)
    created = datetime.datetime.now(datetime.UTC)

    _fetch_sourcedir(s3, hyperparameters["sagemaker_submit_directory"], ml_dir / "code")
    channels = {
        channel["ChannelName"]: _fetch_channel(s3, channel, ml_dir / "input" / "data" / channel["ChannelName"])
        for channel in request.get("InputDataConfig", [])
    }
    threads = threads_per_job(config.cpus, concurrent_jobs)
    max_runtime = request.get("StoppingCondition", {}).get("MaxRuntimeInSeconds")
    log.info("Training job %s: %d instance(s), %d thread(s), job directory %s", name, resources["InstanceCount"],
             threads, ml_dir)  # fmt: skip
    started = datetime.datetime.now(datetime.UTC)
    try:
        result = run_script(
            hyperparameters["sagemaker_program"],
            ml_dir / "code",
            hyperparameters,
            ml_dir=ml_dir,
            channels=channels,
            job_name=name,
            instance_count=int(resources["InstanceCount"]),
            cpus=threads,
            max_runtime_seconds=max_runtime,
            metric_definitions=request["AlgorithmSpecification"].get("MetricDefinitions", []),
        )
    finally:
        # The channel copies are the bulk of a job directory and S3 keeps the originals; the rest stays to look at.
        shutil.rmtree(ml_dir / "input" / "data", ignore_errors=True)
    ended = datetime.datetime.now(datetime.UTC)
    if not result.ok:
        reason = (
            f"MaxRuntimeExceeded: the job ran past MaxRuntimeInSeconds={max_runtime}"
            if result.timed_out
            else f"AlgorithmError: {result.failure or f'exit code {result.returncode}'}"
        )
        raise TrainingJobError(
            f"Training job {name} failed: {reason}\nLast {len(result.log_tail)} lines of its log:\n"
            + "\n".join(result.log_tail)
        )

    output = f"{request['OutputDataConfig']['S3OutputPath'].rstrip('/')}/{name}/output"
    model_uri = _upload_tree(s3, ml_dir / "model", f"{output}/model.tar.gz")
    _upload_tree(s3, ml_dir / "output" / "data", f"{output}/output.tar.gz")
    log.info("Training job %s completed in %.0f s; model artifacts: %s", name, result.seconds, model_uri)
    seconds = max(1, round((ended - started).total_seconds()))
    return {
        "Training": _describe(
            request,
            TrainingJobArn=f"arn:aws:sagemaker:{config.region}:000000000000:training-job/{name}",
            TrainingJobStatus="Completed",
            SecondaryStatus="Completed",
            ModelArtifacts={"S3ModelArtifacts": model_uri},
            FinalMetricDataList=[
                {"MetricName": metric, "Value": value, "Timestamp": ended} for metric, value in result.metrics.items()
            ],
            CreationTime=created,
            TrainingStartTime=started,
            TrainingEndTime=ended,
            LastModifiedTime=ended,
            TrainingTimeInSeconds=seconds,
            BillableTimeInSeconds=seconds * int(resources["InstanceCount"]),
            SecondaryStatusTransitions=[
                {"Status": "Downloading", "StartTime": created, "EndTime": started},
                {"Status": "Training", "StartTime": started, "EndTime": ended},
                {"Status": "Uploading", "StartTime": ended, "EndTime": datetime.datetime.now(datetime.UTC)},
            ],
        )
    }
