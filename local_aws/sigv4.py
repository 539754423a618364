"""Signature Version 4, checked as AWS checks it: the Authorization header or a presigned URL's query.

The canonical request is rebuilt from the request as it arrived (its method, its raw path and query, the headers
it signed and its body), hashed into the string to sign, and signed with the key derived for the credential's
scope; the signature must match byte for byte. S3 takes the path as sent and the body's hash from
``x-amz-content-sha256`` (which must then match the body); the other services take the path normalized and encoded
once more, and hash the body themselves. The request's time must lie within 15 minutes of now, a presigned URL
must not have expired, and the scope must name the day signed, the region and the service that received it.

Who the key belongs to is the caller's question (``KeyLookup``): the local AWS answers it from its IAM, the local
SageMaker service asks the local AWS for the key derived for one day, region and service (never the secret). A
failure is an ``AuthError`` of a kind that each protocol words in AWS's own terms (local_aws.errors).
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import functools
import hashlib
import hmac
import re
from collections.abc import Callable, Mapping
from urllib.parse import quote, unquote

from botocore.utils import normalize_url_path

ALGORITHM = "AWS4-HMAC-SHA256"
MAX_SKEW = datetime.timedelta(minutes=15)
MAX_PRESIGNED_SECONDS = 7 * 24 * 3600
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_AUTHORIZATION = re.compile(r"AWS4-HMAC-SHA256\s+(?P<fields>.*)", re.S)
_BASIC_TIMESTAMP = re.compile(r"\d{8}T\d{6}Z")
_SPACES = re.compile(r"\s+")
_HEX64 = re.compile(r"[0-9a-f]{64}")


class Failure(enum.Enum):
    """Why a request is not authenticated; each protocol has its own code and words for each (local_aws.errors)."""

    MISSING = "missing"  # no signature at all
    MALFORMED = "malformed"  # an Authorization header or presigned query that cannot be read
    UNSUPPORTED = "unsupported"  # another algorithm (Signature Version 2, say)
    UNKNOWN_KEY = "unknown key"  # an access key id that names no credential
    BAD_SIGNATURE = "bad signature"
    BAD_TOKEN = "bad token"  # a session token that is not the credential's
    EXPIRED_TOKEN = "expired token"
    SKEWED = "skewed"  # the request's time is more than 15 minutes from now
    EXPIRED_URL = "expired url"  # a presigned URL past its X-Amz-Expires
    WRONG_SCOPE = "wrong scope"  # the credential's scope names another day, region or service
    CONTENT_MISMATCH = "content mismatch"  # x-amz-content-sha256 is not the body's SHA-256


class AuthError(Exception):
    """The request is not authenticated: ``failure`` says why, the message says it in words."""

    def __init__(self, failure: Failure, message: str, **details: str):
        super().__init__(message)
        self.failure, self.message, self.details = failure, message, details


@dataclasses.dataclass(frozen=True)
class Key:
    """What verifying a request signed with one access key needs: the signing key derived for the request's scope,
    and the session token the key must come with (temporary credentials) and when that session ends. ``principal``
    is the caller's own record of who signs with it, handed back untouched."""

    signing_key: bytes
    session_token: str | None = None
    expires: datetime.datetime | None = None
    principal: object = None


# (access key id, yyyymmdd, region, service) → the Key, or None when no credential has that access key id.
KeyLookup = Callable[[str, str, str, str], "Key | None"]


@dataclasses.dataclass(frozen=True)
class Request:
    """A request as it arrived. ``raw_path`` and ``raw_query`` as sent (still percent-encoded); ``headers`` by lower-case
    name (repeated fields joined with commas); ``body`` the bytes of the body."""

    method: str
    raw_path: str
    raw_query: str
    headers: Mapping[str, str]
    body: bytes


@dataclasses.dataclass(frozen=True)
class Verified:
    """A request whose signature holds: who signed it (the lookup's ``principal``) and how."""

    access_key_id: str
    principal: object
    signed_at: datetime.datetime
    presigned: bool
    signed_headers: tuple[str, ...]


def derive_key(secret: str, date: str, region: str, service: str) -> bytes:
    """The SigV4 signing key for one day, region and service."""
    key = hmac.digest(f"AWS4{secret}".encode(), date.encode(), "sha256")
    for part in (region, service, "aws4_request"):
        key = hmac.digest(key, part.encode(), "sha256")
    return key


def is_signed(request: Request) -> bool:
    """Whether the request carries any signature, good or bad: anonymous requests are S3's business."""
    return (
        "authorization" in request.headers
        or "X-Amz-Signature" in request.raw_query
        or ("Signature=" in request.raw_query and "AWSAccessKeyId=" in request.raw_query)
    )


def verify(
    request: Request,
    *,
    service: str,
    region: str,
    lookup: KeyLookup,
    s3: bool = False,
    now: datetime.datetime | None = None,
) -> Verified:
    """Check ``request``'s signature for ``service`` (the signing name, e.g. ``s3``, ``monitoring``) in ``region``;
    ``s3``: S3's rules for the path and the payload. Returns who signed it; raises AuthError."""
    now = now or datetime.datetime.now(datetime.UTC)
    query = _query_pairs(request.raw_query)
    authorization = request.headers.get("authorization")
    if authorization is not None:
        fields = _authorization_fields(authorization)
        credential, signed_headers, signature = fields["Credential"], fields["SignedHeaders"], fields["Signature"]
        timestamp = request.headers.get("x-amz-date") or request.headers.get("date", "")
        presigned, expires = False, None
        token = request.headers.get("x-amz-security-token")
    elif any(name == "X-Amz-Signature" for name, _ in query):
        values = {name: value for name, value in query}
        for name in ("X-Amz-Algorithm", "X-Amz-Credential", "X-Amz-Date", "X-Amz-SignedHeaders", "X-Amz-Expires"):
            if name not in values:
                raise AuthError(Failure.MALFORMED, f"Query-string authentication requires the {name} parameter")
        if unquote(values["X-Amz-Algorithm"]) != ALGORITHM:
            raise AuthError(Failure.UNSUPPORTED, f"X-Amz-Algorithm only supports {ALGORITHM}")
        credential = unquote(values["X-Amz-Credential"])
        signed_headers, signature = unquote(values["X-Amz-SignedHeaders"]), unquote(values["X-Amz-Signature"])
        timestamp, presigned = unquote(values["X-Amz-Date"]), True
        expires = _expires(unquote(values["X-Amz-Expires"]))
        token = unquote(values["X-Amz-Security-Token"]) if "X-Amz-Security-Token" in values else None
        query = [(name, value) for name, value in query if name != "X-Amz-Signature"]
    elif is_signed(request):
        raise AuthError(
            Failure.UNSUPPORTED,
            f"The authorization mechanism you have provided is not supported. Please use {ALGORITHM}.",
        )
    else:
        raise AuthError(Failure.MISSING, "Missing Authentication Token")

    access_key_id, date, scope_region, scope_service = _scope(credential)
    signed_at = _timestamp(timestamp)
    if date != timestamp[:8]:
        raise AuthError(
            Failure.WRONG_SCOPE,
            f"Date in Credential scope does not match YYYYMMDD from ISO-8601 version "
            f"of date from HTTP: '{date}' != '{signed_at:%Y%m%d}', from '{timestamp}'.",
        )
    if scope_region != region:
        raise AuthError(
            Failure.WRONG_SCOPE, f"the region '{scope_region}' is wrong; expecting '{region}'", region=region
        )
    if scope_service != service:
        raise AuthError(Failure.WRONG_SCOPE, f"Credential should be scoped to correct service: '{service}'.")
    if presigned:
        if now > signed_at + datetime.timedelta(seconds=expires):
            raise AuthError(
                Failure.EXPIRED_URL,
                "Request has expired",
                expires=f"{signed_at + datetime.timedelta(seconds=expires):%Y-%m-%dT%H:%M:%SZ}",
                server_time=f"{now:%Y-%m-%dT%H:%M:%SZ}",
            )
        if signed_at - now > MAX_SKEW:
            raise AuthError(Failure.SKEWED, "Request is not yet valid")
    elif abs(now - signed_at) > MAX_SKEW:
        raise AuthError(
            Failure.SKEWED,
            f"Signature expired: {timestamp} is now earlier than "
            f"{(now - MAX_SKEW):%Y%m%dT%H%M%SZ} ({now:%Y%m%dT%H%M%SZ} - 15 min.)",
            request_time=timestamp,
            server_time=f"{now:%Y%m%dT%H%M%SZ}",
        )

    names = tuple(signed_headers.split(";"))
    if "host" not in names or any(name != name.lower() or not name for name in names):
        raise AuthError(Failure.MALFORMED, "SignedHeaders must be lower-case names separated by ';' and include host")
    missing = [name for name in names if name not in request.headers]
    if missing:
        raise AuthError(Failure.MALFORMED, f"The request signs headers it does not carry: {', '.join(missing)}")
    if s3 and not presigned:
        unsigned = sorted(name for name in request.headers if name.startswith("x-amz-") and name not in names)
        if unsigned:
            raise AuthError(
                Failure.BAD_SIGNATURE,
                "There were headers present in the request which were not signed",
                headers_not_signed=", ".join(unsigned),
            )

    payload = _payload_hash(request, s3=s3, presigned=presigned)
    canonical = "\n".join(
        (
            request.method.upper(),
            request.raw_path if s3 else _canonical_path(request.raw_path),
            "&".join(f"{name}={value}" for name, value in sorted(_encoded(query))) if query else "",
            "".join(f"{name}:{_SPACES.sub(' ', request.headers[name].strip())}\n" for name in names),
            signed_headers,
            payload,
        )
    )
    string_to_sign = "\n".join(
        (
            ALGORITHM,
            timestamp,
            f"{date}/{scope_region}/{scope_service}/aws4_request",
            hashlib.sha256(canonical.encode("utf-8")).hexdigest(),
        )
    )

    key = lookup(access_key_id, date, scope_region, scope_service)
    if key is None:
        raise AuthError(
            Failure.UNKNOWN_KEY,
            "The AWS Access Key Id you provided does not exist in our records.",
            access_key_id=access_key_id,
        )
    expected = hmac.digest(key.signing_key, string_to_sign.encode("utf-8"), "sha256").hex()
    if not hmac.compare_digest(expected, signature):
        raise AuthError(
            Failure.BAD_SIGNATURE,
            "The request signature we calculated does not match the signature you "
            "provided. Check your key and signing method.",
            access_key_id=access_key_id,
            string_to_sign=string_to_sign,
            canonical_request=canonical,
        )
    if (token or None) != key.session_token:
        raise AuthError(Failure.BAD_TOKEN, "The security token included in the request is invalid.")
    if key.expires is not None and now >= key.expires:
        raise AuthError(Failure.EXPIRED_TOKEN, "The security token included in the request is expired")
    return Verified(access_key_id, key.principal, signed_at, presigned, names)


def _authorization_fields(header: str) -> dict[str, str]:
    match = _AUTHORIZATION.fullmatch(header.strip())
    if match is None:
        if header.startswith("AWS "):
            raise AuthError(
                Failure.UNSUPPORTED,
                f"The authorization mechanism you have provided is not supported. Please use {ALGORITHM}.",
            )
        raise AuthError(Failure.MALFORMED, f"Authorization header requires the {ALGORITHM} algorithm")
    fields = {}
    for part in match["fields"].split(","):
        name, separator, value = part.strip().partition("=")
        if not separator:
            raise AuthError(
                Failure.MALFORMED, f"Authorization header requires each component as name=value, not '{part.strip()}'"
            )
        fields[name] = value
    for name in ("Credential", "SignedHeaders", "Signature"):
        if not fields.get(name):
            raise AuthError(
                Failure.MALFORMED,
                f"Authorization header requires '{name}' parameter. Authorization "
                f"header requires 'Credential', 'SignedHeaders' and 'Signature' parameters.",
            )
    return fields


def _scope(credential: str) -> tuple[str, str, str, str]:
    parts = credential.split("/")
    if len(parts) != 5 or parts[4] != "aws4_request" or not all(parts[:4]):
        raise AuthError(
            Failure.MALFORMED,
            f"Credential should be <access key>/<yyyymmdd>/<region>/<service>/aws4_request, not '{credential}'",
        )
    return parts[0], parts[1], parts[2], parts[3]


def _timestamp(value: str) -> datetime.datetime:
    try:
        if not _BASIC_TIMESTAMP.fullmatch(value):
            raise ValueError(value)
        return datetime.datetime.fromisoformat(value)  # ISO 8601's basic format, with its Z
    except ValueError:
        raise AuthError(
            Failure.MALFORMED, f"X-Amz-Date must be in the ISO8601 Long Format \"yyyyMMdd'T'HHmmss'Z'\", not '{value}'"
        ) from None


def _expires(value: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= MAX_PRESIGNED_SECONDS:
        raise AuthError(
            Failure.MALFORMED,
            f"X-Amz-Expires must be a number of seconds from 1 to {MAX_PRESIGNED_SECONDS}, not '{value}'",
        )
    return int(value)


def _payload_hash(request: Request, *, s3: bool, presigned: bool) -> str:
    declared = request.headers.get("x-amz-content-sha256")
    if s3 and presigned:
        return declared or UNSIGNED_PAYLOAD
    if s3 and declared is None:
        raise AuthError(Failure.MALFORMED, "Missing required header for this request: x-amz-content-sha256")
    if declared is None:
        return hashlib.sha256(request.body).hexdigest()
    if declared == UNSIGNED_PAYLOAD:
        return declared
    if not _HEX64.fullmatch(declared):
        raise AuthError(
            Failure.MALFORMED,
            f"x-amz-content-sha256 must be UNSIGNED-PAYLOAD or a SHA-256 in hex, not "
            f"'{declared}' (this service takes no streaming uploads)",
        )
    actual = hashlib.sha256(request.body).hexdigest()
    if actual != declared:
        raise AuthError(
            Failure.CONTENT_MISMATCH,
            "The provided 'x-amz-content-sha256' header does not match what was computed.",
            client=declared,
            server=actual,
        )
    return declared


@functools.lru_cache(maxsize=4096)
def _canonical_path(raw_path: str) -> str:
    """The canonical URI of a path for the services other than S3: dot segments removed, encoded once more."""
    return quote(normalize_url_path(raw_path), safe="/~")


def _query_pairs(raw_query: str) -> list[tuple[str, str]]:
    pairs = []
    for pair in raw_query.split("&") if raw_query else ():
        name, _, value = pair.partition("=")
        pairs.append((name, value))
    return pairs


def _encoded(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Each name and value decoded, then encoded as SigV4 encodes them (RFC 3986's unreserved characters kept)."""
    return [(quote(unquote(name), safe="-_.~"), quote(unquote(value), safe="-_.~")) for name, value in pairs]
