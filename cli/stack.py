"""The local stack itself: `mnist-pipeline up | down | status`, and what the other commands read of it.

`up` starts, on 127.0.0.1, the local AWS (moto server: S3, CloudWatch, CloudWatch Logs), the local SageMaker
service (local_sagemaker: training jobs and endpoints, for real) and Airflow 3 as separate processes — API server
(with the UI), scheduler, DAG processor, triggerer — each in its own session, so `down` can stop each whole
process group (`airflow standalone` would leave its children running on SIGTERM). Airflow runs on SQLite with its
home, logs and login under the pipeline's state directory and the DAGs folder of this checkout. Its AWS connection
(by environment) is what makes the run local: `sagemaker` and `sagemaker-runtime` go to the local SageMaker
service, everything else to the local AWS.

Every call is signed and authorized as on AWS (local_aws): the connection carries the keys of the pipeline's own IAM
user, whose policy is `iam/airflow-policy.json`; training jobs, model servers and transform jobs act as the
execution role (`iam/sagemaker-execution-role-*.json`); the bucket has `iam/bucket-policy.json`. `up` makes them,
filled in for the local account, and the bucket and its policy with the account administrator's keys, which only
the stack holds.

State: `<state_dir>/stack/stack.json` (URLs, and pid + start time of every process), `stack/logs/*.log`
(`iam-decisions.jsonl`: every IAM decision), `stack/passwords.json` (the UI login), `stack/secrets.json`,
`stack/credentials.json` (the principals' keys), `stack/principals.json` (the local AWS's principals),
`stack/local-aws.jsonl` (what the local AWS keeps across restarts), `<state_dir>/sagemaker` (the local SageMaker
service's records, jobs and model servers) and `<state_dir>/airflow` (AIRFLOW_HOME); all but the logs readable by
this user only where they hold a secret.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

from cli import StackError, new_console
from cli.airflow_api import AirflowAPI
from cli.iam import DEFAULT_TOPIC
from local_sagemaker import launch, processes
from tasks.config import PipelineConfig, load_config
from tasks.names import DAG_ID

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
DEFAULT_PORT = 8080
USERNAME = "admin"
COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")
# Seconds between the provider's status polls of local jobs and endpoints (30 on AWS, where they take minutes).
LOCAL_CHECK_INTERVAL = 2
LOCAL_BAKE_SECONDS = 20
ALERT_TOPIC = DEFAULT_TOPIC  # the local AWS's topic for the runs' notifications
# The variables through which boto3 would find credentials of its own, none of which Airflow's processes inherit.
AWS_CREDENTIAL_VARIABLES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN",
)
LOCAL_RETRY_DELAY_SECONDS = 5  # a local job a crash ended starts again at once: no instances to wait for


@dataclasses.dataclass(frozen=True)
class StackPaths:
    state_dir: Path

    @property
    def root(self) -> Path:
        return self.state_dir / "stack"

    @property
    def state(self) -> Path:
        return self.root / "stack.json"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def passwords(self) -> Path:
        return self.root / "passwords.json"

    @property
    def secrets(self) -> Path:
        return self.root / "secrets.json"

    @property
    def credentials(self) -> Path:
        return self.root / "credentials.json"

    @property
    def principals(self) -> Path:
        return self.root / "principals.json"

    @property
    def decisions(self) -> Path:
        return self.logs / "iam-decisions.jsonl"

    @property
    def airflow_home(self) -> Path:
        return self.state_dir / "airflow"

    @property
    def airflow_db(self) -> Path:
        return self.airflow_home / "airflow.db"

    @property
    def sagemaker(self) -> Path:
        return self.state_dir / "sagemaker"

    @property
    def local_aws_state(self) -> Path:
        return self.root / "local-aws.jsonl"


def stack_paths(config: PipelineConfig | None = None) -> StackPaths:
    return StackPaths(Path((config or load_config()).state_dir))


def kept_json(path: Path, keys: tuple[str, ...] = ()) -> dict | None:
    """A JSON object the stack keeps (stack.json, the password, secrets and keys files) with ``keys``; None when it
    is absent, or when it cannot be read: it is then set aside (renamed, never deleted), saying so, and the caller
    makes it anew."""
    from local_sagemaker.store import set_aside

    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
        why = str(error)
    else:
        if isinstance(data, dict) and all(key in data for key in keys):
            return data
        why = f"not a JSON object with {', '.join(keys)}" if keys else "not a JSON object"
    aside = set_aside(path, why)
    print(f"{path} cannot be read ({why}): set aside as {aside.name}", file=sys.stderr)
    return None


def read_state(paths: StackPaths) -> dict | None:
    return kept_json(paths.state, ("processes",))


def write_state(paths: StackPaths, state: dict) -> None:
    """Replace stack.json whole: `status`, `down` and the next `up` find the old state or the new one, never half."""
    from local_sagemaker.store import write_atomically

    write_atomically(paths.state, json.dumps(state, indent=2).encode())


def _login_and_secrets(paths: StackPaths) -> tuple[str, dict]:
    """The UI password and the signing secrets: generated once, kept across `up`s so the login stays the same."""
    from cli.local_aws import write_private

    if (passwords := kept_json(paths.passwords, (USERNAME,))) is None:
        write_private(paths.passwords, passwords := {USERNAME: secrets.token_urlsafe(12)})
    if (signing := kept_json(paths.secrets, ("jwt_secret", "secret_key"))) is None:
        signing = {"jwt_secret": secrets.token_urlsafe(32), "secret_key": secrets.token_urlsafe(32)}
        write_private(paths.secrets, signing)
    return passwords[USERNAME], signing


def ui_password(paths: StackPaths) -> str:
    """The UI password `up` made."""
    if (passwords := kept_json(paths.passwords, (USERNAME,))) is None:
        raise StackError(f"{paths.passwords} is missing or unreadable: `mnist-pipeline up` makes it anew")
    return passwords[USERNAME]


def stack_keys(paths: StackPaths):
    """The keys of the stack's principals (cli.local_aws.StackKeys): made once, kept across `up`s."""
    from cli.local_aws import StackKeys, write_private

    if (data := kept_json(paths.credentials, ("admin", "pipeline", "sagemaker"))) is not None:
        return StackKeys.from_json(data)
    keys = StackKeys.new()
    write_private(paths.credentials, keys.as_json())
    return keys


def airflow_env(
    paths: StackPaths, config: PipelineConfig, api_url: str, connection: str, keys: dict, alert_topic_arn: str
) -> dict:
    port = api_url.rsplit(":", 1)[1]
    # Airflow reaches AWS through its connection alone: no credentials of the shell's, none of the stack's.
    env = {
        key: value
        for key, value in os.environ.items()
        if key != "AIRFLOW__CORE__UNIT_TEST_MODE" and key not in AWS_CREDENTIAL_VARIABLES
    }
    env.update(
        {
            "AIRFLOW_HOME": str(paths.airflow_home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            # SQLite under the state directory whatever the shell names, with the busy timeout the stack needs.
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{paths.airflow_db}",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS": "cli.airflow_sqlite.CONNECT_ARGS",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS_ASYNC": "cli.airflow_sqlite.CONNECT_ARGS",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__CORE__AUTH_MANAGER": "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{USERNAME}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(paths.passwords),
            "AIRFLOW__API__HOST": HOST,
            "AIRFLOW__API__PORT": port,
            "AIRFLOW__API__BASE_URL": api_url,
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{api_url}/execution/",
            # LocalExecutor starts this many workers up front (~130 MB each); training waits in its pool anyway.
            "AIRFLOW__CORE__PARALLELISM": str(max(8, 2 * config.cpus)),
            # Every component signs or checks the same tokens.
            "AIRFLOW__API_AUTH__JWT_SECRET": keys["jwt_secret"],
            "AIRFLOW__API__SECRET_KEY": keys["secret_key"],
            f"AIRFLOW_CONN_{config.aws_conn_id.upper()}": connection,
            "AIRFLOW__MNIST_PIPELINE__SAGEMAKER_CHECK_INTERVAL": str(LOCAL_CHECK_INTERVAL),
            # The monitoring check runs in the bake: here it takes seconds (CloudWatch's figures arrive in one).
            "AIRFLOW__MNIST_PIPELINE__BAKE_SECONDS": str(LOCAL_BAKE_SECONDS),
            "AIRFLOW__MNIST_PIPELINE__RETRY_DELAY_SECONDS": str(LOCAL_RETRY_DELAY_SECONDS),
            "MNIST_PIPELINE_STATE_DIR": str(paths.state_dir),
            "MNIST_PIPELINE_ALERT_TOPIC_ARN": alert_topic_arn,
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "NO_PROXY": "127.0.0.1,localhost",
        }
    )
    return env


# --- processes ---------------------------------------------------------------------------------------------------


def _spawn_airflow(name: str, env: dict, paths: StackPaths) -> dict:
    """Start Airflow component ``name`` (api-server, scheduler, ...); returns its process record."""
    # One machine, one AIRFLOW_HOME: the API server reads task logs from disk, no log server needed (it would listen
    # on a fixed port on every interface).
    skip_serve_logs = ["--skip-serve-logs"] if name in ("scheduler", "triggerer") else []
    command = [sys.executable, "-m", "airflow", name, *skip_serve_logs]
    _, record = processes.spawn(command, env=env, log_path=paths.logs / f"{name}.log")
    return record


# --- the stack's Airflow, answering ------------------------------------------------------------------------------


def api_for(state: dict, paths: StackPaths) -> AirflowAPI:
    """A client of the running stack's Airflow API, logged in as the UI's user."""
    password = ui_password(paths)
    return AirflowAPI(state["airflow_url"], USERNAME, password, log=paths.logs / "api-server.log")


def _wait_healthy(state: dict, paths: StackPaths, timeout: float) -> None:
    """Wait until the API server answers and reports every component healthy; fail early when one exits."""
    import httpx

    deadline = time.monotonic() + timeout
    health: dict = {}
    while time.monotonic() < deadline:
        for name, record in state["processes"].items():
            if processes.live(record) is None:
                raise StackError(
                    f"{name} exited during start-up; its log ends:\n{processes.log_tail(record['log'], 25)}"
                )
        with contextlib.suppress(httpx.HTTPError, ValueError):
            health = httpx.get(f"{state['airflow_url']}/api/v2/monitor/health", timeout=5).json()
            if all(part.get("status") == "healthy" for part in health.values()):
                return
        time.sleep(1)
    raise StackError(f"Airflow did not become healthy within {timeout:.0f} s: {health or 'no answer'}")


def _wait_for_dag(api: AirflowAPI, timeout: float) -> dict:
    """Wait until the DAG processor has parsed mnist_sweep, and answer what the API says of it; fail with the
    import error when the file is broken."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        errors = [e for e in api.get("/importErrors")["import_errors"] if e["filename"].endswith(f"{DAG_ID}.py")]
        if errors:
            raise StackError(f"dags/{DAG_ID}.py does not import:\n{errors[0]['stack_trace']}")
        with contextlib.suppress(StackError):
            return api.get(f"/dags/{DAG_ID}")
        time.sleep(1)
    raise StackError(f"the DAG {DAG_ID} did not appear within {timeout:.0f} s (is dags/{DAG_ID}.py there?)")


# --- commands ----------------------------------------------------------------------------------------------------


def running(paths: StackPaths) -> dict[str, bool]:
    state = read_state(paths)
    if not state:
        return {}
    return {name: processes.live(record) is not None for name, record in state["processes"].items()}


def _free_or_other_port(port: int) -> int:
    import socket

    if port:
        with contextlib.suppress(OSError), socket.create_server((HOST, port)):
            return port
    return processes.free_port(HOST)


def stack_principals(paths: StackPaths, config: PipelineConfig) -> dict:
    """The local AWS's principals for this stack, with the shipped policies filled for its bucket and prefix."""
    from cli.local_aws import config_blanks, principals

    return principals(stack_keys(paths), config_blanks(config))


def start_local_aws(paths: StackPaths, config: PipelineConfig) -> tuple[dict, str, launch.Started, str]:
    """The local AWS and the local SageMaker service (behind it), with the bucket the pipeline uses and its policy
    and, unless one is configured, the topic its notifications go to; returns their process records, URLs and the
    topic's ARN."""
    from cli.local_aws import setup_bucket, write_private
    from cli.local_aws import start_local_aws as start_aws

    spec = stack_principals(paths, config)
    write_private(paths.principals, spec)
    keys = stack_keys(paths)
    process, aws_endpoint = start_aws(
        paths.principals,
        host=HOST,
        region=config.region,
        log_path=paths.logs / "local-aws.log",
        state_file=paths.local_aws_state,
        decision_log=paths.decisions,
    )
    moto_record = processes.record_of(process.pid, paths.logs / "local-aws.log")
    try:
        # What a person does once on AWS, as the account's administrator: the bucket, its policy, the topic.
        setup_bucket(aws_endpoint, keys.admin, config)
        if not config.alert_topic_arn:  # the runs' notifications go to a topic in the local AWS (idempotent)
            sns = _local_aws_client("sns", aws_endpoint, config, keys.admin)
            config = dataclasses.replace(config, alert_topic_arn=sns.create_topic(Name=ALERT_TOPIC)["TopicArn"])
        sagemaker = launch.start(
            paths.sagemaker,
            aws_endpoint,
            credentials=keys.sagemaker.environment(),
            region=config.region,
            cpus=config.cpus,
            metrics_interval=config.metrics_interval,
            log_path=paths.logs / "local-sagemaker.log",
        )
    except BaseException:
        processes.stop([moto_record], grace=processes.SERVICE_STOP_GRACE_SECONDS)
        raise
    return moto_record, aws_endpoint, sagemaker, config.alert_topic_arn


def up(config: PipelineConfig | None = None, port: int = DEFAULT_PORT, timeout: float = 180.0) -> dict:
    """Start the stack (or find it running); returns its state: URLs, login and processes."""
    from cli.local_aws import connection_uri

    config = config or load_config()
    paths = stack_paths(config)
    alive = running(paths)
    if alive and all(alive.values()):
        return read_state(paths)
    if alive and all(alive[name] for name in BACKING_SERVICES):
        # Only Airflow components died (a crashed scheduler, say): start those again, on the same connection,
        # while the runs, their tasks and their jobs go on.
        return _restart_airflow(paths, config, [name for name in COMPONENTS if not alive.get(name)], timeout)
    if alive:  # the local AWS or the SageMaker service died: clear it all out before starting a fresh stack
        down(config)
    paths.logs.mkdir(parents=True, exist_ok=True)
    paths.airflow_home.mkdir(parents=True, exist_ok=True)
    _, keys = _login_and_secrets(paths)

    moto, aws_endpoint, sagemaker, alert_topic_arn = start_local_aws(paths, config)
    api_url = f"http://{HOST}:{_free_or_other_port(port)}"
    connection = connection_uri(
        aws_endpoint, stack_keys(paths).pipeline, config.region, sagemaker.url, sagemaker.runtime_url
    )
    state = {
        "airflow_url": api_url,
        "aws_endpoint": aws_endpoint,
        "sagemaker_endpoint": sagemaker.url,
        "sagemaker_runtime_endpoint": sagemaker.runtime_url,
        "connection": connection,
        "alert_topic_arn": alert_topic_arn,
        "username": USERNAME,
        "processes": {"local-aws": moto, "local-sagemaker": sagemaker.record},
    }
    write_state(paths, state)
    try:
        env = airflow_env(paths, config, api_url, connection, keys, alert_topic_arn)
        airflow = [sys.executable, "-m", "airflow"]
        migrate = subprocess.run([*airflow, "db", "migrate"], env=env, capture_output=True, text=True)
        if migrate.returncode:
            raise StackError(f"`airflow db migrate` failed:\n{migrate.stdout[-3000:]}{migrate.stderr[-3000:]}")
        for name in COMPONENTS:
            state["processes"][name] = _spawn_airflow(name, env, paths)
            write_state(paths, state)
        _wait_healthy(state, paths, timeout)
        api = api_for(state, paths)
        # Unpaused only if a person paused it in an earlier life of this state: a write that is not needed is not
        # made, since the DAGs' first scheduled runs start meanwhile and SQLite takes one writer at a time.
        if (ROOT / "dags" / f"{DAG_ID}.py").exists() and _wait_for_dag(api, timeout)["is_paused"]:
            api.request("PATCH", f"/dags/{DAG_ID}", json={"is_paused": False})
    except BaseException:
        down(config)
        raise
    return state


def _restart_airflow(paths: StackPaths, config: PipelineConfig, names: list[str], timeout: float) -> dict:
    state = read_state(paths)
    _, keys = _login_and_secrets(paths)
    env = airflow_env(paths, config, state["airflow_url"], state["connection"], keys, state["alert_topic_arn"])
    for name in names:
        # What the dead one leaves running (a killed scheduler's executor workers, a task still in one) goes on, and
        # `down` stops it with the rest.
        if old := state["processes"].get(name):
            state.setdefault("retired", []).append(old)
        state["processes"][name] = _spawn_airflow(name, env, paths)
        write_state(paths, state)
    _wait_healthy(state, paths, timeout)
    return state


# The order `down` stops them in: Airflow first (no task starts anything more), then the local SageMaker service
# (it stops its jobs and model servers), then the local AWS they all talk to.
BACKING_SERVICES = ("local-sagemaker", "local-aws")


def down(config: PipelineConfig | None = None) -> list[str]:
    """Stop Airflow, then the local SageMaker service and its model servers, then the local AWS; returns what was
    stopped. The records stay: the next `up` serves the same endpoints and keeps the same S3 objects."""
    config = config or load_config()
    paths = stack_paths(config)
    state = read_state(paths) or {"processes": {}}
    records = state["processes"]
    airflow = [name for name in records if name not in BACKING_SERVICES]
    # With the components `up` started again after they died: what outlived them in their process groups.
    processes.stop([records[name] for name in airflow] + state.get("retired", []))
    stopped = airflow
    for name in BACKING_SERVICES:
        if name in records:
            processes.stop([records[name]], grace=processes.SERVICE_STOP_GRACE_SECONDS)
            stopped.append(name)
    # Model servers that a killed service left behind (a running one stops its own).
    if strays := launch.stop_strays(paths.sagemaker):
        stopped.append(f"{strays} model server(s) left by a stopped local SageMaker service")
    paths.state.unlink(missing_ok=True)
    return stopped


def use_stack_connection(config: PipelineConfig) -> None:
    """Give this process the running stack's AWS connection, unless it has one of its own (for the CLI)."""
    variable = f"AIRFLOW_CONN_{config.aws_conn_id.upper()}"
    state = read_state(stack_paths(config))
    if variable not in os.environ and state and all(running(stack_paths(config)).values()):
        os.environ[variable] = state["connection"]


def local_client(state: dict, service: str, config: PipelineConfig):
    """A boto3 client of the running stack, signing as the pipeline does (its connection's keys): SageMaker's two
    APIs at the local SageMaker service, the other services at the local AWS."""
    url = {"sagemaker": state["sagemaker_endpoint"], "sagemaker-runtime": state["sagemaker_runtime_endpoint"]}.get(
        service, state["aws_endpoint"]
    )
    return _local_aws_client(service, url, config, stack_keys(stack_paths(config)).pipeline)


def _local_aws_client(service: str, endpoint_url: str, config: PipelineConfig, key):
    """A boto3 client of ``service`` at ``endpoint_url``, signing with ``key`` (a cli.local_aws.Key)."""
    import boto3

    return boto3.client(
        service,
        endpoint_url=endpoint_url,
        region_name=config.region,
        aws_access_key_id=key.access_key_id,
        aws_secret_access_key=key.secret_access_key,
    )


# --- the command line ----------------------------------------------------------------------------------------------


def start_and_tell(console, config: PipelineConfig, port: int = DEFAULT_PORT) -> dict:
    """`up`, telling the user where the UI is and how to log in."""
    with console.status("Starting the local AWS and Airflow (API server, scheduler, DAG processor, triggerer)…"):
        state = up(config, port=port)
    password = ui_password(stack_paths(config))
    console.print(
        f"[green]Stack running.[/] Airflow UI: [bold]{state['airflow_url']}[/]  login: {USERNAME} / {password}"
    )
    console.print(f"Local AWS: {state['aws_endpoint']}   logs: {stack_paths(config).logs}   stop: mnist-pipeline down")
    return state


def up_command(args) -> int:
    console = new_console()
    try:
        start_and_tell(console, load_config(), args.port)
    except StackError as error:
        console.print(f"[red]error:[/] {error}")
        return 1
    return 0


def down_command(args) -> int:
    console = new_console()
    with console.status("Stopping the local stack…"):
        stopped = down()
    console.print(f"Stopped: {', '.join(stopped)}" if stopped else "Nothing was running.")
    return 0


def status_command(args) -> int:
    from rich.table import Table

    from local_sagemaker.store import set_aside_files

    config = load_config()
    paths = stack_paths(config)
    state = read_state(paths)
    console = new_console()
    set_aside = set_aside_files(paths.state_dir)
    for path in set_aside:
        console.print(f"[red]Set aside, unreadable:[/] {path} (its service started without it; see its log)")
    if not state:
        console.print("The local stack is not running (start it with: mnist-pipeline up).")
        return 3
    table = Table("component", "state", "pid / config")
    for name, record in state["processes"].items():
        alive = processes.live(record) is not None
        table.add_row(name, "[green]running[/]" if alive else "[red]exited[/]", str(record["pid"]))
    if processes.live(state["processes"]["local-sagemaker"]):
        sagemaker = local_client(state, "sagemaker", config)
        for summary in sagemaker.list_endpoints(MaxResults=100)["Endpoints"]:
            endpoint = sagemaker.describe_endpoint(EndpointName=summary["EndpointName"])
            color = "green" if endpoint["EndpointStatus"] == "InService" else "red"
            table.add_row(
                f"endpoint {endpoint['EndpointName']}",
                f"[{color}]{endpoint['EndpointStatus']}[/]",
                endpoint["EndpointConfigName"],
            )
    console.print(table)
    console.print(f"Airflow UI: {state['airflow_url']}  login: {USERNAME} / (in {paths.passwords})  logs: {paths.logs}")
    return 0 if all(running(paths).values()) and not set_aside else 1
