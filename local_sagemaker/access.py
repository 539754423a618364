"""Who calls the local SageMaker service, and whether they may: SigV4 and IAM, asked of the local AWS as SageMaker
asks IAM.

Every request to the control plane and the runtime is verified against the key derived for its scope (one day,
region and service), which the local AWS hands to this service's own credential, never the secret; then each
requirement of the operation (local_sagemaker.permissions) is decided by the local AWS's evaluator. Both answers
are cached here: a key for a minute (a key deleted in IAM stops working within it), a decision for two seconds (as
AWS's IAM, a policy change takes effect within seconds). The runtime asks the caches first and goes to the local AWS
only on a miss, so a steady stream of invocations costs a signature check and two dictionary lookups each.
"""

from __future__ import annotations

import datetime
import http.client
import json
import threading
import time
import urllib.parse
from collections.abc import Sequence

from local_aws import authority, sigv4
from local_aws.identities import Principal
from local_aws.permissions import Requirement
from local_sagemaker.protocol import SageMakerError

KEY_SECONDS = 60.0
UNKNOWN_KEY_SECONDS = 2.0  # an access key IAM does not know: asked again this soon (it may be a new one)
DECISION_SECONDS = 2.0
SIGNING_NAME = "sagemaker"
_ENTRIES = 50_000


class AccessDenied(SageMakerError):
    code = "AccessDeniedException"


class NotCached(Exception):
    """What a fast path needs is not in the cache: ask again from a thread, where the local AWS may be called."""


class Access:
    """The service's view of IAM: ``aws_endpoint_url`` is the local AWS; the service's own credential is what its
    boto3 session holds (the environment the stack gives it)."""

    def __init__(self, aws_endpoint_url: str, region: str):
        import boto3

        self.region = region
        self.credentials = boto3.session.Session().get_credentials()
        if self.credentials is None:
            raise RuntimeError("the local SageMaker service has no credential of its own to ask IAM with")
        parts = urllib.parse.urlsplit(aws_endpoint_url)
        self._address = (parts.hostname, parts.port or 80)
        self._host = parts.netloc
        self._keys: dict[tuple, tuple[sigv4.Key | None, float]] = {}
        self._decisions: dict[tuple, tuple[str | None, float]] = {}
        self._local = threading.local()

    # -- authentication ---------------------------------------------------------------------------------------------

    def authenticate(self, request: sigv4.Request, *, fetch: bool = True) -> Principal:
        """Who signed ``request`` (AuthError when nobody did, as AWS says it); ``fetch=False``: NotCached rather than
        asking the local AWS for a key."""

        def lookup(access_key_id: str, date: str, region: str, service: str) -> sigv4.Key | None:
            cache_key = (access_key_id, date, region, service)
            cached = self._keys.get(cache_key)
            if cached is not None and time.monotonic() < cached[1]:
                return cached[0]
            if not fetch:
                raise NotCached()
            key = self._fetch_key(*cache_key)
            if len(self._keys) > _ENTRIES:
                self._keys.clear()
            self._keys[cache_key] = (key, time.monotonic() + (KEY_SECONDS if key else UNKNOWN_KEY_SECONDS))
            return key

        return sigv4.verify(request, service=SIGNING_NAME, region=self.region, lookup=lookup).principal

    def _fetch_key(self, access_key_id: str, date: str, region: str, service: str) -> sigv4.Key | None:
        answer = self._ask(
            authority.SIGNING_KEY_PATH,
            {"access_key_id": access_key_id, "date": date, "region": region, "service": service},
        )
        if not answer["known"]:
            return None
        expires = datetime.datetime.fromisoformat(answer["expires"]) if answer["expires"] else None
        return sigv4.Key(
            bytes.fromhex(answer["signing_key"]), answer["session_token"], expires, Principal(**answer["principal"])
        )

    # -- authorization ----------------------------------------------------------------------------------------------

    def authorize(self, principal: Principal, requirements: Sequence[Requirement], *, fetch: bool = True) -> None:
        """AccessDenied, with AWS's message, unless IAM allows ``principal`` every requirement."""
        now = time.monotonic()
        missing = []
        for requirement in requirements:
            cached = self._decisions.get(self._decision_key(principal, requirement))
            if cached is None or now >= cached[1]:
                missing.append(requirement)
            elif cached[0] is not None:
                raise AccessDenied(cached[0])
        if not missing:
            return
        if not fetch:
            raise NotCached()
        answer = self._ask(
            authority.AUTHORIZE_PATH,
            {
                "principal": principal.__dict__,
                "requirements": [
                    {
                        "action": r.action,
                        "resource": r.resource,
                        "context": dict(r.context),
                        "resource_policy": r.resource_policy,
                    }
                    for r in missing
                ],
            },
        )
        expires = time.monotonic() + DECISION_SECONDS
        if len(self._decisions) > _ENTRIES:
            self._decisions.clear()
        for requirement, decision in zip(missing, answer["decisions"], strict=False):
            message = decision.get("message")
            if decision["cacheable"]:
                self._decisions[self._decision_key(principal, requirement)] = (message, expires)
            if message is not None:
                raise AccessDenied(message)

    @staticmethod
    def _decision_key(principal: Principal, requirement: Requirement) -> tuple:
        return (
            principal.arn,
            requirement.action,
            requirement.resource,
            json.dumps(requirement.context, sort_keys=True) if requirement.context else "",
        )

    # -- the local AWS's authority ----------------------------------------------------------------------------------

    def _ask(self, path: str, question: dict) -> dict:
        from botocore.auth import SigV4Auth
        from botocore.awsrequest import AWSRequest

        body = json.dumps(question).encode()
        request = AWSRequest(
            "POST",
            f"http://{self._host}{path}",
            data=body,
            headers={"Content-Type": "application/json", "Host": self._host},
        )
        SigV4Auth(self.credentials.get_frozen_credentials(), authority.SERVICE, self.region).add_auth(request)
        for attempt in range(2):
            connection = getattr(self._local, "connection", None)
            if connection is None:
                connection = self._local.connection = http.client.HTTPConnection(*self._address, timeout=30)
            try:
                connection.request("POST", path, body=body, headers=dict(request.headers))
                response = connection.getresponse()
                answer = response.read()
            except (OSError, http.client.HTTPException):
                connection.close()
                self._local.connection = None
                if attempt:
                    raise
                continue
            if response.status != 200:
                raise RuntimeError(f"the local AWS's IAM answered {response.status}: {answer[:500]!r}")
            return json.loads(answer)
        raise AssertionError("unreachable")
