"""How a request reaches a model server: over kept-alive HTTP/1.1 connections, by server URL, one request at a time
on each; the runtime's invocations, asynchronous inference and transform jobs all send theirs this way.

Like the runtime's side that faces the clients (local_sagemaker.runtime), this side speaks HTTP/1.1 through
httptools' parser on a plain asyncio protocol: every invocation passes here.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import urllib.parse

import httptools

FORWARD_TIMEOUT = 60.0  # SageMaker's own limit for a real-time invocation
CONNECT_TIMEOUT = 5.0


@dataclasses.dataclass
class Reply:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes


class _Upstream(asyncio.Protocol):
    """One kept-alive connection to a model server, one request at a time."""

    def __init__(self):
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.reply: asyncio.Future | None = None
        self.answered = False  # whether any byte of an answer to the current request has arrived
        self.closed = False
        # Where a 2xx answer goes as it arrives, when the caller streams it: ("head", status, headers), then each
        # piece of its body, then None; the reply resolves at the end, as ever.
        self.stream: asyncio.Queue | None = None
        self._streaming = False
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.answered = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as error:
            self._fail(ConnectionError(f"the model server's answer is not HTTP: {error}"))

    def on_message_begin(self) -> None:
        self._headers, self._body, self._streaming = {}, [], False

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if self.stream is not None and 200 <= status < 300:
            self._streaming = True
            self.stream.put_nowait(("head", status, self._headers))

    def on_body(self, body: bytes) -> None:
        if self._streaming:
            self.stream.put_nowait(body)
        else:
            self._body.append(body)

    def on_message_complete(self) -> None:
        if self._streaming:
            self.stream.put_nowait(None)
        reply, self.reply = self.reply, None
        if not self.parser.should_keep_alive():
            self.closed = True
            self.transport.close()
        if reply is not None and not reply.done():
            reply.set_result(Reply(self.parser.get_status_code(), self._headers, b"".join(self._body)))

    def connection_lost(self, exc) -> None:
        self.closed = True
        self._fail(ConnectionResetError("the model server closed the connection"))

    def _fail(self, error: Exception) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()
        reply, self.reply = self.reply, None
        if reply is not None and not reply.done():
            reply.set_exception(error)


class Upstreams:
    """Kept-alive connections to the model servers, by server URL; each carries one request at a time."""

    def __init__(self):
        self._idle: dict[str, list[_Upstream]] = collections.defaultdict(list)
        self._addresses: dict[str, tuple[str, int, bytes]] = {}

    async def send(
        self, url: str, head: bytes, body: bytes, timeout: float = FORWARD_TIMEOUT, stream: asyncio.Queue | None = None
    ) -> Reply:
        """``head``: the request line and headers up to (not including) Host and Content-Length; ``timeout``: the
        seconds an answer may take (InvokeEndpoint's limit unless the caller has its own, as transform jobs do);
        ``stream``: where a 2xx answer goes as it arrives (_Upstream.stream), its reply's body then empty."""
        host, port, host_header = self._address(url)
        data = b"".join((head, host_header, b"\r\nContent-Length: ", str(len(body)).encode(), b"\r\n\r\n", body))
        for attempt in range(2):
            upstream, reused = self._take(url), True
            if upstream is None:
                upstream, reused = await self._connect(host, port), False
            loop = asyncio.get_running_loop()
            upstream.reply, upstream.answered, upstream.stream = loop.create_future(), False, stream
            upstream.transport.write(data)
            timer = loop.call_later(timeout, upstream._fail, TimeoutError(f"no answer in {timeout:g} s"))
            try:
                reply = await upstream.reply
            except ConnectionResetError:
                # A kept-alive connection the server closed as this request went out (its idle timeout): the
                # server never saw the request, so it goes once more, on a new connection.
                if reused and attempt == 0 and not upstream.answered:
                    continue
                raise
            finally:
                timer.cancel()
                upstream.stream = None
            if not upstream.closed:
                self._idle[url].append(upstream)
            return reply
        raise AssertionError("unreachable")

    def close(self) -> None:
        for connections in self._idle.values():
            for upstream in connections:
                upstream.transport.close()
        self._idle.clear()

    def _take(self, url: str) -> _Upstream | None:
        connections = self._idle.get(url)
        while connections:
            upstream = connections.pop()
            if not upstream.closed and not upstream.transport.is_closing():
                return upstream
        return None

    async def _connect(self, host: str, port: int) -> _Upstream:
        loop = asyncio.get_running_loop()
        _, upstream = await asyncio.wait_for(loop.create_connection(_Upstream, host, port), timeout=CONNECT_TIMEOUT)
        return upstream

    def _address(self, url: str) -> tuple[str, int, bytes]:
        address = self._addresses.get(url)
        if address is None:
            parts = urllib.parse.urlsplit(url)
            address = (parts.hostname, parts.port or 80, f"Host: {parts.netloc}".encode())
            self._addresses[url] = address
        return address
