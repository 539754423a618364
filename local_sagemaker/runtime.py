"""InvokeEndpoint: the runtime API in front of every endpoint's model servers.

boto3's ``sagemaker-runtime`` client sends ``POST /endpoints/{EndpointName}/invocations`` here; the request goes
on to one of the servers that serve the endpoint now, picked by weight (or by the ``X-Amzn-SageMaker-Target-Variant``
header), over kept-alive connections. The routes live in this process, so a blue/green switch is one assignment:
no request can pick the old fleet after it, and the per-server count of requests in flight tells the switch when the
old fleet has drained. Every answer is also a sample (status, model and overhead latency) for the alarms that guard
a deployment (local_sagemaker.alarms).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import random
import re
import time

import aiohttp
from aiohttp import web

# InvokeEndpoint accepts at most 6 MB of payload.
MAX_PAYLOAD_BYTES = 6 * 1024 * 1024
FORWARD_TIMEOUT = 60.0  # SageMaker's own limit for a real-time invocation
# Request headers the SageMaker runtime passes to the container, and response headers it passes back.
FORWARDED_REQUEST_HEADERS = ("Content-Type", "Accept", "X-Amzn-SageMaker-Custom-Attributes")
RETURNED_RESPONSE_HEADERS = ("Content-Type", "X-Amzn-SageMaker-Custom-Attributes", "Server-Timing")
TARGET_VARIANT = "X-Amzn-SageMaker-Target-Variant"
MODEL_ERROR = 424  # InvokeEndpoint's status when the container answered an error
HANDLER_TIMING = re.compile(r"handler;dur=([0-9.]+)")
SAMPLES_KEPT = 100_000  # per server: enough for any alarm period at local request rates


@dataclasses.dataclass(frozen=True)
class Target:
    """One model server and the share of its endpoint's traffic it takes."""

    url: str
    variant: str
    config: str
    weight: float


@dataclasses.dataclass
class Sample:
    at: float  # time.time()
    status: int
    model_us: float | None
    overhead_us: float


class Router:
    """Endpoint name → its targets; requests in flight and answers seen, per server."""

    def __init__(self):
        self.routes: dict[str, tuple[Target, ...]] = {}
        self.in_flight: collections.Counter[str] = collections.Counter()
        self.samples: dict[str, collections.deque[Sample]] = collections.defaultdict(
            lambda: collections.deque(maxlen=SAMPLES_KEPT)
        )

    def set(self, endpoint: str, targets: list[Target]) -> None:
        self.routes[endpoint] = tuple(target for target in targets if target.weight > 0)

    def remove(self, endpoint: str) -> None:
        self.routes.pop(endpoint, None)

    def idle(self, urls: set[str]) -> bool:
        return not any(self.in_flight[url] for url in urls)

    def pick(self, endpoint: str, variant: str | None) -> Target | None:
        targets = self.routes.get(endpoint)
        if not targets:
            return None
        if variant:
            targets = tuple(target for target in targets if target.variant == variant)
            if not targets:
                return None
        if len(targets) == 1:
            return targets[0]
        return random.choices(targets, weights=[target.weight for target in targets])[0]

    def samples_since(self, urls: set[str], since: float) -> list[Sample]:
        return [sample for url in urls for sample in list(self.samples.get(url, ())) if sample.at >= since]


def _error(status: int, code: str, message: str) -> web.Response:
    # botocore reads the error code from this header, and the message from the body, as from AWS.
    return web.json_response({"message": message}, status=status, headers={"x-amzn-ErrorType": f"{code}:"})


def add_routes(app: web.Application, router: Router, account: str, region: str) -> None:
    """InvokeEndpoint on ``app``; the forwarding client session lives as long as the app."""

    async def client_session(app: web.Application):
        # No pool limit: a request never waits here for a connection while the model server could take it.
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=60)
        timeout = aiohttp.ClientTimeout(total=FORWARD_TIMEOUT, connect=5)
        app["runtime_session"] = aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False)
        yield
        await app["runtime_session"].close()

    async def invoke(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if request.content_length is not None and request.content_length > MAX_PAYLOAD_BYTES:
            return _error(413, "ValidationError", f"Request payload of {request.content_length} bytes exceeds "
                          f"the maximum of {MAX_PAYLOAD_BYTES} bytes for InvokeEndpoint.")  # fmt: skip
        target = router.pick(name, request.headers.get(TARGET_VARIANT))
        if target is None:
            if request.headers.get(TARGET_VARIANT) and router.routes.get(name):
                return _error(400, "ValidationError", f"Variant {request.headers[TARGET_VARIANT]} not found for "
                              f"endpoint {name}.")  # fmt: skip
            return _error(400, "ValidationError", f"Endpoint {name} of account {account} not found.")
        started = time.perf_counter()
        router.in_flight[target.url] += 1
        try:
            # The whole body (the declared length was checked above; a chunked one is bounded by the app's limit).
            body = await request.read()
            if len(body) > MAX_PAYLOAD_BYTES:
                return _error(413, "ValidationError", f"Request payload exceeds the maximum of {MAX_PAYLOAD_BYTES} "
                              "bytes for InvokeEndpoint.")  # fmt: skip
            headers = {key: request.headers[key] for key in FORWARDED_REQUEST_HEADERS if key in request.headers}
            async with request.app["runtime_session"].post(
                f"{target.url}/endpoints/{name}/invocations", data=body, headers=headers
            ) as reply:
                content = await reply.read()
                status = reply.status
                returned = {key: reply.headers[key] for key in RETURNED_RESPONSE_HEADERS if key in reply.headers}
                error_type = reply.headers.get("x-amzn-ErrorType")
        except (aiohttp.ClientError, TimeoutError) as error:
            status = 503
            router.samples[target.url].append(Sample(time.time(), status, None, _us(started)))
            return _error(503, "ServiceUnavailable", f"Endpoint {name}: its model server did not answer: "
                          f"{type(error).__name__}")  # fmt: skip
        finally:
            router.in_flight[target.url] -= 1
        total_us = _us(started)
        timing = HANDLER_TIMING.search(returned.get("Server-Timing", ""))
        model_us = float(timing.group(1)) * 1000 if timing else None
        # The metrics count what the container answered: a ModelError (424) carries the container's own status.
        counted = _original_status(content) if status == MODEL_ERROR else status
        router.samples[target.url].append(Sample(time.time(), counted, model_us, total_us - (model_us or 0)))
        returned["x-Amzn-Invoked-Production-Variant"] = target.variant
        if status >= 400 and error_type:
            returned["x-amzn-ErrorType"] = error_type
        return web.Response(body=content, status=status, headers=returned)

    app.cleanup_ctx.append(client_session)
    app.router.add_post("/endpoints/{name}/invocations", invoke)


def _original_status(content: bytes) -> int:
    try:
        return int(json.loads(content)["OriginalStatusCode"])
    except (ValueError, KeyError, TypeError):
        return MODEL_ERROR


def _us(started: float) -> float:
    return (time.perf_counter() - started) * 1e6
