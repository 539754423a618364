"""Batch transform: CreateTransformJob, DescribeTransformJob, ListTransformJobs, StopTransformJob.

A job runs as SageMaker Batch Transform runs one. Its inputs (every object under an S3Prefix, or those a
ManifestFile lists) are downloaded first; its model is served by model servers (local_sagemaker.model_servers:
``python -m inference.serve`` running the artifact's own handlers), one per instance of TransformResources up to
the machine's cores, which they share; each object goes to one instance. An object is one record (SplitType None)
or one per line (Line), sent one record per request (SingleRecord) or as many as fit in MaxPayloadInMB, joined by
newlines (MultiRecord), with the job's ContentType and Accept, at most MaxConcurrentTransforms requests in flight
per instance. Each object whose records all succeeded gets ``<S3OutputPath>/<its name under the prefix>.out``: the
answers in order, each followed by a newline (AssembleWith Line) or not (None). A record the model refuses, or one
larger than MaxPayloadInMB, fails its object (no .out) and the job, with a FailureReason that names the object, the
line and the model's message; the other objects still get theirs, as on SageMaker. A stopped job writes nothing
more. The model servers are stopped whatever happens, before the job's status says it has ended. How the records
become requests and answers is local_sagemaker/transform_requests.py's part; this module runs the jobs.

The job's log goes to CloudWatch Logs, group ``/aws/sagemaker/TransformJobs``, a stream per instance
``<job>/<instance id>-<epoch>`` (with the model server's own log at its end), and its first stream ends with the
job's figures: records, images (the predictions the model answered, where its answers are SageMaker's JSON
``{"predictions": [...]}``), the seconds of the transform phase (first request sent to last answer received: no
server start, no S3 transfer) and the seconds end to end.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import secrets
import shutil
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from botocore.exceptions import ClientError

from local_sagemaker import aws, model_servers, processes
from local_sagemaker.job_logs import LogStreams
from local_sagemaker.jobs import JobFailed, JobStopped, check_stop, stop_all
from local_sagemaker.listing import Listing
from local_sagemaker.model_servers import LaunchFailed
from local_sagemaker.models import Models
from local_sagemaker.protocol import ResourceInUse, ValidationException, arn, failure_reason
from local_sagemaker.roles import Roles, RoleSession
from local_sagemaker.store import Store, now
from local_sagemaker.transform_requests import MB, InputObject, Plan, send_requests

log = logging.getLogger(__name__)

KIND = "transform-jobs"
# CreateTransformJob's answer for a name in use, in SageMaker's words.
NAME_TAKEN = "Job name must be unique within an AWS account and region, and a job with this name already exists ({arn})"
LOG_GROUP = "/aws/sagemaker/TransformJobs"
# SageMaker's defaults where neither the request nor the container's GET /execution-parameters sets them.
DEFAULTS = {"MaxConcurrentTransforms": 1, "MaxPayloadInMB": 6, "BatchStrategy": "MultiRecord"}
MAX_PAYLOAD_MB = 100  # SageMaker's bound on MaxPayloadInMB, and on it times MaxConcurrentTransforms
INVOCATION_TIMEOUT, INVOCATION_RETRIES = 600, 3  # ModelClientConfig's defaults
# DataProcessing that leaves the records and answers as they are: the only kind run here.
PASS_THROUGH = {"InputFilter": "$", "OutputFilter": "$", "JoinSource": "None"}
S3_THREADS = 8  # the objects of a job move in parallel: S3 answers each request in milliseconds
SETTLE_SECONDS = 30.0  # the most a started server's workers may take to finish loading the model
SERVICE_STOPPED = "InternalServerError: the local SageMaker service stopped while the job ran"
# What ListTransformJobs says of a job.
SUMMARY_KEYS = (
    "TransformJobName",
    "TransformJobArn",
    "CreationTime",
    "TransformEndTime",
    "LastModifiedTime",
    "TransformJobStatus",
    "FailureReason",
)
LISTING = Listing(
    "TransformJobSummaries", "TransformJobName", "TransformJobStatus", SUMMARY_KEYS, default_order="Descending"
)
# What DescribeTransformJob answers of the request as it was made.
REQUEST_KEYS = (
    "TransformJobName",
    "ModelName",
    "MaxConcurrentTransforms",
    "ModelClientConfig",
    "MaxPayloadInMB",
    "BatchStrategy",
    "Environment",
    "TransformInput",
    "TransformOutput",
    "TransformResources",
    "DataProcessing",
    "ExperimentConfig",
)


@dataclasses.dataclass
class _Running:
    """What the service holds of a job while its thread runs it."""

    stop: threading.Event = dataclasses.field(default_factory=threading.Event)
    servers: list = dataclasses.field(default_factory=list)
    environments: list = dataclasses.field(default_factory=list)  # its servers' ways to their role's credentials
    shutdown: bool = False  # stopped by the service's own stop, not by StopTransformJob
    thread: threading.Thread | None = None


class TransformJobs:
    def __init__(
        self,
        store: Store,
        models: Models,
        state_dir: Path,
        *,
        cpus: int,
        region: str,
        account: str,
        roles: Roles,
        service_url: str,
    ):
        """``roles``: the execution roles the jobs run as (their models'); ``service_url``: where their model servers
        ask for the role's credentials."""
        self.store, self.models = store, models
        self.roles, self.service_url = roles, service_url
        self.jobs_dir = Path(state_dir).resolve() / "transform-job-dirs"
        self.cpus = max(1, cpus)
        self.region, self.account = region, account
        self.running: dict[str, _Running] = {}
        self._recover()

    def arn(self, name: str) -> str:
        return arn("transform-job", name, region=self.region, account=self.account)

    def _recover(self) -> None:
        """A job that was running when the service stopped cannot go on. A killed service leaves its model servers
        running: the ones its record names, and any under the jobs' directories (started, not yet recorded), are
        stopped before the job ends."""
        records = self.store.items(KIND)
        interrupted = [record for record in records if record["TransformJobStatus"] in ("InProgress", "Stopping")]
        recorded = [server for record in interrupted for server in record.get("Local", {}).get("servers", [])]
        strays = processes.running_with("inference.serve", self.jobs_dir)
        if alive := {server["pid"] for server in recorded + strays if processes.live(server)}:
            log.warning("Stopping %d model servers of transform jobs that no longer run", len(alive))
        processes.stop(recorded + strays, grace=processes.IDLE_STOP_GRACE_SECONDS)
        for record in records:
            name = record["TransformJobName"]
            if record["TransformJobStatus"] == "InProgress":
                self._finish(name, "Failed", SERVICE_STOPPED)
            elif record["TransformJobStatus"] == "Stopping":
                self._finish(name, "Stopped")
            shutil.rmtree(self.jobs_dir / name / "input", ignore_errors=True)

    # -- the API ---------------------------------------------------------------------------------------------------

    def create(self, request: dict) -> dict:
        name = request["TransformJobName"]
        self.models.model(request["ModelName"])
        self._check(request)
        created = now()
        record = {
            **{key: request[key] for key in REQUEST_KEYS if key in request},
            "TransformJobArn": self.arn(name),
            "TransformJobStatus": "InProgress",
            "CreationTime": created,
            "LastModifiedTime": created,
            "Tags": request.get("Tags", []),
        }
        self.store.put_new(KIND, name, record, ResourceInUse(NAME_TAKEN.format(arn=self.arn(name))))
        running = self.running[name] = _Running()
        running.thread = threading.Thread(target=self._run, args=(name,), name=f"transform-job-{name}", daemon=True)
        running.thread.start()
        return {"TransformJobArn": record["TransformJobArn"]}

    @staticmethod
    def _check(request: dict) -> None:
        """What this service cannot run as asked, refused up front rather than ignored."""
        source = request["TransformInput"]["DataSource"]["S3DataSource"]
        if source["S3DataType"] not in ("S3Prefix", "ManifestFile"):
            raise ValidationException(
                f"S3DataType {source['S3DataType']} is not supported by this local service: "
                "use S3Prefix or ManifestFile"
            )
        split = request["TransformInput"].get("SplitType", "None")
        if split not in ("None", "Line"):
            raise ValidationException(f"SplitType {split} is not supported by this local service: use None or Line")
        for uri in (source["S3Uri"], request["TransformOutput"]["S3OutputPath"]):
            if not uri.startswith("s3://") or not uri[5:].split("/")[0]:
                raise ValidationException(f"{uri!r} is not an s3://bucket/prefix URI")
        payload, concurrency = request.get("MaxPayloadInMB"), request.get("MaxConcurrentTransforms") or 0
        if payload is not None and payload > MAX_PAYLOAD_MB:
            raise ValidationException(f"MaxPayloadInMB {payload} is over the maximum of {MAX_PAYLOAD_MB} MB")
        if payload and concurrency and payload * concurrency > MAX_PAYLOAD_MB:
            raise ValidationException(
                f"MaxConcurrentTransforms * MaxPayloadInMB ({concurrency} * {payload}) is "
                f"over the maximum of {MAX_PAYLOAD_MB} MB"
            )
        # Sent as HTTP headers: Latin-1 without control characters (nothing that could end a header early).
        for key, value in (
            ("ContentType", request["TransformInput"].get("ContentType", "")),
            ("Accept", request["TransformOutput"].get("Accept", "")),
        ):
            if any(not 32 <= ord(character) <= 255 or character == "\x7f" for character in value):
                raise ValidationException(f"{key} {value!r} is not a valid HTTP header value")
        processing = request.get("DataProcessing") or {}
        if any(processing.get(key, value) != value for key, value in PASS_THROUGH.items()):
            raise ValidationException(
                "DataProcessing filters and JoinSource are not supported by this local "
                "service: leave them at $, $ and None"
            )
        if request.get("DataCaptureConfig"):
            raise ValidationException("DataCaptureConfig is not supported by this local service")

    def _record(self, name: str) -> dict:
        return self.store.require(KIND, name, ValidationException(f"Could not find requested job with name {name}"))

    def describe(self, name: str) -> dict:
        record = self._record(name)
        for key in ("Tags", "LastModifiedTime", "Local"):  # kept for ListTags, ListTransformJobs and a restart
            record.pop(key, None)
        return record

    def list(self, params: dict) -> dict:
        return LISTING.answer(self.store.items(KIND), params)

    def stop(self, name: str) -> dict:
        with self.store.lock:
            status = self._record(name)["TransformJobStatus"]
            if status == "Stopping":
                return {}
            if status != "InProgress":
                raise ValidationException(f"The request was rejected because the transform job is in status {status}.")
            self._set(name, TransformJobStatus="Stopping")
        if running := self.running.get(name):
            running.stop.set()
        else:  # no thread runs it (it cannot be resumed): stopped as it is
            self._finish(name, "Stopped")
        return {}

    def shutdown(self) -> None:
        """Stop every running job (the service is going away, and its model servers with it)."""
        for running in list(self.running.values()):
            running.shutdown = True
        stop_all(self.running.values(), timeout=30)

    # -- running a job ---------------------------------------------------------------------------------------------

    def _set(self, name: str, **fields) -> None:
        self.store.update(KIND, name, LastModifiedTime=now(), **fields)

    def _finish(self, name: str, status: str, reason: str | None = None) -> None:
        fields = {"TransformJobStatus": status, "TransformEndTime": now()}
        if reason:
            fields["FailureReason"] = failure_reason(reason)
        self._set(name, **fields)
        log.info("Transform job %s: %s%s", name, status, f" ({reason})" if reason else "")

    def _run(self, name: str) -> None:
        running = self.running[name]
        started = time.monotonic()
        record = self._record(name)
        work = self.jobs_dir / name
        shutil.rmtree(work, ignore_errors=True)
        # The local instances: one model server each, the cores shared among them; more than the cores would only
        # take turns on them.
        count = min(int(record["TransformResources"]["InstanceCount"]), self.cpus)
        instances = [f"i-{secrets.token_hex(9)[:17]}" for _ in range(count)]
        try:
            model = self.models.model(record["ModelName"])
            role = self.roles.session(model["ExecutionRoleArn"], record["TransformJobArn"])
        except ValidationException as error:  # the model is gone, or its role cannot be assumed any more
            self._finish(name, "Failed", f"ClientError: {error.message}")
            self.running.pop(name, None)
            return
        s3 = role.client("s3")
        streams = LogStreams(name, instances, role.client("logs"), LOG_GROUP)

        def say(line: str, instance: str = instances[0]) -> None:
            streams.add(instance, line)

        self._set(name, TransformStartTime=now())
        status, reason = "Failed", None
        try:
            objects = self._download(s3, record, work / "input", running, say)
            plan, urls = self._start_servers(name, record, work, instances, running, say, role)
            for index, instance in enumerate(instances):
                say(f"Transforming {len(objects[index :: len(instances)])} objects", instance)
            streams.flush(force=True)  # the log shows the phase has begun
            figures = send_requests(running.stop, urls, objects, plan)
            failed = [obj for obj in objects if not obj.succeeded]
            self._upload(s3, record, [obj for obj in objects if obj.succeeded], running, say)
            images = self._images([obj for obj in objects if obj.succeeded])
            seconds = figures["transform_seconds"]
            figures = {
                "objects": len(objects),
                "failed_objects": len(failed),
                "records": sum(obj.records for obj in objects if obj.succeeded),
                "images": images,
                **figures,
                "images_per_second": round(images / seconds) if images and seconds else None,
                "end_to_end_seconds": round(time.monotonic() - started, 3),
            }
            say(f"Figures: {json.dumps(figures)}")
            if failed:
                kind = "ClientError" if all(obj.client_error for obj in failed) else "AlgorithmError"
                raise JobFailed(
                    f"{kind}: {len(failed)} of {len(objects)} objects failed: "
                    + "; ".join(obj.failure or f"{obj.uri}: not transformed" for obj in failed)
                )
            status = "Completed"
        except JobStopped:
            say("Stopped" + (": the local SageMaker service is stopping" if running.shutdown else ""))
            status, reason = ("Failed", SERVICE_STOPPED) if running.shutdown else ("Stopped", None)
        except JobFailed as failed:
            say(f"Failed: {failed}")
            reason = str(failed)
        except Exception as error:  # a bug or an unreachable S3: the job fails, saying what happened
            log.exception("Transform job %s failed", name)
            reason = f"InternalServerError: {type(error).__name__}: {error}"
            say(f"Failed: {reason}")
        finally:
            # Done only once nothing of it runs and its log is written: whoever waits for the status may rely on it.
            processes.stop(running.servers, grace=processes.IDLE_STOP_GRACE_SECONDS)
            for environment in running.environments:
                self.roles.forget(environment)
            for instance in instances:  # the container's own log, as SageMaker shows it in the instance's stream
                for line in processes.log_tail(work / "logs" / f"{instance}.log", 200).splitlines():
                    streams.add(instance, line)
            streams.flush(force=True)
            shutil.rmtree(work / "input", ignore_errors=True)  # S3 keeps the originals
            self._finish(name, status, reason)
            self.running.pop(name, None)

    @staticmethod
    def _inputs(s3, record: dict) -> list[tuple[str, str, str]]:
        """(bucket, key, name) of each input object, ``name`` its key relative to the prefix."""
        source = record["TransformInput"]["DataSource"]["S3DataSource"]
        uri = source["S3Uri"]
        try:
            if source["S3DataType"] == "ManifestFile":
                bucket, key = aws.split_s3_uri(uri)
                body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
                prefix_uri, listed = _manifest(body, uri)
                bucket, prefix = aws.split_s3_uri(prefix_uri)
                keys = [prefix + entry for entry in listed]
            else:
                bucket, prefix = aws.split_s3_uri(uri)
                keys = [
                    item["Key"]
                    for part in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
                    for item in part.get("Contents", [])
                    if not item["Key"].endswith("/")  # a folder's marker, no object of data
                ]
            inputs = [(bucket, key, aws.safe_relative(key, prefix).as_posix()) for key in keys]
        except (ValueError, ClientError) as error:
            raise JobFailed(f"ClientError: cannot read the input {uri}: {error}") from None
        if not inputs:
            raise JobFailed(f"ClientError: no objects to transform under {uri}")
        return inputs

    def _download(self, s3, record: dict, directory: Path, running: _Running, say) -> list[InputObject]:
        inputs = self._inputs(s3, record)
        directory.mkdir(parents=True, exist_ok=True)

        def fetch(index: int) -> InputObject:
            check_stop(running.stop)
            bucket, key, name = inputs[index]
            path = directory / str(index)  # by number: names under the prefix need no folders here
            try:
                path.write_bytes(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
            except ClientError as error:
                raise JobFailed(f"ClientError: cannot read the input s3://{bucket}/{key}: {error}") from None
            return InputObject(f"s3://{bucket}/{key}", name, path)

        began = time.monotonic()
        with ThreadPoolExecutor(S3_THREADS, thread_name_prefix="transform-s3") as pool:
            objects = list(pool.map(fetch, range(len(inputs))))
        size = sum(obj.path.stat().st_size for obj in objects)
        say(f"Downloaded {len(objects)} objects ({size} bytes) in {time.monotonic() - began:.2f} s")
        return objects

    def _start_servers(
        self, name: str, record: dict, work: Path, instances: list[str], running: _Running, say, role: RoleSession
    ) -> tuple[Plan, list[str]]:
        """One model server per instance, started together; the plan of the requests, with the defaults settled
        (and written into the record, as SageMaker shows what ran)."""
        model = self.models.model(record["ModelName"])
        container = model.get("PrimaryContainer") or model["Containers"][0]
        try:
            model_dir = model_servers.model_dir(work / "model", container["ModelDataUrl"], role.client("s3"))
        except LaunchFailed as error:
            raise JobFailed(f"ClientError: {error}") from None
        check_stop(running.stop)
        environment = {**container.get("Environment", {}), **record.get("Environment", {})}
        workers = max(1, self.cpus // len(instances))
        aws_environment = {
            **aws.endpoint_environment(),
            **self.roles.process_environment(role.role_arn, role.source_arn, self.service_url),
        }
        running.environments.append(aws_environment)
        with ThreadPoolExecutor(len(instances), thread_name_prefix="transform-server") as pool:
            futures = [
                pool.submit(
                    model_servers.start,
                    model_dir,
                    name=name,
                    variant=instance,
                    workers=workers,
                    metrics_interval=None,
                    environment=environment,
                    aws_environment=aws_environment,
                    log_path=work / "logs" / f"{instance}.log",
                    stopping=running.stop,
                )
                for instance in instances
            ]
        urls, errors = [], []
        for future in futures:
            try:
                server, url = future.result()
                running.servers.append(server)  # stopped when the job ends, however it ends
                urls.append(url)
            except Exception as error:
                errors.append(error)
        # In the job's record: a service that crashes from here on stops them at its next start.
        self.store.update(KIND, name, Local={"servers": running.servers})
        check_stop(running.stop)
        if errors:
            if isinstance(errors[0], LaunchFailed):
                raise JobFailed(f"AlgorithmError: {errors[0]}")
            raise errors[0]
        # A server answers once one of its workers listens; the phase starts once all of them have loaded the model
        # (one still loading takes a core from those that answer).
        for server in running.servers:
            processes.wait_idle(server, timeout=SETTLE_SECONDS)
        for instance, url in zip(instances, urls, strict=True):
            say(f"Instance {instance}: model server {url} with {workers} worker(s) is up", instance)
        settled = {**DEFAULTS, **_execution_parameters(urls[0])}
        settled.update({key: record[key] for key in DEFAULTS if record.get(key)})
        if "MaxPayloadInMB" in record:  # 0 is a choice (no limit), not an absence
            settled["MaxPayloadInMB"] = record["MaxPayloadInMB"]
        self._set(name, **settled)
        transform_input, output = record["TransformInput"], record["TransformOutput"]
        headers = ["POST /invocations HTTP/1.1\r\n"]
        if content_type := transform_input.get("ContentType"):
            headers.append(f"Content-Type: {content_type}\r\n")
        if accept := output.get("Accept"):
            headers.append(f"Accept: {accept}\r\n")
        client = record.get("ModelClientConfig", {})
        plan = Plan(
            head="".join(headers).encode("latin-1"),
            split=transform_input.get("SplitType", "None") == "Line",
            multi_record=settled["BatchStrategy"] == "MultiRecord",
            limit=settled["MaxPayloadInMB"] * MB or None,
            concurrency=settled["MaxConcurrentTransforms"],
            gzip=transform_input.get("CompressionType", "None") == "Gzip",
            timeout=client.get("InvocationsTimeoutInSeconds", INVOCATION_TIMEOUT),
            retries=client.get("InvocationsMaxRetries", INVOCATION_RETRIES),
        )
        say(f"Settings: {json.dumps(settled)}")
        return plan, urls

    def _upload(self, s3, record: dict, objects: list[InputObject], running: _Running, say) -> None:
        output = record["TransformOutput"]["S3OutputPath"].rstrip("/")
        separator = b"\n" if record["TransformOutput"].get("AssembleWith", "None") == "Line" else b""

        def put(obj: InputObject) -> None:
            check_stop(running.stop)  # a stopped job writes no more output
            replies = [obj.replies[index] for index in range(len(obj.replies))]
            body = b"".join(reply + separator for reply in replies)
            aws.put_verified(s3, *aws.split_s3_uri(f"{output}/{obj.name}.out"), body)

        began = time.monotonic()
        with ThreadPoolExecutor(S3_THREADS, thread_name_prefix="transform-s3") as pool:
            list(pool.map(put, objects))
        say(f"Uploaded {len(objects)} outputs to {output}/ in {time.monotonic() - began:.2f} s")

    @staticmethod
    def _images(objects: list[InputObject]) -> int | None:
        """How many predictions the model answered, where its answers say (SageMaker's JSON ``predictions``)."""
        total = 0
        for obj in objects:
            for reply in obj.replies.values():
                try:
                    predictions = json.loads(reply)["predictions"]
                except (ValueError, TypeError, KeyError):
                    return None
                if not isinstance(predictions, list):
                    return None
                total += len(predictions)
        return total


def _manifest(body: bytes, uri: str) -> tuple[str, list[str]]:
    """SageMaker's manifest: ``[{"prefix": "s3://bucket/prefix/"}, "relative/key", ...]``; (prefix, keys)."""
    try:
        document = json.loads(body)
    except ValueError as error:
        raise ValueError(f"the manifest {uri} is not JSON: {error}") from None
    if not (
        isinstance(document, list)
        and document
        and isinstance(document[0], dict)
        and isinstance(document[0].get("prefix"), str)
        and all(isinstance(k, str) for k in document[1:])
    ):
        raise ValueError(f'the manifest {uri} is not [{{"prefix": "s3://bucket/prefix/"}}, "key", ...]')
    return document[0]["prefix"], document[1:]


def _execution_parameters(url: str) -> dict:
    """The container's own MaxConcurrentTransforms, BatchStrategy and MaxPayloadInMB, if it answers SageMaker's
    ``GET /execution-parameters``; nothing otherwise (SageMaker's defaults apply)."""
    try:
        with urllib.request.urlopen(f"{url}/execution-parameters", timeout=2) as answer:
            document = json.loads(answer.read())
    except (OSError, ValueError):
        return {}
    return {key: document[key] for key in DEFAULTS if isinstance(document, dict) and document.get(key)}
