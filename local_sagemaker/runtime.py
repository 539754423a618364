"""InvokeEndpoint: the runtime API in front of every endpoint's model servers, on a port of its own; what it does with
a request: checked (signature, IAM), forwarded, answered, sampled for CloudWatch and captured.

As on AWS, where ``runtime.sagemaker`` and ``api.sagemaker`` are two hosts, the runtime listens apart from the
control plane: boto3's ``sagemaker-runtime`` client sends ``POST /endpoints/{EndpointName}/invocations`` here (the
AWS connection's ``service_config`` routes it), and the request goes on to one of the servers that serve the
endpoint now, picked by weight (or by the ``X-Amzn-SageMaker-Target-Variant`` header; local_sagemaker.routing),
over kept-alive connections (local_sagemaker.upstreams).

Both sides speak HTTP/1.1 through httptools' parser on plain asyncio protocols: this path carries every
invocation, and a general-purpose framework costs here as much CPU per request as the model server itself (see
bench/results/endpoint.json, `runtime` beside `project`). How a client's requests are read and answered is
local_sagemaker/runtime_http.py's part.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import resource
import time
import urllib.parse
from collections.abc import AsyncIterator

from local_aws import errors, sigv4
from local_aws.permissions import Requirement
from local_sagemaker import capture, eventstream
from local_sagemaker.access import Access, AccessDenied, NotCached
from local_sagemaker.protocol import arn
from local_sagemaker.routing import Router, Sample, Target
from local_sagemaker.runtime_http import (
    FORWARDED_REQUEST_HEADERS,
    LISTEN_BACKLOG,
    MAX_CONNECTIONS,
    STREAM_ACCEPT,
    TARGET_VARIANT,
    Client,
    EventStream,
    InvokeError,
    Request,
)
from local_sagemaker.upstreams import Upstreams

log = logging.getLogger(__name__)

# Response headers the SageMaker runtime passes back from the container.
RETURNED_RESPONSE_HEADERS = ("Content-Type", "X-Amzn-SageMaker-Custom-Attributes", "Server-Timing")
MODEL_ERROR = 424  # InvokeEndpoint's status when the container answered an error
HANDLER_TIMING = re.compile(r"handler;dur=([0-9.]+)")
# InvokeEndpoint and InvokeEndpointWithResponseStream: the path's last part names the operation, and its IAM action.
STREAM_OPERATION, ASYNC_OPERATION = "invocations-response-stream", "async-invocations"
INVOCATIONS_PATH = re.compile(rf"/endpoints/([^/]+)/(invocations|{STREAM_OPERATION}|{ASYNC_OPERATION})")
ACTIONS = {
    "invocations": "sagemaker:InvokeEndpoint",
    STREAM_OPERATION: "sagemaker:InvokeEndpointWithResponseStream",
    ASYNC_OPERATION: "sagemaker:InvokeEndpointAsync",
}
ROUTES = "POST /endpoints/{EndpointName}/invocations, /invocations-response-stream and /async-invocations"
EVENT_STREAM = "application/vnd.amazon.eventstream"
# SageMaker's EndpointName pattern, its length limit included (botocore's; tests/test_layers.py holds it there).
ENDPOINT_NAME_PATTERN = r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}"
ENDPOINT_NAME = re.compile(ENDPOINT_NAME_PATTERN)

_KEPT_RESPONSE_HEADERS = {name.lower(): name for name in (*RETURNED_RESPONSE_HEADERS, "x-amzn-ErrorType")}
# A response stream's own headers: the model's content type under another name, since its body is the event stream.
_STREAMED_RESPONSE_HEADERS = {
    "content-type": "X-Amzn-SageMaker-Content-Type",
    "x-amzn-sagemaker-custom-attributes": "X-Amzn-SageMaker-Custom-Attributes",
}


class _EventStream(EventStream):
    """InvokeEndpointWithResponseStream's body: the model server's 2xx answer as it arrives, each piece a
    PayloadPart event. A failure on the way ends the stream with a ModelStreamError event, as SageMaker ends it.
    ``close`` (always called, also when the client went away first) ends the request to the model server."""

    def __init__(
        self,
        runtime: Runtime,
        name: str,
        target: Target,
        started: float,
        upstream_headers: dict[str, str],
        stream: asyncio.Queue,
        sending: asyncio.Future,
    ):
        self.runtime, self.name, self.target, self.started = runtime, name, target, started
        self.upstream_headers, self.stream, self.sending = upstream_headers, stream, sending
        self.closed = False

    def headers(self) -> list[tuple[str, str]]:
        headers = [("Content-Type", EVENT_STREAM), ("x-Amzn-Invoked-Production-Variant", self.target.variant)]
        for lower, canonical in _STREAMED_RESPONSE_HEADERS.items():
            if lower in self.upstream_headers:
                headers.append((canonical, self.upstream_headers[lower]))
        return headers

    async def events(self) -> AsyncIterator[bytes]:
        try:
            while True:
                piece = asyncio.ensure_future(self.stream.get())
                await asyncio.wait((piece, self.sending), return_when=asyncio.FIRST_COMPLETED)
                if not piece.done():  # the answer ended, or failed, with nothing more queued
                    piece.cancel()
                    if self.stream.empty():
                        await self.sending  # raises its failure
                        break
                    continue
                if piece.result() is None:
                    break
                if piece.result():
                    yield eventstream.event("PayloadPart", piece.result())
            self.runtime._sample(self.target, self.started, 200, self.upstream_headers, b"")
        except (OSError, TimeoutError) as error:
            self.runtime._unanswered(self.name, self.target, self.started, error)
            broke = f"Endpoint {self.name}: its model server's answer broke off: {type(error).__name__}: {error}"
            yield eventstream.exception("ModelStreamError", {"Message": broke, "ErrorCode": "ModelStreamError"})

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.sending.cancel()
            self.runtime.router.in_flight[self.target.url] -= 1


class Runtime:
    """The runtime API's server: requests in, forwarded to the model server the router picks, answers out."""

    def __init__(self, router: Router, account: str, access: Access, region: str):
        self.router, self.account, self.access, self.region = router, account, access, region
        self.upstreams = Upstreams()
        # InvokeEndpointAsync's queue (local_sagemaker.async_inference), where the service gives the runtime one.
        self.asynchronous = None
        # Data capture (local_sagemaker.capture.DataCapture), where the service gives the runtime one.
        self.capture: capture.DataCapture | None = None
        self.clients: set[Client] = set()
        self.server: asyncio.Server | None = None
        # Each client connection is a file descriptor, and so is each connection on to a model server.
        self.max_connections = min(MAX_CONNECTIONS, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 2)

    async def start(self, host: str, port: int) -> None:
        self.server = await asyncio.get_running_loop().create_server(
            lambda: Client(self), host, port, backlog=LISTEN_BACKLOG
        )

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for client in list(self.clients):
            client.transport.close()
        if self.asynchronous is not None:
            await self.asynchronous.close()
        if self.capture is not None:
            await self.capture.close()
        self.upstreams.close()
        if self.server is not None:
            await self.server.wait_closed()

    async def invoke(self, request: Request) -> tuple[int, list[tuple[str, str]], bytes | EventStream]:
        """The answer to ``request``: status, headers, and its body, or for a response stream the body's framed
        events as they come."""
        path, _, query = request.url.partition(b"?")
        if request.refused is not None:  # its body was never kept: there is nothing to check a signature against
            raise request.refused
        await self._authenticate_and_authorize(request, path.decode("latin-1"), query.decode("latin-1"))
        match = INVOCATIONS_PATH.fullmatch(path.decode("latin-1"))
        if match is None or request.method != b"POST":
            raise InvokeError(404, "UnknownOperationException", f"The runtime answers only {ROUTES}.")
        name, streamed = urllib.parse.unquote(match.group(1)), match.group(2) == STREAM_OPERATION
        if not ENDPOINT_NAME.fullmatch(name):
            raise InvokeError(
                400,
                "ValidationError",
                f"1 validation error detected: Value '{name}' at "
                "'endpointName' failed to satisfy constraint: Member must satisfy regular "
                f"expression pattern: ^{ENDPOINT_NAME_PATTERN}",
            )
        if match.group(2) == ASYNC_OPERATION:
            if self.asynchronous is None:
                raise InvokeError(404, "UnknownOperationException", "This runtime serves no asynchronous inference.")
            return await self.asynchronous.accept(name, request.fields, request.body)
        variant = request.headers.get(TARGET_VARIANT)
        target = self.router.pick(name, variant)
        if target is None:
            if variant and self.router.routes.get(name):
                raise InvokeError(400, "ValidationError", f"Variant {variant} not found for endpoint {name}.")
            raise InvokeError(400, "ValidationError", f"Endpoint {name} of account {self.account} not found.")
        head = [b"POST /endpoints/", match.group(1).encode("latin-1"), b"/invocations HTTP/1.1\r\n"]
        for header in FORWARDED_REQUEST_HEADERS:
            if header in request.headers:
                head.append(f"{header}: {request.headers[header]}\r\n".encode("latin-1"))
        if streamed and STREAM_ACCEPT in request.headers:  # a response stream names its Accept apart
            head.append(f"Accept: {request.headers[STREAM_ACCEPT]}\r\n".encode("latin-1"))
        started = time.perf_counter()
        stream = asyncio.Queue() if streamed else None
        self.router.in_flight[target.url] += 1
        sending = asyncio.ensure_future(self.upstreams.send(target.url, b"".join(head), request.body, stream=stream))
        handed_over = False
        try:
            if stream is not None:
                first = asyncio.ensure_future(stream.get())
                await asyncio.wait((sending, first), return_when=asyncio.FIRST_COMPLETED)
                if first.done():  # a 2xx answer has begun: its body goes on as events
                    _, status, upstream_headers = first.result()
                    handed_over = True
                    events = _EventStream(self, name, target, started, upstream_headers, stream, sending)
                    return status, events.headers(), events
                first.cancel()
            reply = await sending
        except (OSError, TimeoutError) as error:
            raise self._unanswered(name, target, started, error) from None
        finally:
            if not handed_over:
                sending.cancel()
                self.router.in_flight[target.url] -= 1
        self._sample(target, started, reply.status, reply.headers, reply.body)
        if target.capture is not None and self.capture is not None and 200 <= reply.status < 300:
            self.capture.record(name, target.capture, target.variant, request, reply)
        headers = [
            (canonical, reply.headers[lower])
            for lower, canonical in _KEPT_RESPONSE_HEADERS.items()
            if lower in reply.headers and (lower != "x-amzn-errortype" or reply.status >= 400)
        ]
        headers.append(("x-Amzn-Invoked-Production-Variant", target.variant))
        return reply.status, headers, reply.body

    def _sample(self, target: Target, started: float, status: int, headers: dict[str, str], body: bytes) -> None:
        """Keep the answer's status and latencies for the alarms."""
        total_us = _us(started)
        timing = HANDLER_TIMING.search(headers.get("server-timing", ""))
        model_us = float(timing.group(1)) * 1000 if timing else None
        # The metrics count what the container answered: a ModelError (424) carries the container's own status.
        counted = _original_status(body) if status == MODEL_ERROR else status
        self.router.samples[target.url].append(Sample(time.time(), counted, model_us, total_us - (model_us or 0)))

    def _unanswered(self, name: str, target: Target, started: float, error: BaseException) -> InvokeError:
        self.router.samples[target.url].append(Sample(time.time(), 503, None, _us(started)))
        return InvokeError(
            503, "ServiceUnavailable", f"Endpoint {name}: its model server did not answer: {type(error).__name__}"
        )

    async def _authenticate_and_authorize(self, request: Request, path: str, query: str) -> None:
        """InvokeError as AWS answers unless the request is signed by a principal that may invoke its endpoint. The
        caches answer a steady stream of requests in the event loop; a miss asks the local AWS from a thread."""
        signed = sigv4.Request(request.method.decode("latin-1"), path, query, request.fields, request.body)
        match = INVOCATIONS_PATH.fullmatch(path)
        name = urllib.parse.unquote(match.group(1)).lower() if match else "*"
        needed = [
            Requirement(
                ACTIONS[match.group(2)] if match else ACTIONS["invocations"],
                arn("endpoint", name, region=self.region, account=self.account),
            )
        ]
        loop = asyncio.get_running_loop()
        try:
            try:
                principal = self.access.authenticate(signed, fetch=False)
            except NotCached:
                principal = await loop.run_in_executor(None, self.access.authenticate, signed)
            if match is None:
                return
            try:
                self.access.authorize(principal, needed, fetch=False)
            except NotCached:
                await loop.run_in_executor(None, self.access.authorize, principal, needed)
        except sigv4.AuthError as error:
            raise InvokeError(*errors.describe("rest-json", error)) from None
        except AccessDenied as error:
            raise InvokeError(403, "AccessDeniedException", error.message) from None
        except (OSError, RuntimeError) as error:  # the local AWS, which IAM is, did not answer
            log.warning("IAM could not be asked about an invocation: %s", error)
            raise InvokeError(
                503,
                "ServiceUnavailable",
                "IAM could not be asked whether the caller may invoke the endpoint; try again",
            ) from None


def _original_status(content: bytes) -> int:
    try:
        return int(json.loads(content)["OriginalStatusCode"])
    except (ValueError, KeyError, TypeError):
        return MODEL_ERROR


def _us(started: float) -> float:
    return (time.perf_counter() - started) * 1e6
