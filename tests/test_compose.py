"""docker-compose.yaml, checked by `docker-compose config` (it resolves and validates offline; no engine here)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from tests.conftest import ROOT

AIRFLOW_SERVICES = {"airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer"}
# Only what compose needs: the shell environment wins over the env file, and the tests set AWS variables.
CLEAN_ENV = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root")}


def compose_config(env_file: str) -> subprocess.CompletedProcess:
    if not shutil.which("docker-compose"):
        pytest.fail("docker-compose is not installed: `make test` installs it (apt-get install docker-compose)")
    return subprocess.run(
        ["docker-compose", "--env-file", env_file, "-f", str(ROOT / "docker-compose.yaml"), "config"],
        cwd=ROOT,
        env=CLEAN_ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def env_file(tmp_path_factory) -> str:
    """.env.example with its secrets filled in, as a user makes .env (python -m cli.compose_secrets --new)."""
    from cli.compose_secrets import fresh

    values = fresh()
    lines = [
        f"{line}{values[line[:-1]]}" if line.endswith("=") and line[:-1] in values else line
        for line in (ROOT / ".env.example").read_text().splitlines()
    ]
    path = tmp_path_factory.mktemp("compose") / ".env"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def services(env_file) -> dict:
    result = compose_config(env_file)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)["services"]


def test_the_example_env_ships_no_secret_and_compose_refuses_it():
    """.env.example as it is: every secret empty, and compose will not start on it, naming what to set."""
    secrets = (
        "POSTGRES_PASSWORD",
        "AIRFLOW_ADMIN_PASSWORD",
        "AIRFLOW_JWT_SECRET",
        "AIRFLOW_SECRET_KEY",
        "AIRFLOW_FERNET_KEY",
        "PIPELINE_AWS_ACCESS_KEY_ID",
        "PIPELINE_AWS_SECRET_ACCESS_KEY",
        "LOCAL_AWS_ADMIN_ACCESS_KEY_ID",
        "LOCAL_AWS_ADMIN_SECRET_ACCESS_KEY",
        "LOCAL_SAGEMAKER_AWS_ACCESS_KEY_ID",
        "LOCAL_SAGEMAKER_AWS_SECRET_ACCESS_KEY",
    )
    example = dict(
        line.split("=", 1)
        for line in (ROOT / ".env.example").read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )
    assert {name: example[name] for name in secrets} == dict.fromkeys(secrets, "")
    result = compose_config(str(ROOT / ".env.example"))
    assert result.returncode != 0 and "in .env" in result.stderr
    assert ".env" in (ROOT / ".gitignore").read_text().splitlines()
    assert ".env" in (ROOT / ".dockerignore").read_text().splitlines()


def test_the_init_service_refuses_weak_secrets(services):
    """airflow-init checks the secrets first (cli.compose_secrets), in the environment the containers get."""
    from cli.compose_secrets import problems

    init = services["airflow-init"]
    assert init["command"][-1].startswith("python -m cli.compose_secrets &&")
    assert problems(init["environment"]) == []  # the generated ones pass
    weak = {
        **init["environment"],
        "AIRFLOW__API_AUTH__JWT_SECRET": "replace-me-with-a-random-jwt-secret",
        "AIRFLOW__CORE__FERNET_KEY": "not-a-fernet-key-but-long-enough",
        "AIRFLOW_ADMIN_PASSWORD": "admin",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "postgresql+psycopg2://airflow:@postgres/airflow",
    }
    assert problems(weak) == [
        "AIRFLOW_JWT_SECRET looks like a placeholder ('replace' in it)",
        "AIRFLOW_ADMIN_PASSWORD is shorter than 16 characters",
        "POSTGRES_PASSWORD is empty: set it in .env",
        "AIRFLOW_FERNET_KEY is not a Fernet key (32 url-safe base64-encoded bytes)",
    ]


def mounts(service: dict) -> dict[str, str]:
    """Container path -> host path, from the short ("host:container:mode") or long volume syntax."""
    found = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
        else:
            source, target = volume.get("source"), volume["target"]
        found[target] = source
    return found


def writable(service: dict) -> dict[str, str]:
    """The mounts a service may write to: container path -> host path or volume name (short syntax: no ":ro")."""
    found = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target, *mode = volume.split(":")
            if "ro" not in "".join(mode).split(","):
                found[target] = source
        elif not volume.get("read_only"):
            found[volume["target"]] = volume.get("source")
    return found


def ports(service: dict) -> list[tuple[str, int]]:
    """(host address:published port, container port) pairs, from the short or long port syntax."""
    found = []
    for port in service.get("ports", []):
        if isinstance(port, str):
            *published, target = port.split("/")[0].split(":")
            found.append((":".join(published), int(target)))
        else:
            found.append((f"{port.get('host_ip', '')}:{port['published']}", int(port["target"])))
    return found


def test_services_and_health_checks(services):
    assert set(services) == AIRFLOW_SERVICES | {"airflow-init", "postgres", "local-aws", "local-sagemaker"}
    for name in AIRFLOW_SERVICES | {"postgres", "local-aws", "local-sagemaker"}:
        assert services[name]["healthcheck"]["test"], name
    assert "healthcheck" not in services["airflow-init"]  # a one-shot job, waited on by completion
    for name in AIRFLOW_SERVICES:
        depends = services[name]["depends_on"]
        assert depends["airflow-init"]["condition"] == "service_completed_successfully", name
        assert {depends[backing]["condition"] for backing in ("postgres", "local-aws", "local-sagemaker")} == {
            "service_healthy"
        }, name
    assert services["airflow-init"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    init = " ".join(services["airflow-init"]["command"])
    assert "airflow db migrate" in init and "python -m cli.local_aws setup --endpoint-url http://local-aws:5000" in init


def test_each_service_has_its_own_key(services):
    # The local SageMaker service sees the local AWS and its own key, nothing of Airflow's; Airflow signs with the
    # pipeline's key; the administrator's reach only the local AWS and the one-shot init.
    sagemaker = services["local-sagemaker"]
    assert sagemaker["environment"]["AWS_ENDPOINT_URL"] == "http://local-aws:5000"
    assert not [key for key in sagemaker["environment"] if key.startswith("AIRFLOW")]
    assert sagemaker["entrypoint"] == ["python", "-m", "local_sagemaker"]
    keys = {
        service: {value for key, value in services[service]["environment"].items() if "ACCESS_KEY" in key}
        for service in services
        if "environment" in services[service]
    }
    admin = services["local-aws"]["environment"]["LOCAL_AWS_ADMIN_SECRET_ACCESS_KEY"]
    assert sorted(service for service, values in keys.items() if admin in values) == ["airflow-init", "local-aws"]
    pipeline = services["local-aws"]["environment"]["PIPELINE_AWS_SECRET_ACCESS_KEY"]
    assert all(services[name]["environment"]["AWS_SECRET_ACCESS_KEY"] == pipeline for name in AIRFLOW_SERVICES)
    assert (
        sagemaker["environment"]["AWS_SECRET_ACCESS_KEY"]
        == keys["local-aws"]
        .intersection({services["local-aws"]["environment"]["LOCAL_SAGEMAKER_AWS_SECRET_ACCESS_KEY"]})
        .pop()
    )


def test_the_local_aws_keeps_its_state_in_a_volume(services):
    # The local AWS keeps its state in a volume of its own: moto's recording, replayed at start.
    local_aws = services["local-aws"]
    assert local_aws["entrypoint"] == ["python", "-m", "cli.local_aws"] and local_aws["command"][0] == "serve"
    state_file = local_aws["command"][local_aws["command"].index("--state-file") + 1]
    assert any(
        state_file.startswith(f"{target}/")
        for target, source in mounts(local_aws).items()
        if not source.startswith("/")
    ), mounts(local_aws)


def test_airflow_wiring(services):
    from airflow.models.connection import Connection

    environments = [services[name]["environment"] for name in AIRFLOW_SERVICES | {"airflow-init"}]
    env = environments[0]
    # One metadata database and one JWT secret, or the components cannot talk to each other.
    for key in ("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__CORE__FERNET_KEY"):
        assert len({e[key] for e in environments}) == 1, key
    assert urlsplit(env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]).hostname == "postgres"
    assert urlsplit(env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"]).hostname == "airflow-apiserver"
    assert env["AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION"] == "false"

    # The AWS connection points at the local AWS service's container port, and SageMaker at the local service.
    connection = Connection(conn_id="aws_default", uri=env["AIRFLOW_CONN_AWS_DEFAULT"])
    endpoint = urlsplit(connection.extra_dejson["endpoint_url"])
    assert connection.conn_type == "aws"
    assert endpoint.hostname == "local-aws"
    assert endpoint.port in {target for _, target in ports(services["local-aws"])}
    command = services["local-sagemaker"]["command"]
    ports_of = {"sagemaker": "--port", "sagemaker-runtime": "--runtime-port"}
    for service, option in ports_of.items():
        sagemaker = urlsplit(connection.extra_dejson["service_config"][service]["endpoint_url"])
        assert (sagemaker.hostname, sagemaker.port) == ("local-sagemaker", int(command[command.index(option) + 1]))
    assert "MNIST_PIPELINE_BACKEND" not in env

    # The project is mounted and the DAGs folder is the mounted checkout's dags/.
    for name in AIRFLOW_SERVICES:
        project = mounts(services[name])["/opt/airflow/project"]
        assert os.path.samefile(project, ROOT), name
    assert env["AIRFLOW__CORE__DAGS_FOLDER"] == "/opt/airflow/project/dags"
    assert (ROOT / "dags").is_dir()


def test_api_server_login_comes_from_the_environment(services, env_file):
    api = services["airflow-apiserver"]
    from_env_file = dict(line.split("=", 1) for line in Path(env_file).read_text().splitlines() if "=" in line)
    assert api["environment"]["AIRFLOW_ADMIN_PASSWORD"] == from_env_file["AIRFLOW_ADMIN_PASSWORD"]
    assert api["environment"]["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"] in " ".join(api["command"])
    assert ports(api) == [("127.0.0.1:8080", 8080)]  # published on the host's loopback only


def test_missing_secrets_are_named(tmp_path):
    empty = tmp_path / "empty.env"
    empty.write_text("")
    result = compose_config(str(empty))
    assert result.returncode != 0
    assert re.search(r"set (POSTGRES_PASSWORD|AIRFLOW_\w+) in \.env", result.stderr), result.stderr


def test_the_checkout_is_mounted_read_only_and_what_the_services_write_is_in_volumes(services):
    """The checkout is Airflow's DAG folder: no container writes to it, least of all the local SageMaker service and
    the local AWS, which run training and model code. Every service writes only to named volumes, and the state of
    each (the pipeline's state directory, the local AWS's recording and decision log, the local SageMaker service's
    records) lies in one of them."""
    project = {name for name, service in services.items() if "/opt/airflow/project" in mounts(service)}
    assert project == set(services) - {"postgres"}
    for name, service in services.items():
        assert "/opt/airflow/project" not in writable(service), name
        bound = {target: source for target, source in writable(service).items() if source.startswith((".", "/"))}
        assert bound == {}, f"{name} may write to the host's {bound}"

    def in_a_volume(name: str, path: str) -> bool:
        return any(path == target or path.startswith(f"{target}/") for target in writable(services[name]))

    local_aws, sagemaker = services["local-aws"]["command"], services["local-sagemaker"]["command"]
    for option in ("--state-file", "--decision-log"):
        assert in_a_volume("local-aws", local_aws[local_aws.index(option) + 1]), option
    assert in_a_volume("local-sagemaker", sagemaker[sagemaker.index("--state-dir") + 1])
    for name in AIRFLOW_SERVICES:
        assert in_a_volume(name, services[name]["environment"]["MNIST_PIPELINE_STATE_DIR"]), name
        assert in_a_volume(name, "/opt/airflow/logs"), name
