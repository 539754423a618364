"""The local SageMaker endpoint: serves a model artifact through its own handler, as the SageMaker PyTorch
inference container does, and speaks the container contract (`GET /ping`, `POST /invocations`) and the
runtime API (`POST /endpoints/{EndpointName}/invocations`, so boto3's `sagemaker-runtime` client works through
`endpoint_url`).

    python -m inference.serve --model-dir DIR|model.tar.gz|s3://.../model.tar.gz [--host 127.0.0.1] [--port 8080]
        [--endpoint-name NAME] [--variant-name NAME] [--workers N] [--metrics-interval SECONDS | --no-metrics]

Several server processes (uvicorn workers, one per CPU by default) share the port, one torch thread each; the
handler runs in the event loop, so a request costs no thread hand-off, and the requests that arrive together
share one forward pass (see Endpoint). Each response carries a Server-Timing header (milliseconds reading the
request and in the handler). Invocation metrics go to CloudWatch (see inference.metrics).

Like the SageMaker container, the server knows nothing of the pipeline (no tasks/, no Airflow): S3 and CloudWatch
are reached through plain boto3 clients and the standard AWS environment (AWS_ENDPOINT_URL, or
AWS_ENDPOINT_URL_S3 and AWS_ENDPOINT_URL_CLOUDWATCH, for the local AWS; AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY and AWS_DEFAULT_REGION).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import json
import logging
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from inference.artifact import ArtifactError, load_handler, prepare_model_dir
from inference.metrics import DEFAULT_VARIANT

log = logging.getLogger(__name__)
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# InvokeEndpoint accepts at most 6 MB of payload.
MAX_BODY_BYTES = 6 * 1024 * 1024
SETTINGS_ENV = "MNIST_SERVE_SETTINGS"
JSON = "application/json"
RUNTIME_PATH = re.compile(r"/endpoints/([^/]+)/invocations")  # the sagemaker-runtime InvokeEndpoint API
# Requests of up to this many images share forward passes; larger ones run alone. From ALL_CORES_BATCH images on,
# a request is split between threads of one torch thread each, one per core: on two cores, two halves in two such
# threads computed 1,000 images sooner than one thread did, while torch's own two threads were slower even than
# one. bench/bench_endpoint.py times 1,000-image requests (bench/results/endpoint.json, `project.batch1000`).
SHARED_BATCH_MAX = 16
ALL_CORES_BATCH = 256
STARTUP_FAILURE = 3  # uvicorn's exit code for a worker that could not start (the app failed to load)


@dataclasses.dataclass(frozen=True)
class Settings:
    """What each server process needs to know; passed to uvicorn's worker processes as JSON in the environment."""

    model_dir: str
    endpoint_name: str = "local-endpoint"
    variant_name: str = DEFAULT_VARIANT
    metrics_port: int | None = None  # UDP port of the metrics collector; None: no metrics
    metrics_interval: float = 10.0


def server_command(
    model: str,
    port: int,
    host: str = "127.0.0.1",
    endpoint_name: str = "local-endpoint",
    workers: int | None = None,
    metrics_interval: float | None = 10.0,
    variant_name: str = DEFAULT_VARIANT,
) -> list[str]:
    """The command line that serves ``model`` (for starting the server as a detached process)."""
    command = [
        sys.executable,
        "-m",
        "inference.serve",
        "--model-dir",
        str(model),
        "--host",
        host,
        "--port",
        str(port),
        "--endpoint-name",
        endpoint_name,
        "--variant-name",
        variant_name,
    ]
    if workers:
        command += ["--workers", str(workers)]
    command += ["--no-metrics"] if metrics_interval is None else ["--metrics-interval", str(metrics_interval)]
    return command


class Endpoint:
    """The model behind the routes: the artifact's handler module and the model its model_fn loaded.

    Requests of a few images that arrive together share one predict_fn call: a request's images wait for the
    current turn of the event loop to end, so all the requests read in that turn run as one batch, and an idle
    server answers at once (no timer, no added latency). Batches grow with the load, and a batch costs far less
    per image than its images one by one; bench/bench_endpoint.py measures the rate at 64 connections
    (bench/results/endpoint.json, `project.c64`).
    """

    def __init__(self, model_dir: str, cpus: int = 1):
        import torch

        self.handler = load_handler(model_dir)
        self.model = self.handler.model_fn(model_dir)
        self.cpus = cpus
        self._torch = torch
        self._waiting: list[tuple[object, asyncio.Future]] = []
        self._threads = None

    async def invoke(self, body: bytes, content_type: str | None, accept: str | None) -> tuple[int, bytes, str]:
        """Run input_fn, predict_fn and output_fn; map a failure to an HTTP status and a JSON error."""
        handler = self.handler
        try:
            data = handler.input_fn(body, content_type)
            prediction = await self._predict(data)
            result = handler.output_fn(prediction, accept)
        except Exception as exc:
            status, message = _status_of(exc)
            return status, json.dumps({"error": message, "status": status}).encode(), JSON
        # As in the SageMaker toolkit: output_fn returns the body, or (body, content type).
        payload, response_type = result if isinstance(result, tuple) else (result, accept)
        if isinstance(payload, str):
            payload = payload.encode()
        if not response_type or response_type == "*/*":
            response_type = JSON
        return 200, payload, response_type

    async def _predict(self, data):
        torch = self._torch
        if not isinstance(data, torch.Tensor) or len(data) > SHARED_BATCH_MAX:
            return self._predict_now(data)
        loop = asyncio.get_running_loop()
        if not self._waiting:
            loop.call_soon(self._predict_waiting)
        future = loop.create_future()
        self._waiting.append((data, future))
        return await future

    def _predict_now(self, data):
        torch = self._torch
        if not (isinstance(data, torch.Tensor) and len(data) >= ALL_CORES_BATCH and self.cpus > 1):
            return self.handler.predict_fn(data, self.model)
        # A large batch alone is worth every core (the server's other requests wait for it either way): a part in
        # each thread, torch releasing the GIL while it computes. Threads of their own run independently, where
        # torch's would meet at a barrier after every operator.
        if self._threads is None:
            self._threads = ThreadPoolExecutor(self.cpus, thread_name_prefix="predict")
        parts = self._threads.map(lambda part: self.handler.predict_fn(part, self.model), data.chunk(self.cpus))
        return torch.cat(list(parts))

    def _predict_waiting(self) -> None:
        waiting, self._waiting = self._waiting, []
        try:
            if len(waiting) == 1:
                outputs = [self._predict_now(waiting[0][0])]
            else:
                batch = self._torch.cat([data for data, _ in waiting])
                outputs = self._predict_now(batch).split([len(data) for data, _ in waiting])
        except Exception as exc:  # each request answers it (a 500): the batch was all valid input
            outputs = [exc] * len(waiting)
        for (_, future), output in zip(waiting, outputs, strict=True):
            if future.cancelled():  # the client went away
                continue
            if isinstance(output, Exception):
                future.set_exception(output)
            else:
                future.set_result(output)


def _status_of(exc: Exception) -> tuple[int, str]:
    # The SageMaker toolkit answers a BaseInferenceToolkitError (status_code, message, phrase) with its status
    # code and anything else with 500; the handler's InvalidRequest is one. Duck-typed: the toolkit is not here.
    status = getattr(exc, "status_code", None)
    if isinstance(status, int) and 400 <= status < 600 and hasattr(exc, "phrase"):
        return status, str(getattr(exc, "message", exc))
    log.exception("the model handler failed")
    # The exception's text stays in the log: it may hold paths, data or secrets the client has no business seeing.
    return 500, f"the model handler failed ({type(exc).__name__}); the endpoint's log has the details"


class BodyTooLarge(Exception):
    pass


async def _read_body(headers: dict[bytes, bytes], receive) -> bytes:
    declared = headers.get(b"content-length", b"")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise BodyTooLarge
    chunks, size = [], 0
    while True:
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body"):  # also at http.disconnect: what came is all there is
            return b"".join(chunks)


async def _respond(send, status: int, body: bytes, content_type: str = JSON, headers: dict[str, str] | None = None):
    raw_headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
    raw_headers += [(name.encode(), value.encode()) for name, value in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


def _error(status: int, message: str) -> bytes:
    return json.dumps({"error": message, "status": status}).encode()


def create_app(settings: Settings):
    """The ASGI application of one server process (loads the model at once).

    A bare ASGI callable rather than a Starlette app: three fixed routes need no router, and Starlette's
    request, response and middleware objects cost a sizeable share of each single-image request, whose rate
    bench/bench_endpoint.py measures (bench/results/endpoint.json, `project.c8`)."""
    import torch

    from inference.metrics import StatsSender
    from training.memory import keep_freed_memory

    # Each process runs one torch thread. On a machine shared with other work, a second OpenMP thread that gets
    # preempted stalls every operator at its barrier, which made the server about an order of magnitude slower
    # under load.
    torch.set_num_threads(1)
    endpoint = Endpoint(settings.model_dir, cpus=len(os.sched_getaffinity(0)))
    # Keep the model and the libraries out of every garbage collection. Otherwise the many short-lived objects of a
    # large request set off full collections that walk them all, which made 1,000-image requests markedly slower
    # and their times erratic.
    gc.freeze()
    keep_freed_memory()
    metrics = StatsSender(settings.metrics_port, settings.metrics_interval)
    too_large = _error(413, f"request body larger than {MAX_BODY_BYTES} bytes (6 MB)")
    healthy = json.dumps({"status": "Healthy"}).encode()

    async def invoke(headers: dict[bytes, bytes], receive) -> tuple[int, bytes, str, dict[str, str]]:
        """Read the body and run the handler: status, payload, content type and a Server-Timing header (the
        milliseconds spent reading the request and in the handler, for clients and benchmarks)."""
        started = time.perf_counter()
        try:
            body = await _read_body(headers, receive)
        except BodyTooLarge:  # refused before it reaches the model: no ModelLatency
            metrics.record(413, None, (time.perf_counter() - started) * 1e6)
            return 413, too_large, JSON, {}
        model_started = time.perf_counter()
        content_type, accept = headers.get(b"content-type"), headers.get(b"accept")
        status, payload, response_type = await endpoint.invoke(
            body, content_type and content_type.decode("latin-1"), accept and accept.decode("latin-1")
        )
        finished = time.perf_counter()
        model_us = (finished - model_started) * 1e6
        metrics.record(status, model_us, (finished - started) * 1e6 - model_us)
        timing = f"read;dur={(model_started - started) * 1e3:.3f}, handler;dur={model_us / 1e3:.3f}"
        return status, payload, response_type, {"Server-Timing": timing}

    async def runtime_invocations(name: str, headers: dict[bytes, bytes], receive, send) -> None:
        """The sagemaker-runtime InvokeEndpoint API; a model error becomes a ModelError as AWS returns it."""
        if name != settings.endpoint_name:
            message = f"Endpoint {name} not found (this server is {settings.endpoint_name})."
            return await _respond(
                send, 400, json.dumps({"message": message}).encode(), headers={"x-amzn-ErrorType": "ValidationError"}
            )
        status, payload, content_type, timing = await invoke(headers, receive)
        if status == 200:
            return await _respond(
                send, 200, payload, content_type, {"x-Amzn-Invoked-Production-Variant": settings.variant_name, **timing}
            )
        original = json.loads(payload)["error"]
        error = {
            "message": f"Received {'client' if status < 500 else 'server'} error ({status}) from model with "
            f'message "{original}".',
            "OriginalStatusCode": status,
            "OriginalMessage": original,
            "LogStreamArn": f"local:{settings.endpoint_name}",
        }
        await _respond(send, 424, json.dumps(error).encode(), headers={"x-amzn-ErrorType": "ModelError"})

    async def lifespan(receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                metrics.start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await metrics.stop()
                return await send({"type": "lifespan.shutdown.complete"})

    async def app(scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            return await lifespan(receive, send)
        if scope["type"] != "http":
            return None
        path, method = scope["path"], scope["method"]
        if path == "/ping":
            if method not in ("GET", "HEAD"):
                return await _respond(send, 405, _error(405, f"{method} /ping: use GET"), headers={"Allow": "GET"})
            return await _respond(send, 200, healthy)
        runtime = RUNTIME_PATH.fullmatch(path)
        if path != "/invocations" and runtime is None:
            message = f"no route {path}: POST /invocations or /endpoints/{settings.endpoint_name}/invocations"
            return await _respond(send, 404, _error(404, message))
        if method != "POST":
            return await _respond(send, 405, _error(405, f"{method} {path}: use POST"), headers={"Allow": "POST"})
        headers = dict(scope["headers"])  # ASGI gives the names in lower case
        if runtime is not None:
            return await runtime_invocations(runtime[1], headers, receive, send)
        status, payload, content_type, timing = await invoke(headers, receive)
        await _respond(send, status, payload, content_type, timing)

    return app


def app_from_env():
    """uvicorn's app factory in each worker process. A model that cannot be loaded exits with uvicorn's
    STARTUP_FAILURE, so that the supervisor stops rather than restarting workers that would fail alike."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)  # a fresh interpreter: the handler's notes too
    try:
        return create_app(Settings(**json.loads(os.environ[SETTINGS_ENV])))
    except Exception:
        log.exception("cannot load the model")
        sys.exit(STARTUP_FAILURE)


def serve(
    model: str,
    host: str = "127.0.0.1",
    port: int = 8080,
    endpoint_name: str = "local-endpoint",
    workers: int | None = None,
    metrics_interval: float | None = 10.0,
    variant_name: str = DEFAULT_VARIANT,
) -> int:
    """Serve ``model`` (a model directory, a model.tar.gz or an s3:// URI of one) until SIGTERM or SIGINT;
    return the exit status. ``metrics_interval``: the longest that invocation metrics wait before they are
    published to CloudWatch, and the period of the CPU and memory samples; None publishes none. On SIGTERM the
    counts not yet published are published first, if CloudWatch answers within a second."""
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    from inference.metrics import MetricsPublisher

    workers = workers or len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(prefix="mnist-serve-") as workdir:
        try:
            model_dir = prepare_model_dir(model, workdir)
        except ArtifactError as exc:
            log.error("cannot serve %s: %s", model, exc)
            return 2
        publisher = None
        if metrics_interval is not None:
            publisher = MetricsPublisher(endpoint_name, variant_name, metrics_interval)
            publisher.start()
        settings = Settings(
            model_dir=str(model_dir),
            endpoint_name=endpoint_name,
            variant_name=variant_name,
            metrics_port=publisher.port if publisher else None,
            metrics_interval=metrics_interval or 10.0,
        )
        os.environ[SETTINGS_ENV] = json.dumps(dataclasses.asdict(settings))
        config = uvicorn.Config(
            "inference.serve:app_from_env",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            http="httptools",
            loop="uvloop",
            access_log=False,
            log_level="warning",
        )
        log.info(
            "serving %s as endpoint %s on http://%s:%d with %d process(es)", model, endpoint_name, host, port, workers
        )
        try:
            if workers == 1:
                server = uvicorn.Server(config)
                server.run()
                started = server.started
            else:
                supervisor = Multiprocess(config, sockets=[config.bind_socket()])
                supervisor.run()
                started = all(process.exitcode != STARTUP_FAILURE for process in supervisor.processes)
        finally:
            if publisher:
                publisher.stop()
    return 0 if started else 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The server's options, for `python -m inference.serve` and `mnist-pipeline serve` alike."""
    parser.add_argument("--model-dir", required=True, help="model directory, model.tar.gz, or s3:// URI of one")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--endpoint-name", default="local-endpoint", help="EndpointName dimension of the metrics")
    parser.add_argument(
        "--variant-name", default=DEFAULT_VARIANT, help="the production variant it serves (metrics, response header)"
    )
    parser.add_argument("--workers", type=int, default=None, help="server processes (default: from the CPUs)")
    parser.add_argument(
        "--metrics-interval",
        type=float,
        default=10.0,
        help="seconds between CloudWatch puts under sustained load (the end of a burst is published at once)",
    )
    parser.add_argument("--no-metrics", action="store_true", help="publish no metrics to CloudWatch")


def serve_command(args: argparse.Namespace) -> int:
    """`python -m inference.serve` and `mnist-pipeline serve` (arguments from add_arguments)."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    return serve(
        args.model_dir,
        host=args.host,
        port=args.port,
        endpoint_name=args.endpoint_name,
        workers=args.workers,
        metrics_interval=None if args.no_metrics else args.metrics_interval,
        variant_name=args.variant_name,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m inference.serve", description="serve a model the SageMaker way")
    add_arguments(parser)
    return serve_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
