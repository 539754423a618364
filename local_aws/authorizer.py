"""Authorization as AWS decides it: the principal's identity-based policies (and a session's policy), the resource's
policy where one applies, and the request's context keys, evaluated by iam-simulate (local_aws.evaluator).

The context holds the global keys AWS sets for every request (aws:PrincipalArn, aws:PrincipalAccount,
aws:PrincipalType, aws:userid, aws:username, aws:CurrentTime, aws:EpochTime, aws:SecureTransport, aws:SourceIp,
aws:RequestedRegion, ...) beside the keys of the action itself (local_aws.permissions). A service credential
assuming a customer's role acts as the service principal, with aws:SourceAccount and aws:SourceArn as the service
says.

Decisions are cached: the same principal, action, resource, context and resource policy get the same answer until
IAM changes (``changed()``), except where a policy reads the time or the signature's age. Every decision the
evaluator makes is appended to the decision log (JSON lines), which the policy tests replay.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

from local_aws.evaluator import Decision, Evaluator, literal
from local_aws.identities import Principal
from local_aws.permissions import Requirement

# Keys whose values change from one request to the next: a decision that depends on them is never cached.
VOLATILE_KEYS = ("aws:CurrentTime", "aws:EpochTime", "s3:signatureAge", "aws:TokenIssueTime")
_VOLATILE_IN_POLICY = tuple(key.lower() for key in VOLATILE_KEYS)
CACHE_ENTRIES = 100_000
DECISION_LOG_BYTES = 64 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class Denial:
    """A request IAM refused: the requirement it failed and the words AWS uses for it."""

    requirement: Requirement
    decision: Decision
    message: str


def denial_message(principal: Principal, requirement: Requirement, decision: Decision, *, quote: bool = False) -> str:
    """AWS's AccessDenied message: who, which action, on what, and which kind of policy said no. ``quote``: S3 puts
    the resource in quotes."""
    action, resource = requirement.action, requirement.resource
    if principal.kind == "Anonymous":
        return "Access Denied"
    as_service = principal.service is not None and action == "sts:AssumeRole"
    who = principal.service if as_service else principal.arn
    # An explicit deny says most; a service principal has no identity-based policies, only the resource's counts.
    denials = sorted(
        decision.denials, key=lambda d: (d["denialType"] != "Explicit", (d["policyType"] == "resource") != as_service)
    )
    denial = denials[0] if denials else {"policyType": "identity", "denialType": "Implicit"}
    kind = {
        "identity": "identity-based",
        "resource": "resource-based",
        "session": "session",
        "pb": "permissions boundary",
        "scp": "service control",
        "rcp": "resource control",
    }.get(denial["policyType"], denial["policyType"])
    if denial["denialType"] == "Explicit":
        reason = f"with an explicit deny in a{'n' if kind[0] in 'aeiou' else ''} {kind} policy"
    else:
        reason = f"because no {kind} policy allows the {action} action"
    shown = f'"{resource}"' if quote else resource
    return f"User: {who} is not authorized to perform: {action} on resource: {shown} {reason}"


class Authorizer:
    """Decides requirements for principals of one account and region; ``policies`` gives the identity policies of a
    principal, ``resource_policy`` the resource-based policy a requirement names (None: none)."""

    def __init__(
        self,
        *,
        account: str,
        region: str,
        evaluator: Evaluator,
        policies: Callable[[Principal], list[dict]],
        resource_policy: Callable[[str, str], dict | None],
        decision_log: Path | None = None,
    ):
        self.account, self.region = account, region
        self.evaluator = evaluator
        self.policies, self.resource_policy = policies, resource_policy
        self.decision_log = decision_log
        self._cache: dict[tuple, Decision] = {}
        self._generation = 0
        self._lock = threading.Lock()

    @property
    def generation(self) -> int:
        """How many times IAM has changed since the start."""
        return self._generation

    def changed(self) -> None:
        """IAM or a resource policy changed: nothing decided before holds."""
        with self._lock:
            self._generation += 1
            self._cache.clear()

    def check(
        self,
        principal: Principal,
        requirements: list[Requirement],
        *,
        source_ip: str = "127.0.0.1",
        extra_context: Mapping[str, str] | None = None,
        signed_at: datetime.datetime | None = None,
        quote: bool = False,
    ) -> Denial | None:
        """The first requirement the principal is refused, with AWS's message, or None when all are allowed."""
        for requirement in requirements:
            decision = self.decide(
                principal, requirement, source_ip=source_ip, extra_context=extra_context, signed_at=signed_at
            )
            if not decision.allowed:
                return Denial(requirement, decision, denial_message(principal, requirement, decision, quote=quote))
        return None

    def decide(
        self,
        principal: Principal,
        requirement: Requirement,
        *,
        source_ip: str = "127.0.0.1",
        extra_context: Mapping[str, str] | None = None,
        signed_at: datetime.datetime | None = None,
    ) -> Decision:
        as_service = principal.service is not None and requirement.action == "sts:AssumeRole"
        identity = [] if as_service or principal.kind == "Anonymous" else self.policies(principal)
        resource_policy = self.resource_policy(*requirement.resource_policy) if requirement.resource_policy else None
        session_policy = json.loads(principal.session_policy) if principal.session_policy else None
        context = {
            **self._global_context(principal, as_service, source_ip, signed_at),
            **requirement.context,
            **(extra_context or {}),
        }
        documents = json.dumps([identity, resource_policy, session_policy], sort_keys=True)
        cacheable = not any(key in documents.lower() for key in _VOLATILE_IN_POLICY)
        stable = tuple(sorted((key, json.dumps(value)) for key, value in context.items() if key not in VOLATILE_KEYS))
        key = (
            principal.arn,
            as_service,
            requirement.action,
            requirement.resource,
            stable,
            hashlib.sha256(documents.encode()).hexdigest(),
        )
        if cacheable and (cached := self._cache.get(key)) is not None:
            return cached
        with self._lock:
            generation = self._generation
        # An S3 ARN names the bucket and the key the request gives, and a key may hold a `*`: the name of one object,
        # never a pattern. (Elsewhere a `*` stands where the request names no resource: local_aws.permissions.)
        resource = (
            literal(requirement.resource) if requirement.resource.startswith("arn:aws:s3:::") else requirement.resource
        )
        simulation = {
            "request": {
                "principal": principal.service
                if as_service
                else ({"type": "Anonymous"} if principal.kind == "Anonymous" else principal.arn),
                "action": requirement.action,
                "resource": {"resource": resource, "accountId": self.account},
                "contextVariables": context,
            },
            "identityPolicies": identity,
        }
        if resource_policy is not None:
            simulation["resourcePolicy"] = resource_policy
        if session_policy is not None and not as_service:
            simulation["sessionPolicy"] = session_policy
        decision = dataclasses.replace(self.evaluator.evaluate(simulation), cacheable=cacheable)
        self._log(principal, requirement, context, decision, as_service)
        with self._lock:
            if cacheable and generation == self._generation:
                if len(self._cache) >= CACHE_ENTRIES:
                    self._cache.clear()
                self._cache[key] = decision
        return decision

    def _global_context(
        self, principal: Principal, as_service: bool, source_ip: str, signed_at: datetime.datetime | None
    ) -> dict[str, str]:
        now = datetime.datetime.now(datetime.UTC)
        context = {
            "aws:CurrentTime": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "aws:EpochTime": str(int(now.timestamp())),
            "aws:SecureTransport": "false",
            "aws:SourceIp": source_ip,
            "aws:RequestedRegion": self.region,
            "aws:ViaAWSService": "false",
        }
        if as_service:
            context.update({"aws:PrincipalServiceName": principal.service, "aws:PrincipalIsAWSService": "true"})
        elif principal.kind != "Anonymous":
            context.update(
                {
                    "aws:PrincipalArn": principal.principal_arn,
                    "aws:PrincipalAccount": principal.account,
                    "aws:PrincipalType": "AssumedRole" if principal.kind == "Service" else principal.kind,
                    "aws:userid": principal.user_id,
                    "aws:PrincipalIsAWSService": "false",
                }
            )
            if principal.kind == "User":
                context["aws:username"] = principal.name
        if signed_at is not None:
            context["s3:signatureAge"] = str(int((now - signed_at).total_seconds() * 1000))
        return context

    def _log(
        self, principal: Principal, requirement: Requirement, context: dict, decision: Decision, as_service: bool
    ) -> None:
        if self.decision_log is None:
            return
        entry = {
            "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds"),
            "principal": dataclasses.asdict(principal),
            "as_service": as_service,
            "action": requirement.action,
            "resource": requirement.resource,
            "resource_policy": list(requirement.resource_policy) if requirement.resource_policy else None,
            "context": {key: value for key, value in context.items() if key not in VOLATILE_KEYS},
            "result": decision.result,
            "grants": list(decision.grants),
            "denials": list(decision.denials),
        }
        line = json.dumps(entry) + "\n"
        with self._lock:
            with open(self.decision_log, "a") as log:
                log.write(line)
                size = log.tell()
            if size > DECISION_LOG_BYTES:  # the last one kept beside it, as `<name>.1`
                os.replace(self.decision_log, self.decision_log.with_name(f"{self.decision_log.name}.1"))
