"""The local AWS's front door: every request is authenticated and authorized before moto sees it.

For each request: name the operation (local_aws.operations); check the SigV4 signature against the keys of the
local IAM (local_aws.sigv4, local_aws.identities) — an unsigned S3 request is an anonymous one, which only a bucket
policy could allow, and an unsigned request to any other service is refused; check a body against the checksums
its headers declare (S3 refuses a mismatch with BadDigest, where moto would store it); authorize each action the
operation needs (local_aws.permissions, local_aws.authorizer). Only then does moto serve it. A refused request
changes nothing and is answered in the service's own protocol, as AWS answers it (local_aws.errors).

Beside the AWS APIs, on the same port:
- ``GET /_local/health``: 200 once the state is back and requests are served (no credentials needed, nothing told).
- ``POST /_local/iam/signing-key`` and ``POST /_local/iam/authorize``: how a local stand-in for another AWS service
  (the local SageMaker service) checks its own callers, signed with that service's credential: the key derived
  for one day, region and service (never the secret), and a decision with AWS's message.
moto's own API (``/moto-api/``: resets, state dumps with every secret) is not served. IAM's SimulatePrincipalPolicy,
which moto does not have, is answered here by the same evaluation (local_aws.simulate).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import logging
import re
import threading
import zlib
from collections.abc import Callable, Iterable
from urllib.parse import unquote

from local_aws import authority, errors, sigv4
from local_aws.authorizer import Authorizer, denial_message
from local_aws.evaluator import EvaluatorError
from local_aws.identities import ANONYMOUS, Identities, Principal
from local_aws.operations import UnknownOperation, identify, signing_name
from local_aws.permissions import Requirement, requirements
from local_aws.simulate import Simulator

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1024 * 1024 * 1024  # what one request may carry here (S3's own PutObject limit is 5 GB)
_SCOPE = re.compile(r"Credential=[^/\s,]+/\d{8}/[^/\s,]+/([^/\s,]+)/aws4_request")
_QUERY_SCOPE = re.compile(
    r"X-Amz-Credential=[^&]*?(?:%2F|/)\d{8}(?:%2F|/)[^&%/]+(?:%2F|/)([^&%/]+)(?:%2F|/)aws4_request"
)
_READ_ONLY_IAM = ("Get", "List", "Simulate", "Generate")
_CONDITIONAL_WRITES = ("PutObject", "CopyObject", "CompleteMultipartUpload")


class Gateway:
    """WSGI middleware in front of moto's app (``app``), for one account and region."""

    def __init__(self, app: Callable, identities: Identities, authorizer: Authorizer, *, region: str):
        self.app, self.identities, self.authorizer, self.region = app, identities, authorizer, region
        self.simulator = Simulator(identities, authorizer.evaluator)
        self.ready = threading.Event()
        self._keys: dict[tuple[str, str, str, str], tuple[sigv4.Key, float]] = {}
        self._key_lock = threading.Lock()
        self._object_locks: dict[tuple[str, str], threading.Lock] = {}

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        raw_path, _, raw_query = environ.get("RAW_URI", environ.get("PATH_INFO", "/")).partition("?")
        if raw_path == "/_local/health":
            return _respond(
                start_response,
                200 if self.ready.is_set() else 503,
                [("Content-Type", "application/json")],
                json.dumps({"ready": self.ready.is_set()}).encode(),
            )
        if raw_path.startswith("/moto-api"):
            return _respond(
                start_response, *errors.s3_error(404, "NotFound", "The local AWS does not serve moto's API.")
            )
        try:
            body = _read_body(environ)
        except ValueError as error:
            return _respond(start_response, *errors.s3_error(400, "EntityTooLarge", str(error)))
        headers = _headers(environ)
        request = sigv4.Request(environ["REQUEST_METHOD"], raw_path, raw_query, headers, body)
        if raw_path.startswith(authority.PREFIX):
            return self._authority(request, start_response)
        return self._serve(environ, request, start_response)

    # -- the AWS APIs -------------------------------------------------------------------------------------------------

    def _serve(self, environ: dict, request: sigv4.Request, start_response: Callable) -> Iterable[bytes]:
        scope = _SCOPE.search(request.headers.get("authorization", "")) or _QUERY_SCOPE.search(request.raw_query)
        try:
            call = identify(
                request.method,
                request.raw_path,
                request.raw_query,
                request.headers,
                request.body,
                scope[1] if scope else None,
            )
        except UnknownOperation as error:
            return _respond(start_response, *_unknown(error, request))
        try:
            if sigv4.is_signed(request) or call.service != "s3":
                verified = sigv4.verify(
                    request,
                    service=signing_name(call.service),
                    region=self.region,
                    lookup=self._key,
                    s3=call.service == "s3",
                )
                principal, signed_at = verified.principal, verified.signed_at
            else:
                principal, signed_at = ANONYMOUS, None
        except sigv4.AuthError as error:
            log.info("refused %s.%s: %s", call.service, call.operation, error.failure.value)
            return _respond(
                start_response, *errors.auth_failure(call.protocol, error, query_compatible=call.query_compatible)
            )
        if call.service == "s3" and (mismatch := _checksum_mismatch(request)):
            return _respond(start_response, *errors.s3_error(400, *mismatch))
        try:
            needed = requirements(call, region=self.region, account=self.identities.account, arn_of=self._arn_of)
            denial = self.authorizer.check(
                principal,
                needed,
                source_ip=environ.get("REMOTE_ADDR", "127.0.0.1"),
                extra_context=_service_context(principal, request),
                signed_at=signed_at,
                quote=call.service == "s3",
            )
        except UnknownOperation as error:
            return _respond(start_response, *_unknown(error, request, call.protocol))
        except EvaluatorError as error:
            log.error("%s.%s: %s", call.service, call.operation, error)
            return _respond(start_response, *_internal(call.protocol, f"the local AWS could not evaluate IAM: {error}"))
        if denial is not None:
            log.info("AccessDenied: %s", denial.message)
            return _respond(
                start_response,
                *errors.access_denied(
                    call.protocol,
                    denial.message,
                    query_compatible=call.query_compatible,
                    query_code="AuthorizationError" if call.service == "sns" else "AccessDenied",
                ),
            )
        if (call.service, call.operation) == ("iam", "SimulatePrincipalPolicy"):  # moto has no policy simulator
            return _respond(start_response, *self.simulator.answer(call.params))
        return self._forward(environ, request, call, start_response)

    def _forward(self, environ: dict, request: sigv4.Request, call, start_response: Callable) -> Iterable[bytes]:
        environ = dict(environ)
        environ["wsgi.input"] = io.BytesIO(request.body)
        environ["CONTENT_LENGTH"] = str(len(request.body))
        environ.pop("HTTP_TRANSFER_ENCODING", None)
        environ.pop("wsgi.input_terminated", None)
        status: list[int] = []

        def recording_start_response(line: str, response_headers, exc_info=None):
            status.append(int(line.split(" ", 1)[0]))
            return start_response(line, response_headers, exc_info)

        conditional = (
            call.service == "s3"
            and call.operation in _CONDITIONAL_WRITES
            and ("if-none-match" in request.headers or "if-match" in request.headers)
        )
        lock = self._object_lock(call.params["Bucket"], call.params["Key"]) if conditional else None
        if lock is not None:  # moto checks the condition and writes in two steps: no other write between them
            with lock:
                body = b"".join(self.app(environ, recording_start_response))
            result = [body]
        else:
            result = self.app(environ, recording_start_response)
        if status and status[0] < 300 and _changes_policies(call):
            self.authorizer.changed()
        return result

    def _object_lock(self, bucket: str, key: str) -> threading.Lock:
        with self._key_lock:
            return self._object_locks.setdefault((bucket, key), threading.Lock())

    # -- keys and principals ----------------------------------------------------------------------------------------

    def _key(self, access_key_id: str, date: str, region: str, service: str) -> sigv4.Key | None:
        cache_key = (access_key_id, date, region, service)
        with self._key_lock:
            cached = self._keys.get(cache_key)
        if cached is not None and cached[1] == self.authorizer.generation:
            return cached[0]
        credential = self.identities.credential(access_key_id)
        if credential is None:
            return None
        key = sigv4.Key(
            sigv4.derive_key(credential.secret, date, region, service),
            credential.session_token,
            credential.expires,
            credential.principal,
        )
        with self._key_lock:
            if len(self._keys) > 10_000:
                self._keys.clear()
            self._keys[cache_key] = (key, self.authorizer.generation)  # IAM's changes remove keys: look again then
        return key

    def _arn_of(self, kind: str, name: str) -> str | None:
        from moto.iam.exceptions import IAMException

        iam = self.identities.iam
        try:
            if kind == "role":
                return iam.get_role(name).arn
            if kind == "user":
                return iam.get_user(name).arn
            if kind == "group":
                return iam.get_group(name).arn
        except IAMException:  # not there: the ARN from the name alone
            return None
        return None

    # -- the authority: for the local stand-ins of other AWS services -----------------------------------------------

    def _authority(self, request: sigv4.Request, start_response: Callable) -> Iterable[bytes]:
        try:
            verified = sigv4.verify(request, service=authority.SERVICE, region=self.region, lookup=self._key)
        except sigv4.AuthError as error:
            return _respond(start_response, *errors.auth_failure("json", error))
        caller: Principal = verified.principal
        if caller.service is None or request.method != "POST":
            return _respond(
                start_response,
                *errors.json_error(
                    403, "AccessDeniedException", "Only an AWS service's own credential may ask the local AWS's IAM."
                ),
            )
        try:
            question = json.loads(request.body)
            if request.raw_path == authority.SIGNING_KEY_PATH:
                answer = self._signing_key(question)
            elif request.raw_path == authority.AUTHORIZE_PATH:
                answer = self._decide(question)
            else:
                return _respond(start_response, *errors.json_error(404, "UnknownOperationException", "No such call."))
        except (ValueError, KeyError, TypeError) as error:
            return _respond(start_response, *errors.json_error(400, "ValidationException", f"Bad request: {error}"))
        except EvaluatorError as error:
            return _respond(start_response, *_internal("json", str(error)))
        return _respond(start_response, 200, [("Content-Type", "application/json")], json.dumps(answer).encode())

    def _signing_key(self, question: dict) -> dict:
        key = self._key(question["access_key_id"], question["date"], question["region"], question["service"])
        if key is None:
            return {"known": False}
        return {
            "known": True,
            "signing_key": key.signing_key.hex(),
            "session_token": key.session_token,
            "expires": key.expires.isoformat() if key.expires else None,
            "principal": dataclasses.asdict(key.principal),
        }

    def _decide(self, question: dict) -> dict:
        principal = Principal(**question["principal"])
        needed = [
            Requirement(
                item["action"],
                item["resource"],
                item.get("context", {}),
                tuple(item["resource_policy"]) if item.get("resource_policy") else None,
            )
            for item in question["requirements"]
        ]
        decisions = []
        for requirement in needed:
            decision = self.authorizer.decide(principal, requirement, source_ip=question.get("source_ip", "127.0.0.1"))
            decisions.append({"result": decision.result, "cacheable": decision.cacheable})
            if not decision.allowed:
                decisions[-1]["message"] = denial_message(principal, requirement, decision)
                break
        return {"decisions": decisions, "generation": self.authorizer.generation}


def _read_body(environ: dict) -> bytes:
    stream = environ["wsgi.input"]
    length = environ.get("CONTENT_LENGTH")
    if length:
        if int(length) > MAX_BODY_BYTES:
            raise ValueError(f"Your proposed upload exceeds the maximum allowed size of {MAX_BODY_BYTES} bytes here")
        return stream.read(int(length))
    if environ.get("wsgi.input_terminated"):
        body = stream.read(MAX_BODY_BYTES + 1)
        if len(body) > MAX_BODY_BYTES:
            raise ValueError(f"Your proposed upload exceeds the maximum allowed size of {MAX_BODY_BYTES} bytes here")
        return body
    return b""


def _headers(environ: dict) -> dict[str, str]:
    """The request's headers by lower-case name, with the names moto keeps that contain underscores."""
    from moto.moto_server.werkzeug_app import PRESERVED_HEADER_NAMES_ENVIRON_KEY

    preserved = environ.get(PRESERVED_HEADER_NAMES_ENVIRON_KEY, {})
    headers = {}
    for key, value in environ.items():
        if key.startswith("HTTP_"):
            headers[preserved.get(key, key[5:].replace("_", "-")).lower()] = value
    for key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
        if environ.get(key):
            headers[key.replace("_", "-").lower()] = environ[key]
    return headers


def _checksum_mismatch(request: sigv4.Request) -> tuple[str, str] | None:
    """S3's answer to a body that does not match a checksum its headers declare, or None."""
    body = request.body
    if "content-md5" in request.headers:
        try:
            declared = base64.b64decode(request.headers["content-md5"], validate=True)
        except ValueError:
            return "InvalidDigest", "The Content-MD5 you specified was invalid."
        if declared != hashlib.md5(body).digest():
            return "BadDigest", "The Content-MD5 you specified did not match what we received."
    computed = {
        "x-amz-checksum-sha256": lambda: hashlib.sha256(body).digest(),
        "x-amz-checksum-sha1": lambda: hashlib.sha1(body).digest(),
        "x-amz-checksum-crc32": lambda: zlib.crc32(body).to_bytes(4, "big"),
    }
    for header, digest in computed.items():
        if header in request.headers and request.headers[header] != base64.b64encode(digest()).decode():
            name = header.removeprefix("x-amz-checksum-").upper()
            return "BadDigest", f"The {name} you specified did not match the calculated checksum."
    return None


def _service_context(principal: Principal, request: sigv4.Request) -> dict[str, str]:
    """What an AWS service says it acts for (aws:SourceAccount, aws:SourceArn), taken only from a service."""
    if principal.service is None:
        return {}
    context = {}
    if "x-amz-source-account" in request.headers:
        context["aws:SourceAccount"] = request.headers["x-amz-source-account"]
    if "x-amz-source-arn" in request.headers:
        context["aws:SourceArn"] = unquote(request.headers["x-amz-source-arn"])
    return context


def _changes_policies(call) -> bool:
    if call.service == "iam":
        return not call.operation.startswith(_READ_ONLY_IAM)
    if call.service == "s3":
        return call.operation in ("PutBucketPolicy", "DeleteBucketPolicy")
    return call.service == "sns" and call.operation in ("SetTopicAttributes", "AddPermission", "RemovePermission")


def _unknown(error: Exception, request: sigv4.Request, protocol: str | None = None) -> tuple[int, list, bytes]:
    service = getattr(error, "service", None)
    protocol = protocol or (
        "rest-xml"
        if service in (None, "s3") and "x-amz-target" not in request.headers
        else "json"
        if "x-amz-target" in request.headers
        else "query"
    )
    if protocol == "rest-xml":
        code = getattr(error, "code", None)
        return errors.s3_error(400 if code else 501, code or "NotImplemented", str(error))
    if protocol == "query":
        return errors.query_error(400, "InvalidAction", str(error))
    return errors.json_error(400, "UnknownOperationException", str(error))


def _internal(protocol: str, message: str) -> tuple[int, list, bytes]:
    if protocol == "rest-xml":
        return errors.s3_error(500, "InternalError", message)
    if protocol == "query":
        return errors.query_error(500, "InternalFailure", message)
    return errors.json_error(500, "InternalFailure", message)


def _respond(start_response: Callable, status: int, headers: list, body: bytes) -> list[bytes]:
    from http import HTTPStatus

    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Unknown"
    start_response(f"{status} {phrase}", [*headers, ("Content-Length", str(len(body)))])
    return [body]
