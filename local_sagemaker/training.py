"""Training jobs, run as SageMaker runs them: CreateTrainingJob, DescribeTrainingJob, ListTrainingJobs,
StopTrainingJob.

A job goes Starting (waiting for free cores, local_sagemaker.cores) → Downloading (``sagemaker_submit_directory``
unpacked into the job's code directory, each S3 channel into ``input/data/<channel>``) → Training (script mode's
entry point, as local_sagemaker.script_mode runs it, or the job's own ContainerEntrypoint and ContainerArguments, as
local_sagemaker.container runs them; one process per instance, each with its /opt/ml, loopback DDP when there are
several) → Uploading (``model.tar.gz`` of the model directory and ``output.tar.gz`` of the output data directory
under ``<S3OutputPath>/<job>/output/``) → Completed; or Failed with a FailureReason, or Stopped (StopTrainingJob, or
MaxRuntimeInSeconds). Each host's log goes to CloudWatch Logs (local_sagemaker.job_logs), group
``/aws/sagemaker/TrainingJobs``, stream ``<job>/algo-<n>-<epoch>``; FinalMetricDataList is the last match of each
MetricDefinitions regex in the log.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import queue
import re
import shlex
import shutil
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from local_sagemaker import aws, container, processes, script_mode
from local_sagemaker.archives import pack
from local_sagemaker.container import host_environments, host_roots
from local_sagemaker.cores import Cores, check_instance_count
from local_sagemaker.job_logs import LogStreams
from local_sagemaker.jobs import JobFailed, JobStopped, check_stop, stop_all
from local_sagemaker.listing import Listing
from local_sagemaker.protocol import ResourceInUse, ValidationException, arn, failure_reason, not_found
from local_sagemaker.roles import Roles, RoleSession
from local_sagemaker.store import Store, now

log = logging.getLogger(__name__)

KIND = "training-jobs"
# CreateTrainingJob's answer for a name in use, in SageMaker's words.
NAME_TAKEN = (
    "Training job names must be unique within an AWS account and region, and "
    "a training job with this name already exists ({arn})"
)
LOG_GROUP = "/aws/sagemaker/TrainingJobs"
LOG_TAIL_LINES = 40
# Mapped Airflow tasks start their jobs within a second or so of each other: a job that finds the machine idle
# waits this long in Starting, so that the sweep's jobs share the cores instead of the first taking them all.
STARTING_SECONDS = 1.0
TERMINAL = ("Completed", "Failed", "Stopped")
# What ListTrainingJobs says of a job.
SUMMARY_KEYS = (
    "TrainingJobName",
    "TrainingJobArn",
    "CreationTime",
    "TrainingEndTime",
    "LastModifiedTime",
    "TrainingJobStatus",
    "SecondaryStatus",
)
LISTING = Listing("TrainingJobSummaries", "TrainingJobName", "TrainingJobStatus", SUMMARY_KEYS)
# What DescribeTrainingJob answers of the request as it was made.
REQUEST_KEYS = (
    "TrainingJobName",
    "HyperParameters",
    "AlgorithmSpecification",
    "RoleArn",
    "InputDataConfig",
    "OutputDataConfig",
    "ResourceConfig",
    "StoppingCondition",
    "ExperimentConfig",
    "Environment",
    "EnableNetworkIsolation",
    "EnableInterContainerTrafficEncryption",
    "EnableManagedSpotTraining",
    "CheckpointConfig",
    "VpcConfig",
    "DebugHookConfig",
    "TensorBoardOutputConfig",
    "RetryStrategy",
)


@dataclasses.dataclass
class _Running:
    """What the service holds of a job while its thread runs it."""

    stop: threading.Event = dataclasses.field(default_factory=threading.Event)
    processes: list = dataclasses.field(default_factory=list)
    records: list = dataclasses.field(default_factory=list)
    thread: threading.Thread | None = None
    # Each match of a MetricDefinitions regex as the log shows it: (job, metric, value). A tuning job's observer.
    on_metric: Callable[[str, str, float], None] | None = None


class TrainingJobs:
    def __init__(
        self,
        store: Store,
        state_dir: Path,
        cpus: int,
        region: str,
        account: str,
        *,
        roles: Roles,
        service_url: str,
        on_change: Callable[[dict], None] | None = None,
    ):
        """``roles``: the execution roles the jobs run as; ``service_url``: where their processes ask for the role's
        credentials."""
        self.store = store
        self.roles, self.service_url = roles, service_url
        self.jobs_dir = Path(state_dir) / "job-dirs"
        self.cores = Cores(cpus)
        self.region, self.account = region, account
        self.on_change = on_change or (lambda record: None)
        self.running: dict[str, _Running] = {}
        self._recover()

    def arn(self, name: str) -> str:
        return arn("training job", name, region=self.region, account=self.account)

    def _recover(self) -> None:
        """A job that was running when the service stopped cannot go on. A crash of the service does not end its
        processes (each runs in a session of its own), and they would hold their cores and write on: the ones its
        record names, and those a crash kept out of the record (a host's own interpreter in the job's code
        directory), are stopped first; then the job ends, Failed saying so (Stopped if a stop had been asked)."""
        interrupted = [job for job in self.store.items(KIND) if job["TrainingJobStatus"] in ("InProgress", "Stopping")]
        if not interrupted:
            return
        in_job_dirs = running_hosts(self.jobs_dir)  # recorded or not
        found = {}
        for record in interrupted:
            name = record["TrainingJobName"]
            job_dir = str((self.jobs_dir / name).resolve())
            found[name] = [
                *record.get("Local", {}).get("processes", []),
                *(p for p in in_job_dirs if p["cwd"] == job_dir or p["cwd"].startswith(job_dir + os.sep)),
            ]
        survivors = {name: sorted({p["pid"] for p in records if processes.live(p)}) for name, records in found.items()}
        processes.stop([p for records in found.values() for p in records], grace=processes.JOB_STOP_GRACE_SECONDS)
        for record in interrupted:
            name = record["TrainingJobName"]
            _drop_channels(self.jobs_dir / name)  # as a job that ends does
            if pids := survivors[name]:
                log.warning("Training job %s: stopped its processes %s, which outlived the service", name, pids)
                what = f"its training processes still running (pids {', '.join(map(str, pids))}) were stopped"
            else:
                what = "none of its training processes was running any more"
            if record["TrainingJobStatus"] == "Stopping":  # as asked, if not by the job's own thread
                self._finish(name, "Stopped", "Stopped")
            else:
                self._finish(
                    name,
                    "Failed",
                    "Failed",
                    f"InternalServerError: the local SageMaker service restarted while the job ran; {what}",
                )

    # -- the API ---------------------------------------------------------------------------------------------------

    def create(
        self,
        request: dict,
        *,
        tuning_job_arn: str | None = None,
        on_metric: Callable[[str, str, float], None] | None = None,
    ) -> dict:
        """CreateTrainingJob; a tuning job's jobs also name it (``tuning_job_arn``, DescribeTrainingJob's
        TuningJobArn) and have their metrics observed as they are logged (``on_metric``)."""
        name = request["TrainingJobName"]
        script_mode.check_code(request["AlgorithmSpecification"], request.get("HyperParameters", {}))
        check_instance_count(request["ResourceConfig"])
        self.roles.check(request["RoleArn"], self.arn(name))
        created = now()
        record = {
            **{key: request[key] for key in REQUEST_KEYS if key in request},
            "TrainingJobArn": self.arn(name),
            "TrainingJobStatus": "InProgress",
            "SecondaryStatus": "Starting",
            # Where the model will be: DescribeTrainingJob always answers it (the model requires the member).
            "ModelArtifacts": {
                "S3ModelArtifacts": f"{request['OutputDataConfig']['S3OutputPath'].rstrip('/')}/"
                f"{name}/output/model.tar.gz"
            },
            "CreationTime": created,
            "LastModifiedTime": created,
            "SecondaryStatusTransitions": [
                {
                    "Status": "Starting",
                    "StartTime": created,
                    "StatusMessage": "Preparing the instances for training",
                }
            ],
            "Tags": request.get("Tags", []),
        }
        if tuning_job_arn:
            record["TuningJobArn"] = tuning_job_arn
        self.store.put_new(KIND, name, record, ResourceInUse(NAME_TAKEN.format(arn=self.arn(name))))
        running = self.running[name] = _Running(on_metric=on_metric)
        running.thread = threading.Thread(target=self._run, args=(name,), name=f"training-job-{name}", daemon=True)
        running.thread.start()
        self.on_change(record)
        return {"TrainingJobArn": record["TrainingJobArn"]}

    def describe(self, name: str) -> dict:
        record = self.store.require(KIND, name, not_found("training job", name))
        record.pop("Tags", None)
        record.pop("Local", None)
        return record

    def list(self, params: dict) -> dict:
        return LISTING.answer(self.store.items(KIND), params)

    def stop(self, name: str) -> dict:
        record = self.describe(name)
        if record["TrainingJobStatus"] != "InProgress":
            raise ValidationException(
                f"The request was rejected because the training job is in status {record['TrainingJobStatus']}."
            )
        self._transition(name, "Stopping", status="Stopping")
        if running := self.running.get(name):
            running.stop.set()
        return {}

    def shutdown(self) -> None:
        """Stop every running job (the service is going away, and its jobs with it)."""
        stop_all(self.running.values(), timeout=processes.JOB_STOP_GRACE_SECONDS + 5)

    # -- running a job ---------------------------------------------------------------------------------------------

    def _transition(self, name: str, secondary: str, message: str = "", status: str | None = None, **fields) -> dict:
        with self.store.lock:
            record = self.store.get(KIND, name)
            moment = now()
            transitions = record["SecondaryStatusTransitions"]
            if transitions and "EndTime" not in transitions[-1]:
                transitions[-1]["EndTime"] = moment
            if secondary not in TERMINAL or not transitions or transitions[-1]["Status"] != secondary:
                entry = {"Status": secondary, "StartTime": moment, "StatusMessage": message or secondary}
                if secondary in TERMINAL:
                    entry["EndTime"] = moment
                transitions.append(entry)
            record.update(SecondaryStatus=secondary, LastModifiedTime=moment, **fields)
            if status:
                record["TrainingJobStatus"] = status
            self.store.put(KIND, name, record)
        self.on_change(record)
        return record

    def _finish(self, name: str, status: str, secondary: str, reason: str | None = None, **fields) -> None:
        record = self.store.get(KIND, name)
        ended = now()
        if started := record.get("TrainingStartTime"):
            seconds = max(1, round((ended - started).total_seconds()))
            count = int(record["ResourceConfig"]["InstanceCount"])
            fields.update(TrainingTimeInSeconds=seconds, BillableTimeInSeconds=seconds * count)
        if reason:
            fields["FailureReason"] = failure_reason(reason)
        message = {"Completed": "Training job completed", "Failed": reason or "Training job failed"}
        self._transition(
            name,
            secondary,
            message.get(status, reason or "Training job stopped"),
            status=status,
            TrainingEndTime=ended,
            **fields,
        )
        log.info("Training job %s: %s%s", name, status, f" ({reason})" if reason else "")

    def _run(self, name: str) -> None:
        running = self.running[name]
        record = self.store.get(KIND, name)
        ml_dir = self.jobs_dir / name
        cores = 0
        self.cores.join(name)  # queued from the start: the jobs created with it count for its share
        try:
            shutil.rmtree(ml_dir, ignore_errors=True)
            running.stop.wait(STARTING_SECONDS)
            count = int(record["ResourceConfig"]["InstanceCount"])
            cores = self.cores.acquire(name, count, running.stop)
            if cores is None:
                raise JobStopped()
            self._transition(name, "Downloading", "Downloading input data")
            try:
                role = self.roles.session(record["RoleArn"], record["TrainingJobArn"])
            except ValidationException as error:  # its role cannot be assumed any more
                raise JobFailed(f"ClientError: {error.message}") from None
            s3 = role.client("s3")
            command = container.command(record["AlgorithmSpecification"])
            if command is None:  # script mode: the toolkit unpacks the sourcedir into /opt/ml/code
                script_mode.unpack_code(s3, record["HyperParameters"], ml_dir / "code")
            channels = [channel["ChannelName"] for channel in record.get("InputDataConfig", [])]
            for channel in record.get("InputDataConfig", []):
                self._download_channel(s3, channel, ml_dir / "input" / "data" / channel["ChannelName"])
            check_stop(running.stop)
            self._transition(
                name, "Training", "Training image download completed. Training in progress.", TrainingStartTime=now()
            )
            metrics = self._train(record, ml_dir, command, channels, count, cores, running, role)
            self._transition(name, "Uploading", "Uploading generated training model")
            output = f"{record['OutputDataConfig']['S3OutputPath'].rstrip('/')}/{name}/output"
            aws.put_verified(s3, *aws.split_s3_uri(f"{output}/model.tar.gz"), pack(ml_dir / "model"))
            aws.put_verified(s3, *aws.split_s3_uri(f"{output}/output.tar.gz"), pack(ml_dir / "output" / "data"))
            moment = now()
            self._finish(
                name,
                "Completed",
                "Completed",
                FinalMetricDataList=[{"MetricName": k, "Value": v, "Timestamp": moment} for k, v in metrics.items()],
            )
        except JobStopped as stopped:
            self._finish(name, "Stopped", stopped.secondary, stopped.reason)
        except JobFailed as failed:
            self._finish(name, "Failed", "Failed", str(failed))
        except Exception as error:  # a bug or an unreachable S3: the job fails, saying what happened
            log.exception("Training job %s failed", name)
            self._finish(name, "Failed", "Failed", f"InternalServerError: {type(error).__name__}: {error}")
        finally:
            self.cores.leave(name)  # a job stopped or failed before it got its cores
            if cores:
                self.cores.release(cores)
            _drop_channels(ml_dir)
            self.running.pop(name, None)

    @staticmethod
    def _download_channel(s3, channel: Mapping, target: Path) -> Path:
        """Every object under an S3Prefix channel's prefix, into ``target``, keeping relative paths.

        A prefix with a manifest (SHA256SUMS) yields only the files it lists, each checked against its SHA-256, and
        the manifest itself checked against the SHA-256 the prefix is named by, if it is: nothing planted beside a
        dataset, or in place of one of its files, reaches the training script.
        """
        source = channel["DataSource"].get("S3DataSource")
        name = channel["ChannelName"]
        if source is None:
            raise JobFailed(f"ClientError: channel {name}: only S3DataSource channels run here")
        bucket, prefix = aws.split_s3_uri(source["S3Uri"])
        keys = [
            item["Key"]
            for part in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            for item in part.get("Contents", [])
        ]
        if source.get("S3DataType", "S3Prefix") == "S3Prefix" and not keys:
            raise JobFailed(f"ClientError: channel {name}: no objects under {source['S3Uri']}")
        try:
            relative = {key: aws.safe_relative(key, prefix) for key in keys}
            listed = None
            manifest = next((key for key, path in relative.items() if str(path) == aws.MANIFEST), None)
            if manifest is not None:
                body = s3.get_object(Bucket=bucket, Key=manifest)["Body"].read()
                if address := aws.content_address(source["S3Uri"]):
                    aws.check_digest(body, address, f"the manifest s3://{bucket}/{manifest}")
                listed = aws.read_manifest(body, f"s3://{bucket}/{manifest}")
                missing = sorted(set(listed) - {str(path) for path in relative.values()})
                if missing:
                    raise ValueError(f"the manifest lists {', '.join(missing)}, not under {source['S3Uri']}")
        except ValueError as error:
            raise JobFailed(f"ClientError: channel {name}: {error}: refused") from None
        target.mkdir(parents=True, exist_ok=True)
        for key, path in relative.items():
            if listed is not None and str(path) not in listed and key != manifest:
                log.warning("Channel %s: s3://%s/%s is not in the manifest: not downloaded", name, bucket, key)
                continue
            destination = target / path
            destination.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, key, str(destination))
            if listed is not None and key != manifest:
                try:
                    aws.check_digest(destination.read_bytes(), listed[str(path)], f"s3://{bucket}/{key}")
                except ValueError as error:
                    destination.unlink()
                    raise JobFailed(f"ClientError: channel {name}: {error}: refused") from None
        log.info(
            "Channel %s: %d files from %s%s",
            name,
            len(list(target.rglob("*"))),
            source["S3Uri"],
            ", each checked against its manifest" if listed is not None else "",
        )
        return target

    def _train(
        self,
        record: dict,
        ml_dir: Path,
        command: container.Command | None,
        channels: list[str],
        count: int,
        cores: int,
        running: _Running,
        role: RoleSession,
    ) -> dict:
        """Run the job's code on ``count`` hosts (``command``: the container's; None: script mode's entry point);
        the final metrics, or JobFailed / JobStopped."""
        name = record["TrainingJobName"]
        hyperparameters = record.get("HyperParameters", {})  # a container's command may have none
        roots = host_roots(ml_dir.resolve(), count)
        if command is not None and not container.PLAIN.fullmatch(str(roots[0])):
            raise JobFailed(
                f"InternalServerError: the job's directory {roots[0]} holds characters a shell would "
                "split or expand, so it cannot stand for /opt/ml in the container's command"
            )
        container.lay_out(record, roots, channels, command)
        definitions = record["AlgorithmSpecification"].get("MetricDefinitions", [])
        patterns = {definition["Name"]: re.compile(definition["Regex"]) for definition in definitions}
        program = script_mode.program(hyperparameters) if command is None else None
        aws_environment = {
            **aws.endpoint_environment(),
            **self.roles.process_environment(role.role_arn, role.source_arn, self.service_url),
        }
        environments = host_environments(
            job_name=name,
            job_arn=record["TrainingJobArn"],
            roots=roots,
            program=program,
            hyperparameters=hyperparameters,
            channels=channels,
            cpus=cores,
            region=self.region,
            aws=aws_environment,
            environment=record.get("Environment"),
        )
        hosts = [env["SM_CURRENT_HOST"] for env in environments]
        streams = LogStreams(name, hosts, role.client("logs"), LOG_GROUP)
        if command is None:
            commands = [script_mode.argv(program, hyperparameters)] * count
            workdirs = [root / "code" for root in roots]
        else:
            commands = [command.argv_for(root) for root in roots]
            workdirs = roots
        metrics: dict[str, float] = {}
        tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
        disk_log = open(ml_dir / "logs" / "job.log", "a")  # noqa: SIM115 - closed in finally

        def show(host: str, line: str) -> None:
            shown = f"[{host}] {line}" if count > 1 else line
            tail.append(shown)
            disk_log.write(shown + "\n")
            streams.add(host, line)
            for metric, pattern in patterns.items():
                if match := pattern.search(line):
                    with contextlib.suppress(ValueError, IndexError):
                        metrics[metric] = float(match.group(1))
                        if running.on_metric:
                            running.on_metric(name, metric, metrics[metric])

        if command is None:
            show(hosts[0], f"Invoking script with the following command: {shlex.join(commands[0][1:])}")
        else:
            show(hosts[0], f"Running the container's command: {shlex.join(command.argv)}")
        max_runtime = record.get("StoppingCondition", {}).get("MaxRuntimeInSeconds")
        deadline = time.monotonic() + max_runtime if max_runtime else None
        lines: queue.Queue = queue.Queue()
        outcome: JobStopped | JobFailed | None = None
        try:
            if program is not None:
                script_mode.check_entry_point(ml_dir / "code", program)
            for env, argv, workdir in zip(environments, commands, workdirs, strict=True):
                process, started = processes.spawn(argv, env=env, cwd=workdir, stdout=-1)
                running.processes.append(process)
                running.records.append(started)
                # In the job's record at once: a service that crashes from here on finds it and stops it at its start.
                self.store.update(KIND, name, Local={"processes": running.records})
                reader = threading.Thread(target=_stream, args=(process, env["SM_CURRENT_HOST"], lines), daemon=True)
                reader.start()
            open_logs = len(running.processes)
            # Until every host has closed its log and exited (a log can end a moment before its process does).
            while open_logs or any(p.poll() is None for p in running.processes):
                with contextlib.suppress(queue.Empty):
                    host, line = lines.get(timeout=0.2)
                    if line is None:
                        open_logs -= 1
                    else:
                        show(host, line)
                streams.flush()
                if running.stop.is_set():
                    outcome = JobStopped()
                    break
                if deadline and time.monotonic() > deadline:
                    show(hosts[0], f"MaxRuntimeInSeconds ({max_runtime} s) exceeded: stopping the job")
                    outcome = JobStopped(
                        "MaxRuntimeExceeded", f"MaxRuntimeExceeded: the job ran past MaxRuntimeInSeconds={max_runtime}"
                    )
                    break
                if any(p.poll() not in (None, 0) for p in running.processes):
                    break  # a failed host: its peers would wait for it forever
            own_codes = [p.poll() for p in running.processes]  # before anything was stopped
        finally:
            processes.stop(running.records, grace=processes.JOB_STOP_GRACE_SECONDS)
            for process in running.processes:
                process.wait()
            deadline_drain = time.monotonic() + 5
            while time.monotonic() < deadline_drain:  # what the processes wrote before they ended
                try:
                    host, line = lines.get(timeout=0.1)
                except queue.Empty:
                    break
                if line is not None:
                    show(host, line)
            streams.flush(force=True)
            disk_log.close()
            self.roles.forget(aws_environment)
        if outcome:
            raise outcome
        failed = next((index for index, code in enumerate(own_codes) if code), None)
        if failed is not None:
            code = own_codes[failed]
            failure_file = roots[failed] / "output" / "failure"
            failure = failure_file.read_text().strip() if failure_file.is_file() else f"exit code {code}"
            raise JobFailed(f"AlgorithmError: {failure}\nLast {len(tail)} lines of the log:\n" + "\n".join(tail))
        return metrics


def _drop_channels(ml_dir: Path) -> None:
    """The channel copies are the bulk of a job's directory and S3 keeps the originals; the rest stays."""
    for root in (ml_dir, *sorted((ml_dir / "hosts").glob("algo-*"))):
        shutil.rmtree(root / "input" / "data", ignore_errors=True)


def running_hosts(jobs_dir: Path) -> list[dict]:
    """Records (each with its ``cwd``) of the processes working in a training job's directory under ``jobs_dir``,
    recorded or not: what a service that was killed left running. A host runs in its job's directory (script mode's
    entry point in its code, a container's command in its /opt/ml), started as the service's Python or as a
    container's shell, whose scripts find python3 first on PATH, beside the service's interpreter."""
    python = Path(sys.executable)
    executables = [str(python), str(python.with_name("python3")), str(python.with_name("python"))]
    executables += [path for path in map(shutil.which, container.SHELLS) if path]
    return [p for executable in dict.fromkeys(executables) for p in processes.running_in(jobs_dir, executable)]


def _stream(process, host: str, lines: queue.Queue) -> None:
    for line in process.stdout:
        lines.put((host, line.rstrip("\n")))
    lines.put((host, None))  # this host's log ended
