"""InvokeEndpointAsync: a request queued for an endpoint whose config has an AsyncInferenceConfig, answered at once
with where its result will be, then served in the background, as SageMaker serves it.

Each accepted request is a record in the service's store until it is done, so a restart of the service loses
none: they are taken up again at start. Its input is its inline Body (at most 128,000 bytes) or the object at its
InputLocation, read as the model's execution role. The endpoint's model server answers it like any invocation; a
2xx answer is put at ``<S3OutputPath>[/<S3OutputPathExtension>]/<InferenceId>.out`` (or its Filename), anything
else (an error, a request that waited longer than its RequestTTLSeconds, or took longer than its
InvocationTimeoutSeconds) at ``<S3FailurePath or S3OutputPath>/<InferenceId>-error.out``, both as the execution
role, and the config's SNS topics are told either way, in SageMaker's notification format. At most
MaxConcurrentInvocationsPerInstance requests per instance go to the model servers at once; the rest wait in turn.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
import logging
import time
import uuid
from collections.abc import Callable

from local_sagemaker import aws
from local_sagemaker.protocol import SageMakerError
from local_sagemaker.roles import Roles
from local_sagemaker.routing import Router
from local_sagemaker.runtime_http import InvokeError
from local_sagemaker.store import Store
from local_sagemaker.upstreams import Upstreams

log = logging.getLogger(__name__)

KIND = "async-invocations"
MAX_INLINE_BYTES = 128_000  # InvokeEndpointAsync's inline Body
DEFAULT_CONCURRENCY = 4  # per instance, where the config's ClientConfig leaves it to SageMaker
DEFAULT_TTL_SECONDS, TTL_BOUNDS = 6 * 3600, (60, 21600)
DEFAULT_TIMEOUT_SECONDS, TIMEOUT_BOUNDS = 900, (1, 3600)
INFERENCE_ID_LIMIT = 64
RETRY_SECONDS = 5.0  # an endpoint that is being updated, or whose servers do not answer, is tried again this soon


class AsyncInvocations:
    """Accepts InvokeEndpointAsync requests and serves them in the runtime's event loop."""

    def __init__(
        self,
        store: Store,
        models,
        roles: Roles,
        router: Router,
        upstreams: Upstreams,
        endpoint_arn: Callable[[str], str],
        region: str,
    ):
        self.store, self.models, self.roles, self.router, self.upstreams = store, models, roles, router, upstreams
        self.endpoint_arn, self.region = endpoint_arn, region
        self._slots: dict[str, asyncio.Semaphore] = {}
        # One role session per role and endpoint: each holds its boto3 clients, which cost a service model to make.
        self._sessions: dict[tuple[str, str], object] = {}
        self._tasks: set[asyncio.Task] = set()

    def recover(self) -> None:
        """Take up the requests a previous run of the service accepted and did not finish."""
        for record in sorted(self.store.items(KIND), key=lambda record: record["Received"]):
            log.info("Taking up async inference %s of endpoint %s again", record["InferenceId"], record["Endpoint"])
            self._start(record)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def accept(self, name: str, fields: dict[str, str], body: bytes) -> tuple[int, list, bytes]:
        """Check the request (``fields``: its header fields by lower-case name) and keep it; the 202 answer
        (InferenceId, OutputLocation, FailureLocation)."""
        loop = asyncio.get_running_loop()
        target = self.router.pick(name, None)
        config = await loop.run_in_executor(None, self._config, target.config) if target else None
        asynchronous = (config or {}).get("AsyncInferenceConfig")
        if target is None or not asynchronous:
            raise InvokeError(
                400,
                "ValidationError",
                f"Endpoint {name} is not an asynchronous inference endpoint: "
                "its endpoint configuration has no AsyncInferenceConfig.",
            )
        location = fields.get("x-amzn-sagemaker-inputlocation")
        if bool(location) == bool(body):
            raise InvokeError(400, "ValidationError", "Provide exactly one of Body and InputLocation.")
        if len(body) > MAX_INLINE_BYTES:
            raise InvokeError(
                400,
                "ValidationError",
                f"1 validation error detected: Value at 'body' failed to "
                f"satisfy constraint: Member must have length less than or equal to {MAX_INLINE_BYTES}",
            )
        if location:
            _s3_uri(location, "inputLocation")
        ttl = _bounded(
            fields, "x-amzn-sagemaker-requestttlseconds", "requestTTLSeconds", DEFAULT_TTL_SECONDS, TTL_BOUNDS
        )
        timeout = _bounded(
            fields,
            "x-amzn-sagemaker-invocationtimeoutseconds",
            "invocationTimeoutSeconds",
            DEFAULT_TIMEOUT_SECONDS,
            TIMEOUT_BOUNDS,
        )
        inference_id = fields.get("x-amzn-sagemaker-inference-id") or str(uuid.uuid4())
        if len(inference_id) > INFERENCE_ID_LIMIT or not inference_id.isprintable():
            raise InvokeError(
                400,
                "ValidationError",
                f"1 validation error detected: Value '{inference_id}' at "
                f"'inferenceId' failed to satisfy constraint: Member must have length less than or "
                f"equal to {INFERENCE_ID_LIMIT}",
            )
        output = asynchronous["OutputConfig"]
        extension = fields.get("x-amzn-sagemaker-s3outputpathextension", "").strip("/")
        directory = "/".join(part for part in (output["S3OutputPath"].rstrip("/"), extension) if part)
        output_uri = f"{directory}/{fields.get('x-amzn-sagemaker-filename') or inference_id + '.out'}"
        failure_uri = f"{(output.get('S3FailurePath') or output['S3OutputPath']).rstrip('/')}/{inference_id}-error.out"
        variant = next(v for v in config["ProductionVariants"] if v["VariantName"] == target.variant)
        role = await loop.run_in_executor(None, self._role, variant["ModelName"])
        concurrency = asynchronous.get("ClientConfig", {}).get("MaxConcurrentInvocationsPerInstance")
        record = {
            "Key": str(uuid.uuid4()),
            "InferenceId": inference_id,
            "Endpoint": name,
            "Variant": target.variant,
            "Role": role,
            "Slots": (concurrency or DEFAULT_CONCURRENCY) * int(variant.get("InitialInstanceCount", 1)),
            "InputLocation": location,
            "Body": base64.b64encode(body).decode() if body else None,
            "ContentType": fields.get("x-amzn-sagemaker-content-type"),
            "Accept": fields.get("x-amzn-sagemaker-accept"),
            "CustomAttributes": fields.get("x-amzn-sagemaker-custom-attributes"),
            "OutputLocation": output_uri,
            "FailureLocation": failure_uri,
            "Notifications": output.get("NotificationConfig", {}),
            "Received": time.time(),
            "ExpiresAt": time.time() + ttl,
            "TimeoutSeconds": timeout,
        }
        await loop.run_in_executor(None, self.store.put, KIND, record["Key"], record)
        self._start(record)
        answer = [
            ("X-Amzn-SageMaker-OutputLocation", output_uri),
            ("X-Amzn-SageMaker-FailureLocation", failure_uri),
            ("Content-Type", "application/json"),
        ]
        return 202, answer, json.dumps({"InferenceId": inference_id}).encode()

    def _config(self, name: str) -> dict | None:
        try:
            return self.models.endpoint_config(name)
        except SageMakerError:  # deleted since the endpoint was made from it: it asks for no async inference now
            return None

    def _role(self, model_name: str) -> str:
        try:
            return self.models.model(model_name)["ExecutionRoleArn"]
        except SageMakerError as error:
            raise InvokeError(400, "ValidationError", error.message) from None

    def _session(self, role_arn: str, source_arn: str):
        key = (role_arn, source_arn)
        if key not in self._sessions:
            self._sessions[key] = self.roles.session(role_arn, source_arn)
        return self._sessions[key]

    def _start(self, record: dict) -> None:
        task = asyncio.get_running_loop().create_task(self._serve(record))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, record: dict) -> None:
        slots = self._slots.setdefault(record["Endpoint"], asyncio.Semaphore(record["Slots"]))
        loop = asyncio.get_running_loop()
        source = self.endpoint_arn(record["Endpoint"])
        try:
            role = await loop.run_in_executor(None, self._session, record["Role"], source)  # asks STS
        except Exception as error:  # the role cannot be assumed: nothing can be read or written as it
            log.error(
                "Async inference %s of endpoint %s dropped: its role %s cannot be assumed: %s",
                record["InferenceId"],
                record["Endpoint"],
                record["Role"],
                error,
            )
            await loop.run_in_executor(None, self.store.delete, KIND, record["Key"])
            return
        try:
            async with slots:
                outcome = await self._invoke(record, role)
        except asyncio.CancelledError:
            raise  # the service stops: the record stays, and the next start serves it
        except Exception as error:  # a bug: the request fails, named in its failure object, and the service goes on
            log.exception("Async inference %s failed", record["InferenceId"])
            outcome = (False, "application/json", _failure(f"the local service failed: {type(error).__name__}"))
        try:
            await loop.run_in_executor(None, self._deliver, record, role, *outcome)
        except Exception:  # S3 or SNS refused (the role's policy) or did not answer: the record stays for a restart
            log.exception("Async inference %s: its result could not be delivered", record["InferenceId"])
            return
        await loop.run_in_executor(None, self.store.delete, KIND, record["Key"])

    async def _invoke(self, record: dict, role) -> tuple[bool, str, bytes]:
        """(succeeded, content type, body) of the model server's answer, or of the failure."""
        loop = asyncio.get_running_loop()
        if record["Body"] is not None:
            body = base64.b64decode(record["Body"])
        else:
            try:
                body = await loop.run_in_executor(None, _read, role.client("s3"), record["InputLocation"])
            except Exception as error:
                return (
                    False,
                    "application/json",
                    _failure(f"The input {record['InputLocation']} could not be read as {record['Role']}: {error}"),
                )
        head = [f"POST /endpoints/{record['Endpoint']}/invocations HTTP/1.1\r\n"]
        for header, value in (
            ("Content-Type", record["ContentType"]),
            ("Accept", record["Accept"]),
            ("X-Amzn-SageMaker-Custom-Attributes", record["CustomAttributes"]),
        ):
            if value:
                head.append(f"{header}: {value}\r\n")
        while True:
            if time.time() > record["ExpiresAt"]:
                return (
                    False,
                    "application/json",
                    _failure("Request expired: it waited longer than its RequestTTLSeconds in the queue."),
                )
            target = self.router.pick(record["Endpoint"], record["Variant"]) or self.router.pick(
                record["Endpoint"], None
            )
            if target is None:  # the endpoint is being updated, or was deleted
                await asyncio.sleep(RETRY_SECONDS)
                continue
            self.router.in_flight[target.url] += 1
            try:
                reply = await self.upstreams.send(
                    target.url, "".join(head).encode("latin-1"), body, timeout=record["TimeoutSeconds"]
                )
            except TimeoutError:
                return (
                    False,
                    "application/json",
                    _failure(f"The model did not answer within {record['TimeoutSeconds']} seconds."),
                )
            except OSError:
                await asyncio.sleep(RETRY_SECONDS)
                continue
            finally:
                self.router.in_flight[target.url] -= 1
            content_type = reply.headers.get("content-type", "application/octet-stream")
            return 200 <= reply.status < 300, content_type, reply.body

    def _deliver(self, record: dict, role, succeeded: bool, content_type: str, body: bytes) -> None:
        uri = record["OutputLocation"] if succeeded else record["FailureLocation"]
        bucket, key = aws.split_s3_uri(uri)
        role.client("s3").put_object(Bucket=bucket, Key=key, Body=body, ContentType=content_type)
        topic = record["Notifications"].get("SuccessTopic" if succeeded else "ErrorTopic")
        if topic:
            role.client("sns").publish(
                TopicArn=topic, Message=json.dumps(self._notification(record, succeeded, content_type, body))
            )
        log.info(
            "Async inference %s of endpoint %s: %s at %s",
            record["InferenceId"],
            record["Endpoint"],
            "done" if succeeded else "failed",
            uri,
        )

    def _notification(self, record: dict, succeeded: bool, content_type: str, body: bytes) -> dict:
        """SageMaker's message for an async inference's outcome."""

        def moment(seconds: float) -> str:
            return datetime.datetime.fromtimestamp(seconds, datetime.UTC).isoformat(timespec="milliseconds")[:-6] + "Z"

        message = {
            "awsRegion": self.region,
            "eventTime": moment(time.time()),
            "receivedTime": moment(record["Received"]),
            "invocationStatus": "Completed" if succeeded else "Failed",
            "requestParameters": {
                "contentType": record["ContentType"],
                "endpointName": record["Endpoint"],
                "inputLocation": record["InputLocation"],
            },
            "responseParameters": {
                "contentType": content_type,
                "sageMakerOutputLocation" if succeeded else "sageMakerFailureLocation": record[
                    "OutputLocation" if succeeded else "FailureLocation"
                ],
            },
            "inferenceId": record["InferenceId"],
            "eventVersion": "1.0",
            "eventSource": "aws:sagemaker",
            "eventName": "InferenceResult",
        }
        if not succeeded:
            message["failureReason"] = body.decode("utf-8", "replace")[:1024]
        if succeeded and record["Notifications"].get("IncludeInferenceResponseIn"):
            message["responseBody"] = {"content": body.decode("utf-8", "replace"), "encoding": "UTF-8"}
        return message


def _read(s3, uri: str) -> bytes:
    bucket, key = aws.split_s3_uri(uri)
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read()


def _failure(message: str) -> bytes:
    return json.dumps({"message": message}).encode()


def _s3_uri(value: str, field: str) -> None:
    try:
        aws.split_s3_uri(value)
    except ValueError:
        raise InvokeError(
            400,
            "ValidationError",
            f"1 validation error detected: Value '{value}' at '{field}' "
            "failed to satisfy constraint: Member must satisfy regular expression pattern: "
            "^(https|s3)://([^/]+)/?(.*)$",
        ) from None


def _bounded(headers: dict[str, str], header: str, field: str, default: int, bounds: tuple[int, int]) -> int:
    text = headers.get(header)
    if text is None:
        return default
    low, high = bounds
    if not text.isdigit() or not low <= int(text) <= high:
        raise InvokeError(
            400,
            "ValidationError",
            f"1 validation error detected: Value '{text}' at '{field}' failed "
            f"to satisfy constraint: Member must have value between {low} and {high}",
        )
    return int(text)
