"""`mnist-pipeline models`, `approve` and `reject`: the model registry for people, through the pipeline's AWS
connection (the running local stack's when the environment names no other), as the DAG itself reads it."""

from __future__ import annotations

import contextlib
import getpass
import json
import sys

from tasks.config import load_config
from tasks.names import DEFAULT_ENDPOINT


def _connected():
    from cli.stack import use_stack_connection

    config = load_config()
    use_stack_connection(config)
    return config


def models_command(args) -> int:
    """The versions of an endpoint's group, newest first, the champion marked."""
    from botocore.exceptions import BotoCoreError, ClientError
    from rich.console import Console
    from rich.table import Table

    from tasks import registry

    console = Console(soft_wrap=True)
    config = _connected()
    try:
        with contextlib.redirect_stdout(sys.stderr):  # Airflow's hooks log to stdout
            champion = registry.champion(config, args.endpoint)
            described = [
                registry.describe(config, s["ModelPackageArn"]) for s in registry.versions(config, args.endpoint)
            ]
    except (ClientError, BotoCoreError) as error:
        console.print(f"[red]error:[/] {error}")
        return 1
    rows = [
        {
            **registry.as_model(description),
            "champion": bool(champion) and champion["version"] == description["ModelPackageVersion"],
            "created": description["CreationTime"].isoformat(timespec="seconds"),
        }
        for description in described
    ]
    if args.json:
        print(json.dumps(rows))
        return 0
    table = Table(
        "version",
        "status",
        "test accuracy",
        "hidden_channels",
        "run",
        "created",
        title=f"Model registry group {args.endpoint}",
    )
    table.add_column("training job", overflow="fold")
    for row in rows:
        status = row["approval"] + (" · champion" if row["champion"] else "")
        table.add_row(
            str(row["version"]),
            status,
            f"{100 * row['test_accuracy']:.2f}%",
            str(row["hidden_channels"]),
            row["run_id"] or "-",
            row["created"][:16],
            row["training_job_name"],
        )
    console.print(table if rows else f"Group {args.endpoint} has no versions yet.")
    return 0


def _decide(args, status: str) -> int:
    from botocore.exceptions import BotoCoreError, ClientError
    from rich.console import Console

    from tasks import registry

    console = Console(soft_wrap=True)
    config = _connected()
    reason = args.reason or f"{status.lower()} by {getpass.getuser()} with mnist-pipeline"
    try:
        with contextlib.redirect_stdout(sys.stderr):
            version = registry.find_version(config, args.endpoint, args.version)
            registry.set_approval(config, version["ModelPackageArn"], status, reason)
    except registry.VersionNotFound as error:
        console.print(f"[red]error:[/] {error}")
        return 2
    except (ClientError, BotoCoreError) as error:
        console.print(f"[red]error:[/] {error}")
        return 1
    console.print(
        f"Version {version['ModelPackageVersion']} of {args.endpoint} ({version['ModelPackageArn']}): "
        f"{version['ModelApprovalStatus']} → [bold]{status}[/]."
    )
    if status == registry.APPROVED:
        console.print(
            "The next run of mnist_sweep serves it, or now: mnist-pipeline run --param deploy_only=true"
            + (f" --param endpoint_name={args.endpoint}" if args.endpoint != DEFAULT_ENDPOINT else "")
        )
    return 0


def approve_command(args) -> int:
    from tasks.registry import APPROVED

    return _decide(args, APPROVED)


def reject_command(args) -> int:
    from tasks.registry import REJECTED

    return _decide(args, REJECTED)
