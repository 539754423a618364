"""How a transform job's objects become requests to its model servers, and their answers: each object is one record
(SplitType None) or one per line (Line), sent one record per request (SingleRecord) or as many as fit in
MaxPayloadInMB, joined by newlines (MultiRecord); MaxConcurrentTransforms requests in flight per model server, each
object on one server; a request the server does not answer, or answers 5xx, tried again as ModelClientConfig says.
A record the model refuses, or one over MaxPayloadInMB, fails its object, and the other objects go on."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gzip
import json
import threading
import time
import zlib
from pathlib import Path

import uvloop

from local_sagemaker.jobs import JobStopped
from local_sagemaker.upstreams import Reply, Upstreams

MB = 1024 * 1024
STOP_POLL_SECONDS = 0.05  # how often the requests in flight look whether the job was stopped


class RecordTooLarge(ValueError):
    """A record over MaxPayloadInMB: ``where`` it is (" line 3", or "" for a whole object) and how large."""

    def __init__(self, where: str, message: str):
        super().__init__(f"{where}: {message}")
        self.where, self.message = where, message


@dataclasses.dataclass
class InputObject:
    """One input object and what became of it."""

    uri: str
    name: str  # its key under the prefix (or as the manifest lists it): its output is <S3OutputPath>/<name>.out
    path: Path  # the downloaded copy
    records: int = 0
    requests: int | None = None  # how many requests its records make, once split
    replies: dict[int, bytes] = dataclasses.field(default_factory=dict)
    failure: str | None = None
    client_error: bool = True  # whether the failure is the input's (ClientError) or the model's (AlgorithmError)

    def fail(self, where: str, message: str, client_error: bool) -> None:
        if self.failure is None:
            self.failure, self.client_error = f"{self.uri}{where}: {message}", client_error

    @property
    def succeeded(self) -> bool:
        return self.failure is None and self.requests is not None and len(self.replies) == self.requests


@dataclasses.dataclass(frozen=True)
class Plan:
    """How the job's records are sent, with every default settled."""

    head: bytes  # the request line and the Content-Type and Accept headers
    split: bool
    multi_record: bool
    limit: int | None  # bytes per request; None: no limit (MaxPayloadInMB 0)
    concurrency: int  # requests in flight per instance
    gzip: bool
    timeout: float
    retries: int


def batches(body: bytes, *, split: bool, multi_record: bool, limit: int | None) -> list[tuple[str, bytes, int]]:
    """The requests an object's records make: (where, payload, records), ``where`` naming the lines (" line 3",
    " lines 3-40") for a Line split. RecordTooLarge for a record over ``limit`` bytes."""
    if not split:
        if limit is not None and len(body) > limit:
            raise RecordTooLarge(
                "", f"a record (the whole object) of {len(body)} bytes exceeds MaxPayloadInMB ({limit // MB} MB)"
            )
        return [("", body, 1)]
    made: list[tuple[str, bytes, int]] = []
    batch: list[bytes] = []  # the records of the request being filled: lines `first` to `last`, `size` bytes joined
    first = last = size = 0
    for number, line in enumerate(body.split(b"\n"), 1):
        record = line.rstrip(b"\r")
        if not record.strip():  # a blank line is no record
            continue
        if limit is not None and len(record) > limit:
            raise RecordTooLarge(
                f" line {number}", f"a record of {len(record)} bytes exceeds MaxPayloadInMB ({limit // MB} MB)"
            )
        if batch and (not multi_record or (limit is not None and size + 1 + len(record) > limit)):
            made.append(_request(batch, first, last))
            batch = []
        if not batch:
            first, size = number, -1  # no newline before the first record
        batch.append(record)
        size += 1 + len(record)
        last = number
    if batch:
        made.append(_request(batch, first, last))
    return made


def _request(records: list[bytes], first: int, last: int) -> tuple[str, bytes, int]:
    where = f" line {first}" if first == last else f" lines {first}-{last}"
    return where, b"\n".join(records), len(records)


def _model_message(reply: Reply) -> str:
    """What the model said of a request it refused: its JSON ``error`` (or ``message``), else its body's start."""
    with contextlib.suppress(ValueError, AttributeError):
        document = json.loads(reply.body)
        message = document.get("error") or document.get("message")
        if isinstance(message, str):
            return message
    return reply.body[:300].decode("utf-8", "replace")


def send_requests(stop: threading.Event, urls: list[str], objects: list[InputObject], plan: Plan) -> dict:
    """Every object's requests (``_send``) on a loop of their own; JobStopped once ``stop`` is set."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_send(stop, urls, objects, plan))


async def _send(stop: threading.Event, urls: list[str], objects: list[InputObject], plan: Plan) -> dict:
    """Every object's requests, ``plan.concurrency`` in flight per model server, each object on one server; the
    figures of the phase. An object whose record fails sends no more of its records; the others go on."""
    upstreams = Upstreams()
    first_sent = last_answered = None
    requests = 0

    def work(mine: list[InputObject]):
        """The requests of ``mine``, one object at a time (read and split when its turn comes)."""
        for obj in mine:
            try:
                body = obj.path.read_bytes()
                if plan.gzip:
                    body = gzip.decompress(body)
                made = batches(body, split=plan.split, multi_record=plan.multi_record, limit=plan.limit)
            except RecordTooLarge as error:
                obj.fail(error.where, error.message, client_error=True)
                continue
            except (OSError, EOFError, zlib.error) as error:
                obj.fail("", f"not a readable gzip object: {error}", client_error=True)
                continue
            obj.requests, obj.records = len(made), sum(count for _, _, count in made)
            for index, (where, payload, _) in enumerate(made):
                yield obj, index, where, payload

    async def slot(url: str, queue) -> None:
        nonlocal first_sent, last_answered, requests
        for obj, index, where, payload in queue:  # the queue is shared by the server's slots
            if obj.failure:
                continue
            sent = time.perf_counter()
            first_sent = sent if first_sent is None else min(first_sent, sent)
            try:
                reply = await _invoke(upstreams, url, plan, payload)
            except (OSError, TimeoutError) as error:
                obj.fail(where, f"the model server did not answer: {type(error).__name__}: {error}", False)
                continue
            finally:
                last_answered = time.perf_counter()
                requests += 1
            if reply.status == 200:
                obj.replies[index] = reply.body
            else:
                obj.fail(where, f"the model answered {reply.status}: {_model_message(reply)}", reply.status < 500)

    slots = []
    for index, url in enumerate(urls):
        queue = work(objects[index :: len(urls)])
        slots += [slot(url, queue) for _ in range(plan.concurrency)]
    task = asyncio.gather(*slots)
    try:
        while not task.done():
            if stop.is_set():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                raise JobStopped()
            await asyncio.wait({task}, timeout=STOP_POLL_SECONDS)
        task.result()
    finally:
        upstreams.close()
    seconds = (last_answered - first_sent) if first_sent is not None else 0.0
    return {"requests": requests, "transform_seconds": round(seconds, 4)}


async def _invoke(upstreams: Upstreams, url: str, plan: Plan, payload: bytes) -> Reply:
    """POST /invocations, tried again (up to ModelClientConfig's InvocationsMaxRetries) when the server does not
    answer or answers 5xx; a 4xx is the record's own fault and final."""
    for attempt in range(plan.retries + 1):
        try:
            reply = await upstreams.send(url, plan.head, payload, timeout=plan.timeout)
        except (OSError, TimeoutError):
            if attempt == plan.retries:
                raise
            continue
        if reply.status < 500 or attempt == plan.retries:
            return reply
    raise AssertionError("unreachable")
