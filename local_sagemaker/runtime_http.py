"""The runtime's HTTP/1.1 side: how a client connection's requests are read, checked as they arrive and answered,
one after another in their order. What a request asks is local_sagemaker/runtime.py's business (``Runtime.invoke``).

Being hand-written (httptools' parser on a plain asyncio protocol: this path carries every invocation), it holds
itself to what HTTP/1.1 (RFC 9110, 9112) asks of a server: trailer fields never join the header section that was
signed and routed on; pipelined requests are answered in their order, an error that ends the connection included;
header bytes are counted as they arrive, not once a field ends; a 100 Continue is sent only when the request is
acceptable and its turn has come; and a request must arrive whole within a deadline, on one of a capped number of
connections. A body over InvokeEndpoint's 6 MB is refused from its declared length, before it is read, or as soon as
a chunked one passes the limit; it is never kept.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import http
import json
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Protocol

import httptools

log = logging.getLogger(__name__)

# InvokeEndpoint accepts at most 6 MB of payload.
MAX_PAYLOAD_BYTES = 6 * 1024 * 1024
# What a refused body may still send before the connection is closed on it (its answer goes first).
DISCARD_LIMIT_BYTES = 64 * 1024 * 1024
MAX_HEADER_BYTES = 64 * 1024
IDLE_CLIENT_TIMEOUT = 75.0  # a client connection with no request for this long is closed
# A request must arrive whole this soon after its first byte: a client that stalls mid-request holds no connection.
REQUEST_ARRIVAL_TIMEOUT = 60.0
LINGER_SECONDS = 2.0  # how long a closing connection's late bytes are read and dropped after its last answer
# Open client connections at most (or half the process's file descriptors, if fewer); past it a client is answered
# 503 and closed. The listen backlog takes bursts of new connections while the loop is busy.
MAX_CONNECTIONS = 1024
LISTEN_BACKLOG = 1024
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# Request headers the SageMaker runtime passes to the container.
FORWARDED_REQUEST_HEADERS = ("Content-Type", "Accept", "X-Amzn-SageMaker-Custom-Attributes")
TARGET_VARIANT = "X-Amzn-SageMaker-Target-Variant"
STREAM_ACCEPT = "X-Amzn-SageMaker-Accept"
_KEPT_REQUEST_HEADERS = {name.lower(): name for name in (*FORWARDED_REQUEST_HEADERS, TARGET_VARIANT, STREAM_ACCEPT)}


class InvokeError(Exception):
    """An InvokeEndpoint error as the runtime answers it: status, error code (``x-amzn-ErrorType``), message."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclasses.dataclass
class Request:
    method: bytes
    url: bytes
    headers: dict[str, str]  # the kept ones, by their canonical names
    body: bytes
    refused: InvokeError | None
    keep_alive: bool
    fields: dict[str, str]  # every header field by lower-case name (what the signature covers)


class EventStream:
    """A response whose body is an event stream, written as its events come, each an HTTP chunk; ``close`` is
    always called once it is written or the client went away. The runtime's stream implements both methods.

    A plain class, not an abc.ABC: every answer is told apart from a stream by isinstance, on the path every
    invocation takes, and an ABC's isinstance costs several times a plain class's."""

    def events(self) -> AsyncIterator[bytes]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class Application(Protocol):
    """What a connection asks of the server it belongs to (local_sagemaker.runtime.Runtime)."""

    clients: set[Client]
    max_connections: int

    async def invoke(self, request: Request) -> tuple[int, list[tuple[str, str]], bytes | EventStream]: ...


# Where the parser is in the message it reads: none begun, its header section, or what follows it (the body, and
# a chunked body's trailer section).
_IDLE, _HEAD, _BODY = range(3)


class Client(asyncio.Protocol):
    """One client connection: requests parsed as they arrive, answered one after another in their order.

    Everything that ends a connection early (a malformed request, an upgrade, a body past the discard limit, a
    request that does not arrive in time) is queued behind the requests before it, so that each request gets its
    own answer, in order, before the one that closes the connection.
    """

    def __init__(self, runtime: Application):
        self.runtime = runtime
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.pending: collections.deque[Request | InvokeError] = collections.deque()
        self.busy = False  # whether a task answers the pending requests
        self.broken = False  # whether the connection's last answer is queued: nothing more is read from it
        self.state = _IDLE
        self.timer: asyncio.TimerHandle | None = None  # the idle timer, or the current request's arrival deadline
        self.writable: asyncio.Future | None = None  # while the client does not read its answers
        self._continue_due = False  # a 100 Continue held back until the answers before it are written
        self._progress = False  # whether the parser reported anything from the bytes fed last
        self._unreported = 0  # bytes fed since the parser last reported anything: a field it buffers whole
        self._reset()

    def _reset(self) -> None:
        self._url, self._headers, self._body, self._size, self._header_bytes = b"", {}, [], 0, 0
        self._fields: dict[str, str] = {}
        self._refused: InvokeError | None = None

    # asyncio.Protocol
    def connection_made(self, transport) -> None:
        self.transport = transport
        if len(self.runtime.clients) >= self.runtime.max_connections:
            self.broken = True
            full = f"The runtime has {len(self.runtime.clients)} connections open, its most; try again."
            transport.write(_response(*_error(InvokeError(503, "ServiceUnavailable", full)), close=True))
            transport.close()
            return
        self.runtime.clients.add(self)
        self._arm(IDLE_CLIENT_TIMEOUT)

    def connection_lost(self, exc) -> None:
        self.runtime.clients.discard(self)
        self.broken = True
        self._disarm()
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)

    def pause_writing(self) -> None:
        self.writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self.broken:  # its answer is written or queued: what follows is not read, only discarded
            return
        self._progress = False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._finish(_UPGRADE)
            return
        except httptools.HttpParserError as error:
            # An exception in a callback comes back as HttpParserCallbackError, the callback's own as its context.
            cause = error.__context__ if isinstance(error, httptools.HttpParserCallbackError) else error
            if not isinstance(cause, InvokeError):
                cause = InvokeError(400, "ValidationError", f"Malformed HTTP request: {cause}")
            self._finish(cause)
            return
        # httptools buffers a field until it ends and says nothing meanwhile: count what it holds as it arrives.
        self._unreported = 0 if self._progress else self._unreported + len(data)
        if self._unreported > MAX_HEADER_BYTES and self.state != _IDLE:
            self._finish(_fields_too_large(self.state))

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._reset()
        self.state, self._progress = _HEAD, True
        if not self.busy:  # a pipelined request's deadline starts once the answers before it are written
            self._arm(REQUEST_ARRIVAL_TIMEOUT)

    def on_url(self, url: bytes) -> None:
        self._progress = True
        self._url += url
        self._count_header_bytes(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._progress = True
        self._count_header_bytes(len(name) + len(value))
        if self.state == _BODY:  # a trailer field: kept apart from the header section, that is, not kept at all
            return
        lower, text = name.decode("latin-1").lower(), value.decode("latin-1")
        self._fields[lower] = f"{self._fields[lower]},{text}" if lower in self._fields else text
        kept = _KEPT_REQUEST_HEADERS.get(lower)
        if kept:
            self._headers[kept] = text
        elif lower == "content-length" and value.isdigit() and int(value) > MAX_PAYLOAD_BYTES:
            self._refused = _too_large(f"Request payload of {int(value)} bytes exceeds")
        elif lower == "expect" and value.lower() == b"100-continue":
            self._headers["Expect"] = "100-continue"

    def on_headers_complete(self) -> None:
        self.state, self._progress = _BODY, True
        if self._headers.pop("Expect", None):
            if self._refused is not None:
                raise self._refused  # its final status now, in order, and the body it announced is never read
            if self.busy:
                self._continue_due = True
            else:
                self.transport.write(CONTINUE)

    def on_chunk_header(self) -> None:
        self._progress = True

    def on_chunk_complete(self) -> None:
        self._progress = True

    def on_body(self, body: bytes) -> None:
        self._progress = True
        self._size += len(body)
        if self._refused is None and self._size > MAX_PAYLOAD_BYTES:
            self._refused, self._body = _too_large("Request payload exceeds"), []
        if self._refused is None:
            self._body.append(body)
        elif self._size > DISCARD_LIMIT_BYTES:
            raise self._refused

    def on_message_complete(self) -> None:
        self._progress = True
        if self.parser.should_upgrade():
            raise _UPGRADE
        request = Request(
            self.parser.get_method(),
            self._url,
            self._headers,
            b"".join(self._body),
            self._refused,
            self.parser.should_keep_alive(),
            self._fields,
        )
        self._reset()
        self.state, self._continue_due = _IDLE, False
        self._queue(request)

    # answering
    def _queue(self, item: Request | InvokeError) -> None:
        self.pending.append(item)
        if self.busy:
            self.transport.pause_reading()  # a pipelining client waits for its answers
        else:
            self._disarm()
            self.busy = True
            asyncio.get_running_loop().create_task(self._answer_pending())

    def _finish(self, error: InvokeError) -> None:
        """Queue the connection's last answer behind the requests before it; nothing more is read."""
        if not self.broken:
            self.broken = True
            self._queue(error)

    async def _answer_pending(self) -> None:
        while self.pending:
            item = self.pending.popleft()
            if isinstance(item, InvokeError):
                self._write(_response(*_error(item), close=True))
                self._close_after_answer()
                return
            try:
                status, headers, body = await self.runtime.invoke(item)
            except InvokeError as error:
                status, headers, body = _error(error)
            except Exception as error:  # a bug: the runtime keeps serving, and the log has the traceback
                log.exception("InvokeEndpoint failed")
                status, headers, body = _error(
                    InvokeError(500, "InternalFailure", f"the local runtime failed: {type(error).__name__}")
                )
            if isinstance(body, EventStream):
                try:
                    if not await self._write_stream(status, headers, body, close=not item.keep_alive):
                        return
                finally:
                    body.close()
            elif self.transport.is_closing():
                return
            else:
                self._write(_response(status, headers, body, close=not item.keep_alive))
            if not item.keep_alive:
                self._close_after_answer()
                return
            if not await self._drained():
                return
        self.busy = False
        if self._continue_due:
            self._continue_due = False
            self._write(CONTINUE)
        self.transport.resume_reading()
        self._arm(REQUEST_ARRIVAL_TIMEOUT if self.state != _IDLE else IDLE_CLIENT_TIMEOUT)

    async def _write_stream(
        self, status: int, headers: list[tuple[str, str]], events: EventStream, close: bool
    ) -> bool:
        """Write a response stream's events as they come, each an HTTP chunk; False if the client went away."""
        if self.transport.is_closing():
            return False
        self._write(_response(status, headers, None, close=close))
        async for event in events.events():
            if self.transport.is_closing():
                return False
            self._write(b"%x\r\n%s\r\n" % (len(event), event))
            if not await self._drained():
                return False
        self._write(b"0\r\n\r\n")
        return not self.transport.is_closing()

    async def _drained(self) -> bool:
        """Wait while the client does not read what was written (it gets nothing more, and its requests are not
        read meanwhile); False once the connection is gone, or was dropped for not reading in time."""
        if self.writable is not None and not self.writable.done():
            try:
                await asyncio.wait_for(asyncio.shield(self.writable), IDLE_CLIENT_TIMEOUT)
            except TimeoutError:
                self.transport.abort()
                return False
        return not self.transport.is_closing()

    def _write(self, data: bytes) -> None:
        if not self.transport.is_closing():
            self.transport.write(data)

    def _close_after_answer(self) -> None:
        """End the connection once its last answer is out. Our side closes first, and what the client still sends
        is read and dropped for a moment: a socket closed with unread bytes is reset, and the reset may destroy
        the answer before the client reads it."""
        self.broken = True
        if self.transport.is_closing():
            return
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self.transport.resume_reading()
            self._arm(LINGER_SECONDS)
        else:
            self.transport.close()

    def _count_header_bytes(self, size: int) -> None:
        self._header_bytes += size
        if self._header_bytes > MAX_HEADER_BYTES:
            raise _fields_too_large(self.state)

    def _arm(self, seconds: float) -> None:
        """(Re)start the connection's one timer: when it runs out, the connection is closed, or, while a request
        is arriving, answered 408 in its turn."""
        self._disarm()
        self.timer = asyncio.get_running_loop().call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _expired(self) -> None:
        self.timer = None
        if self.broken or self.state == _IDLE:
            self.transport.abort()  # idle, or lingering after its last answer: nothing is lost
        else:
            late = f"The request did not arrive whole within {REQUEST_ARRIVAL_TIMEOUT:g} seconds of its first byte."
            self._finish(InvokeError(408, "RequestTimeout", late))


_UPGRADE = InvokeError(400, "ValidationError", "Protocol upgrades are not supported.")


def _fields_too_large(state: int) -> InvokeError:
    if state == _BODY:
        return InvokeError(400, "ValidationError", f"Chunk framing and trailer fields exceed {MAX_HEADER_BYTES} bytes.")
    return InvokeError(431, "ValidationError", f"Request headers exceed {MAX_HEADER_BYTES} bytes.")


def _too_large(what: str) -> InvokeError:
    return InvokeError(413, "ValidationError", f"{what} the maximum of {MAX_PAYLOAD_BYTES} bytes for InvokeEndpoint.")


def _error(error: InvokeError) -> tuple[int, list[tuple[str, str]], bytes]:
    # botocore reads the error code from this header, and the message from the body, as from AWS.
    headers = [("Content-Type", "application/json"), ("x-amzn-ErrorType", f"{error.code}:")]
    return error.status, headers, json.dumps({"message": error.message}).encode()


_REASONS = {status.value: status.phrase for status in http.HTTPStatus}


def _response(status: int, headers: list[tuple[str, str]], body: bytes | None, *, close: bool) -> bytes:
    """A response's bytes; without a ``body``, its head only, for a body sent chunked after it."""
    length = f"Content-Length: {len(body)}" if body is not None else "Transfer-Encoding: chunked"
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}", length, f"x-amzn-RequestId: {uuid.uuid4()}"]
    lines += [f"{name}: {value}" for name, value in headers]
    if close:
        lines.append("Connection: close")
    return "\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + (body or b"")
