"""Local SageMaker endpoints: CreateEndpoint / UpdateEndpoint / DescribeEndpoint / DeleteEndpoint on this machine.

Each endpoint is a model server (`python -m inference.serve`, the SageMaker container contract) running detached
(its own session, so it outlives the Airflow task that started it), bound to 127.0.0.1 on a port of its own.
Clients never see those ports: they reach every endpoint through the local runtime (tasks.local_runtime), one
stable address that boto3's `sagemaker-runtime` client uses as `endpoint_url`, as it would use AWS.

State lives under `load_config().state_dir`: `endpoints/<name>.json` per endpoint (server URL, pid, model, endpoint
config, and the previous config for rollback), `local-runtime.json` for the runtime, `endpoints/logs/` for server
logs. Every change to an endpoint holds that endpoint's lock file, so concurrent tasks cannot interleave.

An update is blue/green: start the new server, wait for `/ping`, switch the route, wait until the runtime has no
request in flight to the old server, then stop it — no request fails during the switch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from tasks.config import PipelineConfig, load_config
from tasks.local_aws import free_port
from tasks.stack import live_process, stop_processes

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
VARIANT_NAME = "AllTraffic"  # the variant name SageMaker gives a single-variant endpoint config
# SageMaker's own rule for endpoint names; it also keeps the name safe as a file name here.
ENDPOINT_NAME_PATTERN = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")
# Longer than the runtime's forwarding timeout: a request still in flight after this has failed already.
DRAIN_TIMEOUT = 65.0
SERVER_START_TIMEOUT = 120.0
# What an endpoint serves: kept for each endpoint, and of the config before it, for rollback.
SERVER_KEYS = ("endpoint_config_name", "model_data_url", "workers", "metrics_interval")


class EndpointNotFound(LookupError):
    pass


@dataclasses.dataclass(frozen=True)
class _Paths:
    state_dir: Path

    @property
    def endpoints(self) -> Path:
        return self.state_dir / "endpoints"

    @property
    def logs(self) -> Path:
        return self.endpoints / "logs"

    @property
    def runtime(self) -> Path:
        return self.state_dir / "local-runtime.json"

    def record(self, name: str) -> Path:
        return self.endpoints / f"{name}.json"

    def lock(self, name: str) -> Path:
        return self.endpoints / f"{name}.lock"


def _paths(config: PipelineConfig) -> _Paths:
    paths = _Paths(Path(config.state_dir))
    paths.logs.mkdir(parents=True, exist_ok=True)
    return paths


def _check_name(endpoint_name: str) -> str:
    if not ENDPOINT_NAME_PATTERN.match(endpoint_name or ""):
        raise ValueError(
            f"endpoint name {endpoint_name!r} is invalid: 1-63 letters, digits and hyphens, starting and ending "
            "with a letter or digit"
        )
    return endpoint_name


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes, even if this process dies
        yield


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def _write(path: Path, record: dict) -> None:
    # Write, then rename: the runtime reads records without the lock and must never see half a file.
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, path)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _not_found(endpoint_name: str, paths: _Paths) -> EndpointNotFound:
    return EndpointNotFound(f"Could not find local endpoint {endpoint_name!r} (records in {paths.endpoints})")


# --- detached servers -----------------------------------------------------------------------------------------------


def _child_env(config: PipelineConfig) -> dict[str, str]:
    """The environment of a detached server: this configuration and the AWS connection, which a process outside
    an Airflow task could not look up otherwise (in a task, connections come through the task's supervisor)."""
    env = dict(os.environ)
    # A task's supervisor hides the metadata database behind a placeholder URL that makes `import airflow` fail;
    # the server is no task (it imports airflow for the S3 hook), so it gets the deployment's own setting back.
    for key in ("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "AIRFLOW__CORE__SQL_ALCHEMY_CONN"):
        if env.get(key, "").startswith("airflow-db-not-allowed"):
            del env[key]
    env.update({f"MNIST_PIPELINE_{key.upper()}": str(value) for key, value in dataclasses.asdict(config).items()})
    conn_var = f"AIRFLOW_CONN_{config.aws_conn_id.upper()}"
    if conn_var not in env:
        from airflow.sdk import BaseHook

        try:
            env[conn_var] = BaseHook.get_connection(config.aws_conn_id).as_json()
        except Exception as error:  # whatever the secrets backend raises: the server can run without it
            log.warning("Connection %s not passed to the model server (%s): it cannot read S3 or publish metrics",
                        config.aws_conn_id, error)  # fmt: skip
    return env


def _log_tail(path: str, lines: int = 30) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    return ""


def _launch(command: list[str], port: int, log_path: Path, env: dict[str, str], timeout: float, what: str) -> dict:
    """Start a detached server on 127.0.0.1:``port``; return its record (pid, start time, log, url) once it
    answers 200 on /ping. When it exits first or time runs out, stop it and fail with the end of its log."""
    import psutil

    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(
            command,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
    # The start time tells this process apart from a later one that reuses its pid.
    record = {
        "pid": process.pid,
        "started": psutil.Process(process.pid).create_time(),
        "log": str(log_path),
        "url": f"http://{HOST}:{port}",
    }
    try:
        _wait_ready(process, record["url"], timeout)
    except BaseException as error:  # also when this task is killed meanwhile: leave no unrecorded server behind
        _stop(record)
        if isinstance(error, Exception):
            raise RuntimeError(f"{what} {error}; its log ends:\n{_log_tail(record['log'])}") from None
        raise
    return record


def _wait_ready(process: subprocess.Popen, url: str, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(httpx.HTTPError):
            # Still running after it answered: the answer came from it, not from another server on that port.
            if httpx.get(f"{url}/ping", timeout=2).status_code == 200 and process.poll() is None:
                return
        if process.poll() is not None:
            raise RuntimeError(f"exited with status {process.returncode} before answering /ping")
        if time.monotonic() > deadline:
            raise TimeoutError(f"did not answer /ping within {timeout:.0f} s")
        time.sleep(0.2)


def _stop(record: dict) -> None:
    stop_processes([record])
    with contextlib.suppress(ChildProcessError):  # reap it when this process started it
        os.waitpid(record["pid"], os.WNOHANG)


def _port_is_free(port: int) -> bool:
    import socket

    try:
        socket.create_server((HOST, port)).close()
        return True
    except OSError:
        return False


# --- the runtime: one stable address for every endpoint ------------------------------------------------------------


def _running_runtime(paths: _Paths) -> dict | None:
    runtime = _read(paths.runtime)
    return runtime if runtime and live_process(runtime) is not None else None


def runtime_url(config: PipelineConfig | None = None, timeout: float = 30.0) -> str:
    """The local runtime's address, for boto3's `sagemaker-runtime` client as `endpoint_url`; starts it if needed.

    A restarted runtime takes its old port back when it can, so the address clients were given stays valid.
    """
    paths = _paths(config or load_config())
    with _locked(paths.endpoints / "runtime.lock"):
        if running := _running_runtime(paths):
            return running["url"]
        runtime = _read(paths.runtime)
        port = runtime["port"] if runtime and _port_is_free(runtime["port"]) else free_port(HOST)
        command = [
            sys.executable,
            "-m",
            "tasks.local_runtime",
            "--endpoints-dir",
            str(paths.endpoints),
            "--host",
            HOST,
            "--port",
            str(port),
        ]
        log_path = paths.logs / "local-runtime.log"
        runtime = _launch(command, port, log_path, dict(os.environ), timeout, "the local SageMaker runtime")
        _write(paths.runtime, {**runtime, "port": port})
        log.info("Local SageMaker runtime listening on %s", runtime["url"])
        return runtime["url"]


def _reroute(config: PipelineConfig, old_server_url: str | None) -> None:
    """Make the runtime re-read the routes, then wait until it has nothing in flight to the old server."""
    import httpx

    paths = _paths(config)
    with _locked(paths.endpoints / "runtime.lock"):  # no runtime can start between this check and the reload
        runtime = _running_runtime(paths)
        if runtime is None:  # nothing routes to any server, and a runtime started later reads the records
            return
        url = runtime["url"]
        status = httpx.post(f"{url}/_local/reload", timeout=10).raise_for_status().json()
    deadline = time.monotonic() + DRAIN_TIMEOUT
    while old_server_url in status["in_flight"]:
        if time.monotonic() > deadline:
            log.warning(
                "Requests to %s still in flight after %.0f s; stopping it anyway", old_server_url, DRAIN_TIMEOUT
            )
            return
        time.sleep(0.05)
        status = httpx.get(f"{url}/_local/status", timeout=10).raise_for_status().json()


def stop_runtime(config: PipelineConfig | None = None) -> None:
    paths = _paths(config or load_config())
    with _locked(paths.endpoints / "runtime.lock"):
        runtime = _read(paths.runtime)
        if runtime:
            _stop(runtime)
            paths.runtime.unlink()


# --- endpoints -----------------------------------------------------------------------------------------------------


def _deploy(config: PipelineConfig, name: str, server: dict, current: dict | None, previous: dict | None) -> dict:
    """Blue/green: start the new server, wait for /ping, switch the route, drain and stop the old server.

    ``server``: the ``SERVER_KEYS`` of what to serve (endpoint config, model, server options).
    """
    from inference.serve import server_command

    paths = _paths(config)
    runtime_url(config)  # up before anything changes, so the switch below cannot stop half-way
    port = free_port(HOST)
    command = server_command(server["model_data_url"], port, HOST, name, server["workers"], server["metrics_interval"])
    log_path = paths.logs / f"{name}--{server['endpoint_config_name']}.log"
    what = f"the model server for endpoint {name} ({server['model_data_url']})"
    process = _launch(command, port, log_path, _child_env(config), SERVER_START_TIMEOUT, what)
    record = {
        "endpoint_name": name,
        **server,
        **process,
        "created_at": current["created_at"] if current else _now(),
        "updated_at": _now(),
        "previous": previous,
    }
    _write(paths.record(name), record)
    _reroute(config, current and current["url"])
    if current:
        _stop(current)
    log.info(
        "Endpoint %s serves %s (config %s) from %s",
        name,
        server["model_data_url"],
        server["endpoint_config_name"],
        process["url"],
    )
    return record


def _deployment(config: PipelineConfig, record: dict) -> dict:
    """What a deploy returns (small, for XCom), with the same keys for both backends."""
    previous = record["previous"] or {}
    return {
        "endpoint_name": record["endpoint_name"],
        "endpoint_config_name": record["endpoint_config_name"],
        "model_data_url": record["model_data_url"],
        "previous_endpoint_config_name": previous.get("endpoint_config_name"),
        "previous_model_data_url": previous.get("model_data_url"),
        "created": not previous,
        "runtime_url": runtime_url(config),
    }


def create_or_update_endpoint(
    endpoint_name: str,
    model_data_url: str,
    endpoint_config_name: str,
    config: PipelineConfig | None = None,
    *,
    workers: int | None = None,
    metrics_interval: float | None = 10.0,
) -> dict:
    """CreateEndpoint, or UpdateEndpoint (blue/green) when the endpoint exists. Returns the deployment:
    endpoint_name, endpoint_config_name, model_data_url, previous_endpoint_config_name, previous_model_data_url,
    created, runtime_url (the `endpoint_url` for boto3's `sagemaker-runtime` client).

    Idempotent for task retries: an endpoint already serving ``endpoint_config_name`` is left as it is. When the new
    server fails to come up, the error carries its log and the endpoint keeps serving what it served.
    ``workers``: server processes (default: one per CPU); ``metrics_interval``: seconds between CloudWatch puts
    (None: no metrics).
    """
    config = config or load_config()
    paths = _paths(config)
    with _locked(paths.lock(_check_name(endpoint_name))):
        current = _read(paths.record(endpoint_name))
        if current and current["endpoint_config_name"] == endpoint_config_name:
            if live_process(current) is not None:
                log.info("Endpoint %s already serves config %s", endpoint_name, endpoint_config_name)
                return _deployment(config, current)
            previous = current["previous"]  # a retry after its server died: keep what it replaced
        elif current:
            previous = {key: current[key] for key in SERVER_KEYS}
        else:
            previous = None
        server = {
            "endpoint_config_name": endpoint_config_name,
            "model_data_url": model_data_url,
            "workers": workers,
            "metrics_interval": metrics_interval,
        }
        record = _deploy(config, endpoint_name, server, current, previous)
        return _deployment(config, record)


def describe_endpoint(endpoint_name: str, config: PipelineConfig | None = None) -> dict:
    """DescribeEndpoint: SageMaker's keys (EndpointStatus InService, or Failed when the server died) plus
    ModelDataUrl, ServerUrl and Pid."""
    paths = _paths(config or load_config())
    record = _read(paths.record(_check_name(endpoint_name)))
    if record is None:
        raise _not_found(endpoint_name, paths)
    alive = live_process(record) is not None
    description = {
        "EndpointName": endpoint_name,
        "EndpointConfigName": record["endpoint_config_name"],
        "EndpointStatus": "InService" if alive else "Failed",
        "CreationTime": record["created_at"],
        "LastModifiedTime": record["updated_at"],
        "ProductionVariants": [{"VariantName": VARIANT_NAME, "CurrentInstanceCount": int(alive)}],
        "ModelDataUrl": record["model_data_url"],
        "ServerUrl": record["url"],
        "Pid": record["pid"],
    }
    if not alive:
        description["FailureReason"] = f"the model server (pid {record['pid']}) exited; its log: {record['log']}"
    return description


def list_endpoints(config: PipelineConfig | None = None) -> list[str]:
    return sorted(path.stem for path in _paths(config or load_config()).endpoints.glob("*.json"))


def _delete(config: PipelineConfig, current: dict) -> None:
    _paths(config).record(current["endpoint_name"]).unlink()
    _reroute(config, current["url"])
    _stop(current)
    log.info("Endpoint %s deleted", current["endpoint_name"])


def delete_endpoint(endpoint_name: str, config: PipelineConfig | None = None) -> None:
    """DeleteEndpoint: stop routing to it, let what is in flight finish, stop its server."""
    config = config or load_config()
    paths = _paths(config)
    with _locked(paths.lock(_check_name(endpoint_name))):
        current = _read(paths.record(endpoint_name))
        if current is None:
            raise _not_found(endpoint_name, paths)
        _delete(config, current)


def rollback_endpoint(
    endpoint_name: str, failed_endpoint_config_name: str, config: PipelineConfig | None = None
) -> dict:
    """Undo the deployment of ``failed_endpoint_config_name``: serve the previous config again (blue/green), or
    delete the endpoint when that deployment created it.

    Returns ``{"action": "restored" | "deleted" | "none", "endpoint_name", "endpoint_config_name"}`` (the config
    serving now). Idempotent: when the endpoint no longer serves the failed config there is nothing to undo.
    """
    config = config or load_config()
    paths = _paths(config)
    with _locked(paths.lock(_check_name(endpoint_name))):
        current = _read(paths.record(endpoint_name))
        if current is None or current["endpoint_config_name"] != failed_endpoint_config_name:
            serving = current and current["endpoint_config_name"]
            log.info(
                "Endpoint %s serves %s, not %s: nothing to roll back",
                endpoint_name,
                serving,
                failed_endpoint_config_name,
            )
            return {"action": "none", "endpoint_name": endpoint_name, "endpoint_config_name": serving}
        previous = current["previous"]
        if previous is None:
            _delete(config, current)
            return {"action": "deleted", "endpoint_name": endpoint_name, "endpoint_config_name": None}
        _deploy(config, endpoint_name, previous, current, None)
        log.info(
            "Endpoint %s rolled back from %s to %s",
            endpoint_name,
            failed_endpoint_config_name,
            previous["endpoint_config_name"],
        )
        return {
            "action": "restored",
            "endpoint_name": endpoint_name,
            "endpoint_config_name": previous["endpoint_config_name"],
        }


def stop_all(config: PipelineConfig | None = None) -> list[str]:
    """Delete every local endpoint and stop the runtime (the local stack's `down`); returns the endpoints' names."""
    config = config or load_config()
    names = list_endpoints(config)
    for name in names:
        with contextlib.suppress(EndpointNotFound):  # deleted meanwhile by someone else
            delete_endpoint(name, config)
    stop_runtime(config)
    return names
