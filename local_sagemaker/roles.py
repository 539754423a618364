"""The execution roles the service acts as: what a job, a model server or a transform job does in AWS is done with
the credentials of its role, never with the service's own or the caller's.

As SageMaker does, the service assumes the role through STS as the service principal ``sagemaker.amazonaws.com``,
saying which account and resource it acts for (``aws:SourceAccount``, ``aws:SourceArn``): the role's trust policy
decides. A request that names a role the service cannot assume is refused when it is made, in SageMaker's words.
The credentials last an hour and are renewed before they end. The service's own work for a job (its channels, its
artifacts, its log) uses them through boto3 clients; a job's processes get them from the service's credentials
endpoint (``AWS_CONTAINER_CREDENTIALS_FULL_URI`` with a token of their own, as botocore's container provider reads
them), so that a model server that runs for days always holds live ones.
"""

from __future__ import annotations

import datetime
import secrets
import threading

from local_sagemaker.protocol import ValidationException

SESSION_SECONDS = 3600
RENEW_SECONDS = 15 * 60  # renewed this long before they end (botocore asks its provider again within 15 minutes)
SERVICE_PRINCIPAL = "sagemaker.amazonaws.com"
CREDENTIALS_PATH = "/_local/credentials"


class RoleSession:
    """One role assumed for one resource: boto3 clients on renewable credentials."""

    def __init__(self, roles: Roles, role_arn: str, source_arn: str):
        import botocore.session
        from botocore.credentials import RefreshableCredentials

        self.roles, self.role_arn, self.source_arn = roles, role_arn, source_arn
        self._clients: dict[str, object] = {}
        self._lock = threading.Lock()
        botocore_session = botocore.session.Session()
        # Models are loaded once per process, not once per role (a new loader reads botocore's JSON files again).
        botocore_session.register_component("data_loader", roles.data_loader)
        botocore_session._credentials = RefreshableCredentials.create_from_metadata(
            metadata=self.metadata(), refresh_using=self.metadata, method="sts-assume-role"
        )
        self._session = botocore_session

    def metadata(self) -> dict:
        credentials = self.roles.credentials(self.role_arn, self.source_arn)
        return {
            "access_key": credentials["AccessKeyId"],
            "secret_key": credentials["SecretAccessKey"],
            "token": credentials["SessionToken"],
            "expiry_time": credentials["Expiration"].isoformat(),
        }

    def client(self, service: str):
        import boto3
        from botocore.config import Config

        with self._lock:
            if service not in self._clients:
                session = boto3.session.Session(botocore_session=self._session)
                self._clients[service] = session.client(
                    service, config=Config(retries={"max_attempts": 3, "mode": "standard"})
                )
            return self._clients[service]


class Roles:
    """Role credentials for resources of one account and region, assumed with the service's own credential."""

    def __init__(self, region: str, account: str):
        self.region, self.account = region, account
        self._credentials: dict[tuple[str, str], dict] = {}
        self._tokens: dict[str, tuple[str, str]] = {}
        self._lock = threading.Lock()
        self._sts = None

    @property
    def data_loader(self):
        from local_sagemaker import aws

        return aws.session()._session.get_component("data_loader")

    def check(self, role_arn: str, source_arn: str) -> None:
        """ValidationException, as SageMaker words it, unless the service may assume ``role_arn`` for the resource
        ``source_arn``."""
        self.credentials(role_arn, source_arn)

    def session(self, role_arn: str, source_arn: str) -> RoleSession:
        return RoleSession(self, role_arn, source_arn)

    def credentials(self, role_arn: str, source_arn: str) -> dict:
        """Live credentials of ``role_arn`` for ``source_arn`` (STS's AssumeRole answer), renewed when near their end."""
        key = (role_arn, source_arn)
        with self._lock:
            held = self._credentials.get(key)
        now = datetime.datetime.now(datetime.UTC)
        if held is not None and held["Expiration"] - now > datetime.timedelta(seconds=RENEW_SECONDS):
            return held
        fresh = self._assume(role_arn, source_arn)
        with self._lock:
            self._credentials[key] = fresh
        return fresh

    def _assume(self, role_arn: str, source_arn: str) -> dict:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            answer = self._client().assume_role(
                RoleArn=role_arn,
                RoleSessionName="SageMaker",
                DurationSeconds=SESSION_SECONDS,
                LocalSourceArn=source_arn,
            )
        except ClientError as error:
            raise ValidationException(
                f"Could not assume role {role_arn}. Please ensure that the role exists and allows principal "
                f"'{SERVICE_PRINCIPAL}' to assume the role. ({error.response['Error']['Code']}: "
                f"{error.response['Error']['Message']})"
            ) from None
        except BotoCoreError as error:
            raise ValidationException(f"Could not assume role {role_arn}: {error}") from None
        return answer["Credentials"]

    def _client(self):
        with self._lock:
            if self._sts is None:
                from local_sagemaker import aws

                sts = aws.client("sts")
                events = sts.meta.events
                events.register("before-parameter-build.sts.AssumeRole", _take_source)
                events.register("before-sign.sts.AssumeRole", self._sign_source)
                self._sts = sts
            return self._sts

    def _sign_source(self, request, **_) -> None:
        # What the service acts for, as AWS's services say it to STS: signed, so only the service can say it.
        request.headers["x-amz-source-account"] = self.account
        if source := request.context.get("local_source_arn"):
            request.headers["x-amz-source-arn"] = source

    # -- the processes' credentials endpoint -------------------------------------------------------------------------

    def process_environment(self, role_arn: str, source_arn: str, endpoint_url: str) -> dict[str, str]:
        """The environment through which a process of the resource gets its role's credentials."""
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._tokens[token] = (role_arn, source_arn)
        return {
            "AWS_CONTAINER_CREDENTIALS_FULL_URI": f"{endpoint_url}{CREDENTIALS_PATH}",
            "AWS_CONTAINER_AUTHORIZATION_TOKEN": token,
        }

    def adopt(self, token: str, role_arn: str, source_arn: str) -> None:
        """A process started by an earlier run of the service goes on with its token."""
        with self._lock:
            self._tokens[token] = (role_arn, source_arn)

    def forget(self, environment: dict[str, str]) -> None:
        """The process that held ``environment`` has ended: its token opens nothing any more."""
        with self._lock:
            self._tokens.pop(environment.get("AWS_CONTAINER_AUTHORIZATION_TOKEN", ""), None)

    def for_token(self, token: str) -> dict | None:
        """The credentials the token's process may have, as the container credentials endpoint answers them."""
        with self._lock:
            held = self._tokens.get(token)
        if held is None:
            return None
        credentials = self.credentials(*held)
        return {
            "AccessKeyId": credentials["AccessKeyId"],
            "SecretAccessKey": credentials["SecretAccessKey"],
            "Token": credentials["SessionToken"],
            "Expiration": credentials["Expiration"].strftime("%Y-%m-%dT%H:%M:%SZ"),
        }


def _take_source(params: dict, context: dict, **_) -> None:
    if "LocalSourceArn" in params:
        context["local_source_arn"] = params.pop("LocalSourceArn")
