"""The local SageMaker runtime: one stable address for every local endpoint, whatever server serves it now.

Clients call it as they call AWS: boto3's `sagemaker-runtime` client with `endpoint_url` set to this gateway,
`invoke_endpoint(EndpointName=...)` → `POST /endpoints/{name}/invocations`, forwarded to the endpoint's current
model server (`python -m inference.serve`). Routes come from the endpoint records that `tasks.local_endpoints`
writes; `POST /_local/reload` makes the gateway re-read them. Blue/green without a failed request: the gateway
counts requests in flight per server, so the manager switches the route, reloads, waits until the old server has
nothing in flight here, and only then stops it. Routing and counting happen with no `await` in between, so no
request can pick the old server after the reload.

Run as `python -m tasks.local_runtime --state-dir DIR --port N` (tasks.local_endpoints starts it detached).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
from pathlib import Path

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

# Request headers the SageMaker runtime passes to the container, and response headers it passes back.
_FORWARDED_REQUEST_HEADERS = ("content-type", "accept", "x-amzn-sagemaker-custom-attributes")
_RETURNED_RESPONSE_HEADERS = (
    "content-type",
    "x-amzn-errortype",
    "x-amzn-invoked-production-variant",
    "x-amzn-sagemaker-custom-attributes",
)


def read_routes(endpoints_dir: Path) -> dict[str, str]:
    """Endpoint name → URL of the model server that serves it now, from the records in ``endpoints_dir``."""
    routes = {}
    for path in endpoints_dir.glob("*.json"):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):  # a record deleted between the listing and the read
            continue
        routes[record["endpoint_name"]] = record["url"]
    return routes


def _error(status: int, error_type: str, message: str) -> JSONResponse:
    # botocore reads the error code from this header: boto3 raises ClientError with it, as against AWS.
    return JSONResponse({"message": message}, status_code=status, headers={"x-amzn-ErrorType": error_type})


def create_app(endpoints_dir: Path) -> Starlette:
    routes = read_routes(endpoints_dir)
    in_flight: collections.Counter[str] = collections.Counter()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        # No pool limit: a request never waits here for a connection while the model server could take it.
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
        async with httpx.AsyncClient(timeout=httpx.Timeout(60.0, connect=5.0), limits=limits) as client:
            app.state.client = client
            yield

    async def invoke(request: Request) -> Response:
        name = request.path_params["name"]
        server = routes.get(name)
        if server is None:
            return _error(400, "ValidationError", f"Endpoint {name} not found.")
        in_flight[server] += 1
        try:
            headers = {key: request.headers[key] for key in _FORWARDED_REQUEST_HEADERS if key in request.headers}
            reply = await request.app.state.client.post(
                f"{server}/endpoints/{name}/invocations", content=await request.body(), headers=headers
            )
        except httpx.HTTPError as error:
            return _error(503, "ServiceUnavailable", f"endpoint {name}: model server {server} failed: {error!r}")
        finally:
            in_flight[server] -= 1
        headers = {key: reply.headers[key] for key in _RETURNED_RESPONSE_HEADERS if key in reply.headers}
        return Response(reply.content, status_code=reply.status_code, headers=headers)

    def status() -> dict:
        return {"routes": routes, "in_flight": {server: n for server, n in in_flight.items() if n}}

    async def reload(request: Request) -> JSONResponse:
        routes.clear()
        routes.update(read_routes(endpoints_dir))
        return JSONResponse(status())

    async def show_status(request: Request) -> JSONResponse:
        return JSONResponse(status())

    async def ping(request: Request) -> Response:
        return Response(status_code=200)

    return Starlette(
        routes=[
            Route("/endpoints/{name}/invocations", invoke, methods=["POST"]),
            Route("/ping", ping, methods=["GET"]),
            Route("/_local/status", show_status, methods=["GET"]),
            Route("/_local/reload", reload, methods=["POST"]),
        ],
        lifespan=lifespan,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoints-dir", required=True, help="where tasks.local_endpoints keeps endpoint records")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    uvicorn.run(
        create_app(Path(args.endpoints_dir)), host=args.host, port=args.port, log_level="warning", access_log=False
    )


if __name__ == "__main__":
    main()
