"""Who signs a request, and which policies apply to them: the principals of the local AWS's IAM (moto's backend).

The stack's principals are made at each start from a spec it writes (mode 0600), with the access keys it keeps, so
that the same keys work across restarts (IAM's CreateAccessKey would draw new ones): users with inline policies,
roles with a trust policy and inline policies, and each AWS service's own credential. Everything else IAM holds
(roles and users made through the API, attached and inline policies, STS sessions) is moto's, as recorded.

    {"account": "000000000000",
     "users": [{"name": "...", "access_key_id": "AKIA...", "secret_access_key": "...", "policies": {name: document}}],
     "roles": [{"name": "...", "trust": document, "policies": {name: document}}],
     "services": [{"service": "sagemaker.amazonaws.com", "role": "...", "access_key_id": "...",
                   "secret_access_key": "...", "policies": {name: document}}]}

A service credential is how a local stand-in for an AWS service (the local SageMaker service) signs what that
service does in the account. It acts as the service principal itself where AWS evaluates one (assuming a customer's
role, against the role's trust policy), and otherwise as the service's own service-linked role, with its policies.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import threading

SERVICE_ROLE_PATH = "/aws-service-role/{service}/"


@dataclasses.dataclass(frozen=True)
class Principal:
    """Who made a request, as IAM's evaluation and its messages see them.

    ``arn``: what AccessDenied names (``arn:aws:sts::ACCOUNT:assumed-role/ROLE/SESSION`` for a session);
    ``principal_arn``: ``aws:PrincipalArn`` (the role's ARN for its sessions); ``kind``: ``aws:PrincipalType``
    (User, AssumedRole, Service, Anonymous); ``service``: for a service credential, the service principal it acts as.
    """

    arn: str
    kind: str
    account: str
    principal_arn: str
    user_id: str
    name: str | None = None
    role_name: str | None = None
    session_policy: str | None = None
    service: str | None = None


ANONYMOUS = Principal(arn="anonymous", kind="Anonymous", account="", principal_arn="", user_id="anonymous")


@dataclasses.dataclass(frozen=True)
class Credential:
    secret: str
    principal: Principal
    session_token: str | None = None
    expires: datetime.datetime | None = None


class Identities:
    """The principals of one account in moto's IAM and STS backends, read where they live (the process's memory)."""

    def __init__(self, account: str, region: str):
        self.account, self.region = account, region
        self._services: dict[str, Credential] = {}
        self._lock = threading.Lock()

    @property
    def iam(self):
        from moto.iam.models import iam_backends

        return iam_backends[self.account]["global"]

    @property
    def sts(self):
        from moto.sts.models import sts_backends

        return sts_backends[self.account]["global"]

    # -- the stack's principals -----------------------------------------------------------------------------------

    def bootstrap(self, spec: dict) -> None:
        """Make the spec's users, roles and service credentials (again): each as the spec says now, keys included."""
        if spec.get("account", self.account) != self.account:
            raise ValueError(f"the principals' spec is for account {spec['account']}, this local AWS is {self.account}")
        iam = self.iam
        for user in spec.get("users", []):
            if user["name"] not in iam.users:
                iam.create_user(self.region, user["name"])
            record = iam.users[user["name"]]
            for old in list(record.access_keys):
                iam.access_keys.pop(old.access_key_id, None)
            record.access_keys.clear()
            key = iam.create_access_key(user["name"])
            iam.access_keys.pop(key.access_key_id, None)
            key.access_key_id, key.secret_access_key = user["access_key_id"], user["secret_access_key"]
            iam.access_keys[key.access_key_id] = key
            record.policies.clear()
            for name, document in user.get("policies", {}).items():
                iam.put_user_policy(user["name"], name, json.dumps(document))
        for role in spec.get("roles", []):
            self._role(role["name"], role["trust"], role.get("policies", {}))
        services = {}
        for service in spec.get("services", []):
            trust = {
                "Version": "2012-10-17",
                "Statement": [
                    {"Effect": "Allow", "Principal": {"Service": service["service"]}, "Action": "sts:AssumeRole"}
                ],
            }
            record = self._role(
                service["role"],
                trust,
                service.get("policies", {}),
                path=SERVICE_ROLE_PATH.format(service=service["service"]),
            )
            principal = self._principal(
                "Service",
                record.arn,
                f"{record.id}:{service['service']}",
                role_name=record.name,
                service=service["service"],
            )
            services[service["access_key_id"]] = Credential(service["secret_access_key"], principal)
        with self._lock:
            self._services = services

    def _role(self, name: str, trust: dict, policies: dict, path: str = "/"):
        iam = self.iam
        try:
            record = iam.get_role(name)
            record.assume_role_policy_document = json.dumps(trust)
        except _not_found():
            record = iam.create_role(name, json.dumps(trust), path, None, "", [], "43200")
        record.policies.clear()
        for policy_name, document in policies.items():
            iam.put_role_policy(name, policy_name, json.dumps(document))
        return record

    def _principal(self, kind: str, arn: str, user_id: str, principal_arn: str | None = None, **names) -> Principal:
        """A principal of this account; its ``aws:PrincipalArn`` is ``arn`` itself but for a session (its role's)."""
        return Principal(
            arn=arn,
            kind=kind,
            account=self.account,
            principal_arn=arn if principal_arn is None else principal_arn,
            user_id=user_id,
            **names,
        )

    # -- lookups --------------------------------------------------------------------------------------------------

    def credential(self, access_key_id: str) -> Credential | None:
        """The credential an access key id names: a user's key, an STS session's, or a service's; None if none."""
        if (service := self._services.get(access_key_id)) is not None:
            return service
        iam = self.iam
        for user in list(iam.users.values()):
            for key in user.access_keys:
                if key.access_key_id == access_key_id and key.status == "Active":
                    principal = self._principal("User", user.arn, user.id, name=user.name)
                    return Credential(key.secret_access_key, principal)
        for session in list(self.sts.assumed_roles):
            if session.access_key_id == access_key_id:
                role_name = session.role_arn.split("/")[-1]
                try:
                    role_id = iam.get_role_by_arn(session.role_arn).id
                except _not_found():  # the role is gone: its sessions sign nothing any more
                    return None
                principal = self._principal(
                    "AssumedRole",
                    session.arn,
                    f"{role_id}:{session.session_name}",
                    principal_arn=session.role_arn,
                    role_name=role_name,
                    session_policy=session.policy or None,
                )
                expires = session.expiration.replace(tzinfo=datetime.UTC)
                return Credential(session.secret_access_key, principal, session.session_token, expires)
        return None

    def identity_policies(self, principal: Principal) -> list[dict]:
        """The principal's identity-based policies, each as iam-simulate takes it: {"name", "policy"}."""
        if principal.kind == "User":
            found = self.entity_policies("user", principal.name)
        elif principal.kind in ("AssumedRole", "Service"):
            found = self.entity_policies("role", principal.role_name)
        else:
            found = None
        return found[1] if found is not None else []

    def entity_policies(self, kind: str, name: str) -> tuple[str, list[dict]] | None:
        """The ARN and the identity-based policies of the ``kind`` (user, group, role) named ``name``, each policy as
        iam-simulate takes it ({"name", "policy"}; a user's include its groups'); None when there is no such entity."""
        iam = self.iam
        try:
            entity = {"user": iam.get_user, "group": iam.get_group, "role": iam.get_role}[kind](name)
        except _not_found():
            return None
        policies = [(f"{kind}/{entity.name}/{policy}", document) for policy, document in entity.policies.items()]
        policies += [(arn, _managed_document(policy)) for arn, policy in entity.managed_policies.items()]
        for group in iam.get_groups_for_user(entity.name) if kind == "user" else ():
            policies += [(f"group/{group.name}/{policy}", document) for policy, document in group.policies.items()]
            policies += [(arn, _managed_document(policy)) for arn, policy in group.managed_policies.items()]
        return entity.arn, [{"name": label, "policy": _document(document)} for label, document in policies]

    def trust_policy(self, role_arn: str) -> dict | None:
        """The trust policy of the role ``role_arn`` names, or None when there is no such role."""
        try:
            return _document(self.iam.get_role_by_arn(role_arn).assume_role_policy_document)
        except _not_found():
            return None


def _not_found() -> type[Exception]:
    """What moto's IAM raises for a user, role or group that is not there."""
    from moto.iam.exceptions import IAMException

    return IAMException


def _managed_document(policy) -> str:
    return next(version.document for version in policy.versions if version.version_id == policy.default_version_id)


def _document(document) -> dict:
    if isinstance(document, dict):
        return document
    from urllib.parse import unquote

    text = document if document.lstrip().startswith("{") else unquote(document)
    return json.loads(text)
