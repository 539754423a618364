"""Data capture: an endpoint's invocations, sampled and written to S3 as SageMaker's data capture writes them, when
its endpoint config has a DataCaptureConfig.

Each sampled invocation is one JSON line (SageMaker's format, read by Model Monitor)::

    {"captureData": {"endpointInput": {"observedContentType": "application/json", "mode": "INPUT",
                                       "data": "{\\"instances\\": ...}", "encoding": "JSON"},
                     "endpointOutput": {"observedContentType": "application/json", "mode": "OUTPUT",
                                        "data": "{\\"predictions\\": ...}", "encoding": "JSON"}},
     "eventMetadata": {"eventId": "<uuid4>", "inferenceId": "<the request's InferenceId, if any>",
                       "inferenceTime": "2026-12-07T10:00:00Z"},
     "eventVersion": "0"}

``encoding`` is JSON for a content type the config's ``CaptureContentTypeHeader.JsonContentTypes`` names, CSV for
one its ``CsvContentTypes`` names (``data`` then the body's text), and BASE64 for any other, for a body that is not
UTF-8 text, and for every body of a config without a CaptureContentTypeHeader, as SageMaker's API reference says
("If no headers are specified SageMaker will by default base64 encode"). Content types are matched on their media
type (``text/csv; charset=utf-8`` is ``text/csv``). Only the sides the ``CaptureOptions`` ask for are written.

Records go to ``<DestinationS3Uri>/<EndpointName>/<VariantName>/yyyy/mm/dd/hh/<mm-ss-mmm>-<uuid4>.jsonl``, the
time that of the object's first record, in UTC; one object holds records of one hour only. They are written as the
execution role of the variant's model, as SageMaker writes them: a role that may not write loses its records, and
never its invocations.

Capture must never slow serving down or make it fail. In the request path it only samples (InitialSamplingPercentage)
and keeps references to the bodies the runtime holds anyway, in a buffer bounded in records and in bytes (bytes held
until their object is written); a record that does not fit is dropped and counted, never waited for. A writer task in
the runtime's event loop takes the buffer every FLUSH_SECONDS, or sooner once a batch is full, and writes one object
per endpoint, variant and hour, up to BATCH_RECORDS or BATCH_BYTES each: it encodes the records in the loop, a few at
a time between requests (a thread encoding them would hold the interpreter's lock, and the loop would wait for it at
each of its turns), and puts the object from a thread of its own. A put is tried as botocore's standard retry mode
tries it (transient errors, three attempts); one that still fails, or is refused, drops its records, counted by
reason and logged at most once a minute per endpoint.

Only InvokeEndpoint requests the model answered 2xx are captured: an error answer is the runtime's or the container's
own message, not an inference to monitor, and the runtime's metrics count those already. Response streams and
asynchronous invocations are not captured. KmsKeyId is shown by DescribeEndpoint and not applied: the local AWS has
no KMS.

The counts (``DataCapture.counts``) are served on the control plane at ``GET /_local/data-capture``.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import dataclasses
import functools
import json
import logging
import random
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from botocore.exceptions import ClientError

from local_sagemaker import aws
from local_sagemaker.protocol import ValidationException

log = logging.getLogger(__name__)

COUNTS_PATH = "/_local/data-capture"
FLUSH_SECONDS = 1.0
BATCH_RECORDS = 1000  # records in one object at most
BATCH_BYTES = 8 * 1024 * 1024  # bodies in one object at most (the object is larger by its JSON and base64)
BUFFER_RECORDS = 100_000  # records waiting or being written, at most
BUFFER_BYTES = 64 * 1024 * 1024  # their bodies' bytes, at most
RECORD_OVERHEAD = 256  # what a record holds beside its bodies, counted against BUFFER_BYTES
CLOSE_SECONDS = 5.0  # how long a stopping service waits for what is buffered to be written
LOG_EVERY_SECONDS = 60.0  # drops of one endpoint are logged at most this often
YIELD_EVERY = 32  # records the writer encodes before it lets the event loop's other work run (_encode)
_CONTROL = bytes(range(32))  # what a JSON string may not hold unescaped, beside quotes and backslashes
# Each CaptureMode, as (captures the input, captures the output).
MODES = {"Input": (True, False), "Output": (False, True), "InputAndOutput": (True, True)}
# Why a record was dropped: the buffer was full; its role could not be assumed; S3 refused the put as the role; the
# put failed otherwise; the service stopped before it was written.
DROP_REASONS = ("BufferFull", "RoleUnavailable", "AccessDenied", "WriteFailed", "ServiceStopped")


@dataclasses.dataclass(frozen=True)
class Settings:
    """A variant's data capture, parsed once from its endpoint config when its route is set."""

    destination: str  # s3://bucket[/prefix], no trailing slash
    percentage: int
    input: bool
    output: bool
    json_types: frozenset[str]  # media types, lower-case
    csv_types: frozenset[str]
    role: str  # the execution role of the variant's model, which writes the records


def check(config: dict) -> None:
    """ValidationException for a DataCaptureConfig that botocore's model lets through and SageMaker refuses (the
    model's own constraints, ranges, enums and patterns, are checked on the wire by local_sagemaker.protocol)."""
    uri = config["DestinationS3Uri"]
    try:
        aws.split_s3_uri(uri)
    except ValueError:
        raise ValidationException(
            f"DataCaptureConfig.DestinationS3Uri '{uri}' is not an S3 URI of the form s3://bucket/prefix"
        ) from None
    modes = [option["CaptureMode"] for option in config["CaptureOptions"]]
    inputs = sum(MODES[mode][0] for mode in modes)
    outputs = sum(MODES[mode][1] for mode in modes)
    if inputs > 1 or outputs > 1:
        raise ValidationException(
            f"DataCaptureConfig.CaptureOptions [{', '.join(modes)}] capture the "
            f"{'input' if inputs > 1 else 'output'} more than once: give each of Input and "
            "Output at most once (InputAndOutput is both)"
        )


def settings(config: dict | None, role: str | None) -> Settings | None:
    """The capture of a variant whose endpoint config has DataCaptureConfig ``config`` and whose model runs as
    ``role``; None when nothing is captured."""
    if not config or not config.get("EnableCapture", True) or not role:
        return None
    modes = [MODES[option["CaptureMode"]] for option in config["CaptureOptions"]]
    header = config.get("CaptureContentTypeHeader") or {}
    return Settings(
        destination=config["DestinationS3Uri"].rstrip("/"),
        percentage=int(config["InitialSamplingPercentage"]),
        input=any(captured for captured, _ in modes),
        output=any(captured for _, captured in modes),
        json_types=frozenset(kind.lower() for kind in header.get("JsonContentTypes", ())),
        csv_types=frozenset(kind.lower() for kind in header.get("CsvContentTypes", ())),
        role=role,
    )


def summary(config: dict | None) -> dict | None:
    """DescribeEndpoint's DataCaptureConfig for an endpoint whose current config has DataCaptureConfig ``config``."""
    if not config:
        return None
    enabled = config.get("EnableCapture", True)
    answer = {
        "EnableCapture": enabled,
        "CaptureStatus": "Started" if enabled else "Stopped",
        "CurrentSamplingPercentage": config["InitialSamplingPercentage"],
        "DestinationS3Uri": config["DestinationS3Uri"],
    }
    if config.get("KmsKeyId"):
        answer["KmsKeyId"] = config["KmsKeyId"]
    return answer


@dataclasses.dataclass(slots=True)
class _Record:
    endpoint: str
    variant: str
    settings: Settings
    at: float  # time.time() of the answer
    input_type: str | None
    input: bytes | None  # None when the input is not captured
    output_type: str | None
    output: bytes | None
    inference_id: str | None
    size: int  # counted against BUFFER_BYTES


class DataCapture:
    """The runtime's data capture: ``record`` in the request path, a writer task in its event loop."""

    def __init__(
        self,
        roles,
        endpoint_arn: Callable[[str], str],
        *,
        put: Callable | None = None,
        buffer_records: int = BUFFER_RECORDS,
        buffer_bytes: int = BUFFER_BYTES,
    ):
        """``roles``: local_sagemaker.roles.Roles, whose sessions write as the models' roles; ``endpoint_arn``: an
        endpoint's ARN by name, the resource the roles are assumed for; ``put(role_arn, source_arn, bucket, key,
        body)``: where objects go, if not to S3 as the role."""
        self.roles, self.endpoint_arn = roles, endpoint_arn
        self._put = put or self._put_as_role
        self.buffer_records, self.buffer_bytes = buffer_records, buffer_bytes
        self._buffer: collections.deque[_Record] = collections.deque()
        self._writing: collections.Counter[str] = collections.Counter()  # records taken, not yet written, by endpoint
        self._buffered_bytes = 0  # of the records in the buffer
        self._held_bytes = 0  # of the records in the buffer or being written
        self._held_records = 0
        self._counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self._logged: dict[str, float] = {}  # endpoint → when its last drop was logged (time.monotonic())
        # One role session per role and endpoint (each holds its S3 client), used by the writer thread only.
        self._sessions: dict[tuple[str, str], object] = {}
        # A thread of its own: a put that hangs never holds up the runtime's lookups in the default executor.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="data-capture")
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closing = False

    def start(self) -> None:
        """Start the writer, in the running event loop (the runtime's)."""
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="data-capture-writer")

    # -- the request path --------------------------------------------------------------------------------------------

    def record(self, endpoint: str, settings: Settings, variant: str, request, reply) -> None:
        """Sample an invocation of ``endpoint`` answered 2xx (``request``: the runtime's request, its ``headers``,
        ``fields`` and ``body``; ``reply``: the model server's, its lower-case ``headers`` and ``body``), and keep
        it if the buffer has room. Never blocks, never raises for a full buffer."""
        if settings.percentage < 100 and random.random() * 100 >= settings.percentage:
            return
        body_in = request.body if settings.input else None
        body_out = reply.body if settings.output else None
        size = (
            RECORD_OVERHEAD
            + (len(body_in) if body_in is not None else 0)
            + (len(body_out) if body_out is not None else 0)
        )
        counts = self._counts[endpoint]
        if self._closing or self._held_records >= self.buffer_records or self._held_bytes + size > self.buffer_bytes:
            reason = "ServiceStopped" if self._closing else "BufferFull"
            counts[reason] += 1
            self._log_drop(
                endpoint,
                1,
                reason,
                f"its buffer holds {self._held_records} records of {self._held_bytes} bytes, the most it may",
            )
            return
        self._buffer.append(
            _Record(
                endpoint,
                variant,
                settings,
                time.time(),
                request.headers.get("Content-Type"),
                body_in,
                reply.headers.get("content-type"),
                body_out,
                request.fields.get("x-amzn-sagemaker-inference-id"),
                size,
            )
        )
        self._held_records += 1
        self._held_bytes += size
        self._buffered_bytes += size
        counts["Captured"] += 1
        if (len(self._buffer) >= BATCH_RECORDS or self._buffered_bytes >= BATCH_BYTES) and self._wake is not None:
            self._wake.set()

    # -- the writer --------------------------------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), FLUSH_SECONDS)
            self._wake.clear()
            if self._buffer:
                await self._flush()
            if self._closing and not self._buffer:
                return

    async def _flush(self) -> None:
        """Write what is buffered: one object per endpoint, variant, capture and hour, and BATCH_RECORDS or
        BATCH_BYTES, each encoded here, in slices between the loop's other work, and put from the writer's thread."""
        batch, self._buffer, self._buffered_bytes = self._buffer, collections.deque(), 0
        groups: dict[tuple, list[_Record]] = collections.defaultdict(list)
        for record in batch:
            groups[(record.endpoint, record.variant, record.settings, int(record.at // 3600))].append(record)
        self._writing = collections.Counter(record.endpoint for record in batch)
        for (endpoint, variant, settings, _), records in groups.items():
            for chunk in _chunks(records):
                outcome, detail = await self._write(endpoint, variant, settings, chunk)
                self._writing[endpoint] -= len(chunk)
                self._held_records -= len(chunk)
                self._held_bytes -= sum(record.size for record in chunk)
                self._count(endpoint, len(chunk), outcome, detail)

    async def _write(
        self, endpoint: str, variant: str, settings: Settings, chunk: list[_Record]
    ) -> tuple[str, str | None]:
        try:
            body = await _encode(chunk)
            bucket, prefix = aws.split_s3_uri(settings.destination)
            key = "/".join(part for part in (prefix.strip("/"), endpoint, variant, _name(chunk[0].at)) if part)
            return await asyncio.get_running_loop().run_in_executor(
                self._executor, self._try_put, settings.role, self.endpoint_arn(endpoint), bucket, key, body
            )
        except Exception as error:  # a bug: the records are lost, counted, and the writer goes on
            log.exception("Data capture of endpoint %s: writing %d records failed", endpoint, len(chunk))
            return "WriteFailed", f"{type(error).__name__}: {error}"

    def _count(self, endpoint: str, records: int, outcome: str, detail: str | None) -> None:
        if outcome == "Written":
            self._counts[endpoint]["Written"] += records
            self._counts[endpoint]["Objects"] += 1
        else:
            self._counts[endpoint][outcome] += records
            self._log_drop(endpoint, records, outcome, detail)

    def _try_put(self, role: str, source: str, bucket: str, key: str, body: bytes) -> tuple[str, str | None]:
        try:
            self._put(role, source, bucket, key, body)
        except ValidationException as error:  # local_sagemaker.roles: the role cannot be assumed
            return "RoleUnavailable", error.message
        except ClientError as error:
            code = error.response.get("Error", {}).get("Code", "")
            outcome = "AccessDenied" if code in ("AccessDenied", "AccessDeniedException") else "WriteFailed"
            return outcome, f"s3://{bucket}/{key} as {role}: {code}: {error.response['Error'].get('Message', '')}"
        except Exception as error:  # S3 unreachable, or anything else: the records are lost, never an invocation
            return "WriteFailed", f"s3://{bucket}/{key} as {role}: {type(error).__name__}: {error}"
        return "Written", None

    def _put_as_role(self, role: str, source: str, bucket: str, key: str, body: bytes) -> None:
        session = self._sessions.get((role, source))
        if session is None:  # assumes the role (asks STS): a failure is not kept, the next batch tries again
            session = self._sessions[(role, source)] = self.roles.session(role, source)
        session.client("s3").put_object(Bucket=bucket, Key=key, Body=body)

    def _log_drop(self, endpoint: str, records: int, reason: str, detail: str | None) -> None:
        now = time.monotonic()
        if now - self._logged.get(endpoint, -LOG_EVERY_SECONDS) < LOG_EVERY_SECONDS:
            return
        self._logged[endpoint] = now
        log.warning(
            "Data capture of endpoint %s: %d records dropped (%s): %s; so far %s (its drops are logged at "
            "most once a minute)",
            endpoint,
            records,
            reason,
            detail,
            self.counts().get(endpoint),
        )

    # -- observing and stopping --------------------------------------------------------------------------------------

    def counts(self) -> dict[str, dict]:
        """Per endpoint: records captured (sampled and buffered), written, objects written, and dropped by reason."""
        return {
            endpoint: {
                "Captured": counts["Captured"],
                "Written": counts["Written"],
                "Objects": counts["Objects"],
                "Dropped": {reason: counts[reason] for reason in DROP_REASONS if counts[reason]},
            }
            for endpoint, counts in self._counts.items()
        }

    async def close(self) -> None:
        """Write what is buffered, waiting at most CLOSE_SECONDS; what is left then is counted as dropped."""
        self._closing = True
        if self._task is not None:
            self._wake.set()
            try:
                await asyncio.wait_for(asyncio.shield(self._task), CLOSE_SECONDS)
            except TimeoutError:
                # What is buffered, and the batch being written, whose put may yet land after all.
                left = collections.Counter(record.endpoint for record in self._buffer) + self._writing
                self._task.cancel()
                for endpoint, records in left.items():
                    self._counts[endpoint]["ServiceStopped"] += records
                log.warning(
                    "Data capture: %d records were not written within %g s of the stop",
                    sum(left.values()),
                    CLOSE_SECONDS,
                )
        self._executor.shutdown(wait=False, cancel_futures=True)
        for endpoint, counts in self.counts().items():
            log.info("Data capture of endpoint %s: %s", endpoint, counts)


def _chunks(records: list[_Record]):
    """``records`` in runs of at most BATCH_RECORDS records and BATCH_BYTES bytes (a larger record alone)."""
    chunk, size = [], 0
    for record in records:
        if chunk and (len(chunk) >= BATCH_RECORDS or size + record.size > BATCH_BYTES):
            yield chunk
            chunk, size = [], 0
        chunk.append(record)
        size += record.size
    if chunk:
        yield chunk


def _name(at: float) -> str:
    """The part of an object's key from its first record's time: ``yyyy/mm/dd/hh/mm-ss-mmm-<uuid4>.jsonl``."""
    return time.strftime("%Y/%m/%d/%H/%M-%S-", time.gmtime(at)) + f"{int(at * 1000) % 1000:03d}-{uuid.uuid4()}.jsonl"


async def _encode(records: list[_Record]) -> bytes:
    """The records as JSON lines, in slices of YIELD_EVERY records between the event loop's other work."""
    lines = []
    for index, record in enumerate(records):
        if index % YIELD_EVERY == YIELD_EVERY - 1:
            await asyncio.sleep(0)
        sides = []
        if record.input is not None:
            sides.append(b'"endpointInput":' + _side(record.input_type, record.input, b"INPUT", record.settings))
        if record.output is not None:
            sides.append(b'"endpointOutput":' + _side(record.output_type, record.output, b"OUTPUT", record.settings))
        inference_id = b',"inferenceId":' + _quoted(record.inference_id) if record.inference_id else b""
        lines.append(
            b'{"captureData":{%b},"eventMetadata":{"eventId":"%b"%b,"inferenceTime":"%b"},"eventVersion":"0"}\n'
            % (b",".join(sides), str(uuid.uuid4()).encode(), inference_id, _time(int(record.at)))
        )
    return b"".join(lines)


def _side(content_type: str | None, body: bytes, mode: bytes, settings: Settings) -> bytes:
    media = (content_type or "").split(";", 1)[0].strip().lower()
    encoding = b"JSON" if media in settings.json_types else b"CSV" if media in settings.csv_types else b"BASE64"
    data = _text(body) if encoding != b"BASE64" else None
    if data is None:  # BASE64, or not the text its content type says: kept whole all the same
        encoding, data = b"BASE64", b'"' + base64.b64encode(body) + b'"'
    observed = b'"observedContentType":' + _quoted(content_type) + b"," if content_type is not None else b""
    return b'{%b"mode":"%b","data":%b,"encoding":"%b"}' % (observed, mode, data, encoding)


def _text(body: bytes) -> bytes | None:
    """``body``'s text as a JSON string, or None if it is not UTF-8. ASCII without control characters, as JSON and
    CSV bodies mostly are, needs only its quotes and backslashes escaped: several times faster than json.dumps."""
    if body.isascii() and len(body.translate(None, _CONTROL)) == len(body):
        return b'"' + body.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    try:
        return json.dumps(body.decode("utf-8")).encode()
    except UnicodeDecodeError:
        return None


@functools.lru_cache(maxsize=64)
def _time(seconds: int) -> bytes:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds)).encode()


@functools.lru_cache(maxsize=1024)
def _quoted(text: str) -> bytes:
    """A short string (a content type, an inference id) as a JSON string."""
    return json.dumps(text).encode()
