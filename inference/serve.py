"""The local SageMaker endpoint: serves a model artifact through its own handler, as the SageMaker PyTorch
inference container does, and speaks the container contract (`GET /ping`, `POST /invocations`) and the
runtime API (`POST /endpoints/{EndpointName}/invocations`, so boto3's `sagemaker-runtime` client works through
`endpoint_url`).

    python -m inference.serve --model-dir DIR|model.tar.gz|s3://.../model.tar.gz [--host 127.0.0.1] [--port 8080]
        [--endpoint-name NAME] [--workers N] [--metrics-interval SECONDS | --no-metrics]

Several server processes (uvicorn workers, one per CPU by default) share the port, one torch thread each; the
handler runs in the event loop, so a request costs no thread hand-off. Invocation metrics go to CloudWatch (see inference.metrics).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
import tempfile
import time

from inference.artifact import ArtifactError, load_handler, prepare_model_dir
from inference.metrics import DEFAULT_VARIANT

log = logging.getLogger(__name__)

# InvokeEndpoint accepts at most 6 MB of payload.
MAX_BODY_BYTES = 6 * 1024 * 1024
SETTINGS_ENV = "MNIST_SERVE_SETTINGS"
JSON = "application/json"
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
) -> list[str]:
    """The command line that serves ``model`` (for starting the server as a detached process)."""
    command = [sys.executable, "-m", "inference.serve", "--model-dir", str(model), "--host", host,
               "--port", str(port), "--endpoint-name", endpoint_name]  # fmt: skip
    if workers:
        command += ["--workers", str(workers)]
    command += ["--no-metrics"] if metrics_interval is None else ["--metrics-interval", str(metrics_interval)]
    return command


class Endpoint:
    """The model behind the routes: the artifact's handler module and the model its model_fn loaded."""

    def __init__(self, model_dir: str):
        self.handler = load_handler(model_dir)
        self.model = self.handler.model_fn(model_dir)

    def invoke(self, body: bytes, content_type: str | None, accept: str | None) -> tuple[int, bytes, str]:
        """Run input_fn, predict_fn and output_fn; map a failure to an HTTP status and a JSON error."""
        handler = self.handler
        try:
            data = handler.input_fn(body, content_type)
            prediction = handler.predict_fn(data, self.model)
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


def _status_of(exc: Exception) -> tuple[int, str]:
    # The SageMaker toolkit answers a BaseInferenceToolkitError (status_code, message, phrase) with its status
    # code and anything else with 500; the handler's InvalidRequest is one. Duck-typed: the toolkit is not here.
    status = getattr(exc, "status_code", None)
    if isinstance(status, int) and 400 <= status < 600 and hasattr(exc, "phrase"):
        return status, str(getattr(exc, "message", exc))
    log.exception("the model handler failed")
    return 500, f"the model handler failed: {type(exc).__name__}: {exc}"


class BodyTooLarge(Exception):
    pass


async def _read_body(request) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise BodyTooLarge
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(settings: Settings):
    """The Starlette application of one server process (loads the model at once)."""
    import torch
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    from inference.metrics import StatsSender

    # One thread per process: on a machine shared with other work, a second OpenMP thread that gets preempted
    # stalls every operator at its barrier (measured here: 117 instead of ~1,000 requests/s under load).
    torch.set_num_threads(1)
    endpoint = Endpoint(settings.model_dir)
    metrics = StatsSender(settings.metrics_port, settings.metrics_interval)
    too_large = json.dumps({"error": f"request body larger than {MAX_BODY_BYTES} bytes (6 MB)", "status": 413})

    async def invoke(request) -> tuple[int, bytes, str]:
        started = time.perf_counter()
        try:
            body = await _read_body(request)
        except BodyTooLarge:  # refused before it reaches the model: no ModelLatency
            metrics.record(413, None, (time.perf_counter() - started) * 1e6)
            return 413, too_large.encode(), JSON
        model_started = time.perf_counter()
        headers = request.headers
        status, payload, content_type = endpoint.invoke(body, headers.get("content-type"), headers.get("accept"))
        finished = time.perf_counter()
        model_us = (finished - model_started) * 1e6
        metrics.record(status, model_us, (finished - started) * 1e6 - model_us)
        return status, payload, content_type

    async def ping(request):
        return JSONResponse({"status": "Healthy"})

    async def invocations(request):
        status, payload, content_type = await invoke(request)
        return Response(payload, status_code=status, media_type=content_type)

    async def runtime_invocations(request):
        """The sagemaker-runtime InvokeEndpoint API; a model error becomes a ModelError as AWS returns it."""
        name = request.path_params["endpoint_name"]
        if name != settings.endpoint_name:
            message = f"Endpoint {name} not found (this server is {settings.endpoint_name})."
            return JSONResponse({"message": message}, 400, headers={"x-amzn-ErrorType": "ValidationError"})
        status, payload, content_type = await invoke(request)
        if status == 200:
            return Response(payload, media_type=content_type,
                            headers={"x-Amzn-Invoked-Production-Variant": settings.variant_name})  # fmt: skip
        original = json.loads(payload)["error"]
        error = {"message": f"Received {'client' if status < 500 else 'server'} error ({status}) from model with "
                            f"message \"{original}\".",
                 "OriginalStatusCode": status, "OriginalMessage": original,
                 "LogStreamArn": f"local:{settings.endpoint_name}"}  # fmt: skip
        return JSONResponse(error, 424, headers={"x-amzn-ErrorType": "ModelError"})

    @contextlib.asynccontextmanager
    async def lifespan(app):
        metrics.start()
        yield
        await metrics.stop()

    routes = [
        Route("/ping", ping, methods=["GET"]),
        Route("/invocations", invocations, methods=["POST"]),
        Route("/endpoints/{endpoint_name}/invocations", runtime_invocations, methods=["POST"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


def app_from_env():
    """uvicorn's app factory in each worker process. A model that cannot be loaded exits with uvicorn's
    STARTUP_FAILURE, so that the supervisor stops rather than restarting workers that would fail alike."""
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
    aws_conn_id: str | None = None,
) -> int:
    """Serve ``model`` until SIGTERM or SIGINT; return the exit status. ``aws_conn_id`` (default: the pipeline's)
    reaches S3 for an s3:// model and CloudWatch for the metrics; ``metrics_interval`` None publishes none."""
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    from inference.metrics import MetricsPublisher

    workers = workers or len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(prefix="mnist-serve-") as workdir:
        try:
            model_dir = prepare_model_dir(model, workdir, aws_conn_id)
        except ArtifactError as exc:
            log.error("cannot serve %s: %s", model, exc)
            return 2
        publisher = None
        if metrics_interval is not None:
            publisher = MetricsPublisher(endpoint_name, DEFAULT_VARIANT, aws_conn_id, metrics_interval)
            publisher.start()
        settings = Settings(
            model_dir=str(model_dir),
            endpoint_name=endpoint_name,
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
        log.info("serving %s as endpoint %s on http://%s:%d with %d process(es)", model, endpoint_name, host,
                 port, workers)  # fmt: skip
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


def serve_command(args: argparse.Namespace) -> int:
    """`mnist-pipeline serve` (arguments in tasks/cli.py), also `python -m inference.serve`."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return serve(
        args.model_dir,
        host=args.host,
        port=args.port,
        endpoint_name=args.endpoint_name,
        workers=args.workers,
        metrics_interval=None if args.no_metrics else args.metrics_interval,
    )


if __name__ == "__main__":
    from tasks.cli import main

    sys.exit(main(["serve", *sys.argv[1:]]))
