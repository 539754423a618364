"""The docker-compose stack's secrets, checked before anything starts (its `airflow-init` service runs this).

`.env.example` ships them empty, and compose refuses an empty one (`${VAR:?...}`). This refuses what would still
start a stack anyone could log into or decrypt: a value shorter than 16 characters, a placeholder left in
(`replace-me`, `changeme`, ...), a Fernet key that is not one. Each problem is named; nothing is printed of the
values themselves.

    python -m cli.compose_secrets          # exit 1 naming every weak secret, else 0
    python -m cli.compose_secrets --new    # print a fresh set for .env
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import sys
from collections.abc import Mapping
from urllib.parse import urlsplit

MIN_LENGTH = 16
# Words of six letters or more: a random token_urlsafe(32) holds one by chance about once in ten million.
PLACEHOLDERS = re.compile(r"replace|change|example|secret|password|airflow|local-only", re.I)
# The variables the Airflow containers see (docker-compose.yaml), and where the .env value hides in each.
SECRETS = {
    "AIRFLOW__API_AUTH__JWT_SECRET": "AIRFLOW_JWT_SECRET",
    "AIRFLOW__API__SECRET_KEY": "AIRFLOW_SECRET_KEY",
    "AIRFLOW__CORE__FERNET_KEY": "AIRFLOW_FERNET_KEY",
    "AIRFLOW_ADMIN_PASSWORD": "AIRFLOW_ADMIN_PASSWORD",
    # The local AWS's keys: the pipeline's user (what Airflow signs with), the administrator, the SageMaker service.
    "PIPELINE_AWS_SECRET_ACCESS_KEY": "PIPELINE_AWS_SECRET_ACCESS_KEY",
    "LOCAL_AWS_ADMIN_SECRET_ACCESS_KEY": "LOCAL_AWS_ADMIN_SECRET_ACCESS_KEY",
    "LOCAL_SAGEMAKER_AWS_SECRET_ACCESS_KEY": "LOCAL_SAGEMAKER_AWS_SECRET_ACCESS_KEY",
}
DATABASE = "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"  # its password is POSTGRES_PASSWORD


def problems(env: Mapping[str, str]) -> list[str]:
    """Every weak or missing secret in ``env``, named by its .env variable."""
    found = []
    values = {name: env.get(variable) for variable, name in SECRETS.items() if variable in env}
    if DATABASE in env:
        values["POSTGRES_PASSWORD"] = urlsplit(env[DATABASE]).password
    for name in (*SECRETS.values(), "POSTGRES_PASSWORD"):
        if name not in values:
            continue
        value = values[name] or ""
        if not value:
            found.append(f"{name} is empty: set it in .env")
        elif len(value) < MIN_LENGTH:
            found.append(f"{name} is shorter than {MIN_LENGTH} characters")
        elif PLACEHOLDERS.search(value):
            found.append(f"{name} looks like a placeholder ({PLACEHOLDERS.search(value).group(0)!r} in it)")
    if values.get("AIRFLOW_FERNET_KEY"):
        from cryptography.fernet import Fernet

        try:
            Fernet(values["AIRFLOW_FERNET_KEY"])
        except ValueError:
            found.append("AIRFLOW_FERNET_KEY is not a Fernet key (32 url-safe base64-encoded bytes)")
    return found


def fresh() -> dict[str, str]:
    from cryptography.fernet import Fernet

    from cli.local_aws import KEY_VARIABLES, Key

    values = {
        name: secrets.token_urlsafe(32)
        for name in ("POSTGRES_PASSWORD", "AIRFLOW_ADMIN_PASSWORD", "AIRFLOW_JWT_SECRET", "AIRFLOW_SECRET_KEY")
    }
    for identity, secret in KEY_VARIABLES.values():
        key = Key.new()
        values.update({identity: key.access_key_id, secret: key.secret_access_key})
    return {**values, "AIRFLOW_FERNET_KEY": Fernet.generate_key().decode()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cli.compose_secrets", description=__doc__.splitlines()[0])
    parser.add_argument("--new", action="store_true", help="print fresh secrets as .env lines")
    args = parser.parse_args(argv)
    if args.new:
        print("\n".join(f"{name}={value}" for name, value in fresh().items()))
        return 0
    found = problems(os.environ)
    for problem in found:
        print(f"refusing to start: {problem}", file=sys.stderr)
    if found:
        print("generate real values with: python -m cli.compose_secrets --new", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
