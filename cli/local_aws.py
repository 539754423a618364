"""The local AWS as the stack runs it: `python -m local_aws` (moto's S3, CloudWatch, CloudWatch Logs, SNS, STS and
IAM behind a gateway that authenticates and authorizes every request as AWS does), with the stack's principals.

The principals are those the pipeline has on AWS, with the policies it ships (``iam/``, filled in for the local
account, region, bucket and prefix): the user Airflow runs as, the SageMaker execution role and its trust policy.
Beside them: the account's administrator, whose keys only the stack holds (it makes the bucket, its policy and the
topic, as a person would on AWS), and the local SageMaker service's own credential, with which it assumes the
execution role for each job and watches the alarms that guard a deployment. Each stack makes its keys once and
keeps them like its passwords (mode 0600).
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import string
import subprocess
import sys
from pathlib import Path

from cli.iam import DEFAULT_PRINCIPAL_NAME, DEFAULT_TOPIC, Blanks, render
from local_aws import LOCAL_ACCOUNT, LOCAL_REGION
from local_sagemaker import processes
from local_sagemaker.processes import free_port

ADMIN_NAME = "mnist-pipeline-admin"
SAGEMAKER_SERVICE = "sagemaker.amazonaws.com"
SAGEMAKER_SERVICE_ROLE = "AWSServiceRoleForLocalSageMaker"
SAGEMAKER_SERVICE_POLICY = Path(__file__).resolve().parents[1] / "local_sagemaker" / "service-role-policy.json"
ADMINISTRATOR_ACCESS = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
LOCAL_AWS_START_TIMEOUT = 600.0  # the replay of a large state comes first


@dataclasses.dataclass(frozen=True)
class Key:
    """An access key id and its secret."""

    access_key_id: str
    secret_access_key: str

    @classmethod
    def new(cls) -> Key:
        alphabet = string.ascii_uppercase + string.digits
        return cls("AKIA" + "".join(secrets.choice(alphabet) for _ in range(16)), secrets.token_urlsafe(30))

    def environment(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": self.access_key_id, "AWS_SECRET_ACCESS_KEY": self.secret_access_key}


@dataclasses.dataclass(frozen=True)
class StackKeys:
    """The keys of a stack's principals: the administrator's, the pipeline's, the local SageMaker service's."""

    admin: Key
    pipeline: Key
    sagemaker: Key

    @classmethod
    def new(cls) -> StackKeys:
        return cls(Key.new(), Key.new(), Key.new())

    @classmethod
    def load(cls, path: Path) -> StackKeys:
        return cls.from_json(json.loads(path.read_text()))

    @classmethod
    def from_json(cls, data: dict) -> StackKeys:
        return cls(**{name: Key(**data[name]) for name in ("admin", "pipeline", "sagemaker")})

    def as_json(self) -> dict:
        return dataclasses.asdict(self)


def principals(
    keys: StackKeys, blanks: Blanks, *, role_policies: dict | None = None, users: list[dict] | None = None
) -> dict:
    """The local AWS's principals spec (local_aws.identities): the pipeline's user and execution role with the shipped
    policies filled with ``blanks``, the administrator, the local SageMaker service. ``role_policies``: the execution
    role's inline policies, if not the shipped one; ``users``: more users."""
    return {
        "account": blanks.account,
        "users": [
            {"name": ADMIN_NAME, **keys.admin.__dict__, "policies": {"AdministratorAccess": ADMINISTRATOR_ACCESS}},
            {
                "name": blanks.principal.rsplit("/", 1)[-1],
                **keys.pipeline.__dict__,
                "policies": {"airflow-policy": render("airflow-policy", blanks)},
            },
            *(users or []),
        ],
        "roles": [
            {
                "name": blanks.role,
                "trust": render("sagemaker-execution-role-trust", blanks),
                "policies": role_policies
                or {"sagemaker-execution-role-policy": render("sagemaker-execution-role-policy", blanks)},
            }
        ],
        "services": [
            {
                "service": SAGEMAKER_SERVICE,
                "role": SAGEMAKER_SERVICE_ROLE,
                **keys.sagemaker.__dict__,
                "policies": {"local-sagemaker": json.loads(SAGEMAKER_SERVICE_POLICY.read_text())},
            }
        ],
    }


def stack_blanks(*, region: str, bucket: str, prefix: str, role_arn: str, topic: str) -> Blanks:
    """The blanks of the local stack's policies: the local account, the pipeline's user by its default name."""
    return Blanks(
        account=LOCAL_ACCOUNT,
        region=region,
        bucket=bucket,
        prefix=prefix,
        role=role_arn.rsplit("/", 1)[-1],
        principal=f"arn:aws:iam::{LOCAL_ACCOUNT}:user/{DEFAULT_PRINCIPAL_NAME}",
        topic=topic,
    )


# The execution role of a scratch account (the tests', a benchmark's): beside the shipped policy, S3, logs and metrics
# anywhere, for the many buckets such runs make. The stack's role has the shipped policy alone.
SCRATCH_ROLE_POLICY = {
    "Version": "2012-10-17",
    "Statement": [
        {
            "Sid": "AnyBucket",
            "Effect": "Allow",
            "Action": ["s3:GetObject", "s3:PutObject", "s3:ListBucket"],
            "Resource": "*",
        },
        {
            "Sid": "JobLogsAndMetrics",
            "Effect": "Allow",
            "Action": [
                "logs:CreateLogGroup",
                "logs:CreateLogStream",
                "logs:PutLogEvents",
                "logs:DescribeLogStreams",
                "cloudwatch:PutMetricData",
            ],
            "Resource": "*",
        },
        {
            # Asynchronous inference tells its outcome to the endpoint config's topics, as the model's role.
            "Sid": "AsyncInferenceNotifications",
            "Effect": "Allow",
            "Action": "sns:Publish",
            "Resource": "*",
        },
    ],
}


def scratch_principals(keys: StackKeys) -> dict:
    """The principals of a scratch account: the stack's, for the default bucket and role, the role reaching anywhere."""
    from tasks.config import PipelineConfig

    blanks = config_blanks(PipelineConfig())
    policies = {
        "sagemaker-execution-role-policy": render("sagemaker-execution-role-policy", blanks),
        "scratch": SCRATCH_ROLE_POLICY,
    }
    return principals(keys, blanks, role_policies=policies)


def start_scratch_aws(directory: Path, keys: StackKeys, **options) -> tuple[subprocess.Popen, str]:
    """A local AWS of a scratch account's principals (``scratch_principals``), its spec in ``directory``."""
    write_private(directory / "principals.json", scratch_principals(keys))
    return start_local_aws(directory / "principals.json", **options)


def write_private(path: Path, data: dict) -> None:
    """Write JSON readable by this user only (keys, passwords), atomically and durably."""
    from local_sagemaker.store import write_atomically

    write_atomically(path, json.dumps(data, indent=2).encode(), mode=0o600)


def start_local_aws(
    principals_file: Path,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    region: str = LOCAL_REGION,
    log_path: Path | None = None,
    state_file: Path | None = None,
    decision_log: Path | None = None,
) -> tuple[subprocess.Popen, str]:
    """Start the local AWS in its own process (session); returns it with its endpoint URL once it serves.

    With ``state_file`` the state outlives the process (moto's recording, replayed at the next start); without it,
    the state lives and dies with the process. ``decision_log``: every IAM decision, as JSON lines."""
    port = port or free_port(host)
    command = [
        sys.executable,
        "-m",
        "local_aws",
        "--principals",
        str(principals_file),
        "--host",
        host,
        "--port",
        str(port),
        "--region",
        region,
    ]
    if state_file is not None:
        command += ["--state-file", str(Path(state_file).resolve())]
    if decision_log is not None:
        command += ["--decision-log", str(Path(decision_log).resolve())]
    process, _ = processes.spawn(command, env=processes.allowed_env({"PYTHONUNBUFFERED": "1"}), log_path=log_path)
    endpoint_url = f"http://{host}:{port}"
    try:
        processes.wait_for_http(f"{endpoint_url}/_local/health", timeout=LOCAL_AWS_START_TIMEOUT, process=process)
    except BaseException:
        process.kill()
        raise
    return process, endpoint_url


def connection_uri(
    endpoint_url: str,
    key: Key,
    region: str = LOCAL_REGION,
    sagemaker_endpoint: str | None = None,
    runtime_endpoint: str | None = None,
) -> str:
    """An Airflow AWS connection (JSON form, for AIRFLOW_CONN_<ID>) signing with ``key``: every service at the local
    AWS (``endpoint_url``), and with ``sagemaker_endpoint`` and ``runtime_endpoint`` SageMaker's two APIs at the local
    SageMaker service (its control plane and its runtime), by the provider's per-service ``service_config``."""
    extra: dict = {"endpoint_url": endpoint_url, "region_name": region}
    if sagemaker_endpoint or runtime_endpoint:
        if not (sagemaker_endpoint and runtime_endpoint):
            raise ValueError("the local SageMaker service takes both endpoints: the control plane's and the runtime's")
        extra["service_config"] = {
            "sagemaker": {"endpoint_url": sagemaker_endpoint},
            "sagemaker-runtime": {"endpoint_url": runtime_endpoint},
        }
    return json.dumps(
        {"conn_type": "aws", "login": key.access_key_id, "password": key.secret_access_key, "extra": extra}
    )


# -- docker-compose: the keys come from .env, the rest from the pipeline's configuration -------------------------

# The .env variables of each principal's key.
KEY_VARIABLES = {
    "admin": ("LOCAL_AWS_ADMIN_ACCESS_KEY_ID", "LOCAL_AWS_ADMIN_SECRET_ACCESS_KEY"),
    "pipeline": ("PIPELINE_AWS_ACCESS_KEY_ID", "PIPELINE_AWS_SECRET_ACCESS_KEY"),
    "sagemaker": ("LOCAL_SAGEMAKER_AWS_ACCESS_KEY_ID", "LOCAL_SAGEMAKER_AWS_SECRET_ACCESS_KEY"),
}


def key_from_environment(env, who: str) -> Key:
    """The key of ``who`` (admin, pipeline, sagemaker) as docker-compose passes it (KEY_VARIABLES); ValueError naming
    what is missing."""
    identity, secret = KEY_VARIABLES[who]
    missing = [name for name in (identity, secret) if not env.get(name)]
    if missing:
        raise ValueError(f"set {', '.join(missing)} in .env (python -m cli.compose_secrets --new prints them)")
    return Key(env[identity], env[secret])


def config_blanks(config) -> Blanks:
    """The blanks of the local policies for the pipeline configuration ``config`` (tasks.config.PipelineConfig)."""
    return stack_blanks(
        region=config.region,
        bucket=config.bucket,
        prefix=config.prefix,
        role_arn=config.role_arn,
        topic=config.alert_topic_arn.rsplit(":", 1)[-1] or DEFAULT_TOPIC,
    )


def main(argv: list[str] | None = None) -> int:
    """`python -m cli.local_aws serve ...` runs the local AWS with the principals of .env's keys (the compose
    service); `python -m cli.local_aws setup --endpoint-url URL` makes the bucket and its policy as the
    administrator (the compose init service)."""
    import argparse
    import os
    import tempfile

    from tasks.config import load_config

    parser = argparse.ArgumentParser(prog="python -m cli.local_aws", description=main.__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "serve", help="run the local AWS in the foreground (then: python -m local_aws's options)", add_help=False
    )
    setup = commands.add_parser("setup", help="make the bucket and its policy, as the account's administrator")
    setup.add_argument("--endpoint-url", required=True)
    args, options = parser.parse_known_args(argv)
    if args.command == "setup" and options:
        parser.error(f"unrecognized arguments: {' '.join(options)}")
    config = load_config()
    try:
        keys = StackKeys(*(key_from_environment(os.environ, who) for who in ("admin", "pipeline", "sagemaker")))
    except ValueError as error:
        print(f"refusing to start: {error}", file=sys.stderr)
        return 1
    if args.command == "setup":
        setup_bucket(args.endpoint_url, keys.admin, config)
        return 0
    from local_aws.server import main as serve_local_aws

    spec = Path(tempfile.mkdtemp(prefix="local-aws-")) / "principals.json"
    write_private(spec, principals(keys, config_blanks(config)))
    serve_local_aws(["--principals", str(spec), "--region", config.region, *options])
    return 0


def setup_bucket(endpoint_url: str, admin: Key, config) -> None:
    """The pipeline's bucket with its policy (iam/bucket-policy.json), as a person makes them once on AWS."""
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=config.region,
        aws_access_key_id=admin.access_key_id,
        aws_secret_access_key=admin.secret_access_key,
    )
    if config.bucket not in {bucket["Name"] for bucket in s3.list_buckets()["Buckets"]}:
        s3.create_bucket(Bucket=config.bucket)
    s3.put_bucket_policy(Bucket=config.bucket, Policy=json.dumps(render("bucket-policy", config_blanks(config))))


if __name__ == "__main__":
    sys.exit(main())
