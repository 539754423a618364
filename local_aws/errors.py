"""Authentication and authorization failures as AWS answers them, in each protocol's own form and words.

- ``rest-xml`` (S3): ``<Error><Code>…</Code><Message>…</Message>…</Error>``, with S3's codes (InvalidAccessKeyId,
  SignatureDoesNotMatch, AccessDenied, ...) and the fields S3 adds (the access key id, the string to sign).
- ``json`` (CloudWatch Logs, CloudWatch, SageMaker): ``{"__type": …, "message": …}``; a query-compatible service
  also says the query protocol's code in ``x-amzn-query-error``.
- ``query`` (SNS, STS, IAM): ``<ErrorResponse><Error><Type>Sender</Type><Code>…</Code>…``.
- ``rest-json`` (SageMaker's runtime): the code in ``x-amzn-ErrorType``, ``{"message": …}`` in the body.
"""

from __future__ import annotations

import json
import uuid
from xml.sax.saxutils import escape

from local_aws.sigv4 import AuthError, Failure

# Failure → (S3's status and code, the JSON protocols' code, the query protocol's code).
_CODES = {
    Failure.MISSING: ((403, "AccessDenied"), "MissingAuthenticationTokenException", "MissingAuthenticationToken"),
    Failure.MALFORMED: ((400, "AuthorizationHeaderMalformed"), "IncompleteSignatureException", "IncompleteSignature"),
    Failure.UNSUPPORTED: ((400, "InvalidRequest"), "IncompleteSignatureException", "IncompleteSignature"),
    Failure.UNKNOWN_KEY: ((403, "InvalidAccessKeyId"), "UnrecognizedClientException", "InvalidClientTokenId"),
    Failure.BAD_SIGNATURE: ((403, "SignatureDoesNotMatch"), "InvalidSignatureException", "SignatureDoesNotMatch"),
    Failure.BAD_TOKEN: ((400, "InvalidToken"), "UnrecognizedClientException", "InvalidClientTokenId"),
    Failure.EXPIRED_TOKEN: ((400, "ExpiredToken"), "ExpiredTokenException", "ExpiredToken"),
    Failure.SKEWED: ((403, "RequestTimeTooSkewed"), "InvalidSignatureException", "SignatureDoesNotMatch"),
    Failure.EXPIRED_URL: ((403, "AccessDenied"), "InvalidSignatureException", "SignatureDoesNotMatch"),
    Failure.WRONG_SCOPE: ((400, "AuthorizationHeaderMalformed"), "InvalidSignatureException", "SignatureDoesNotMatch"),
    Failure.CONTENT_MISMATCH: (
        (400, "XAmzContentSHA256Mismatch"),
        "InvalidSignatureException",
        "SignatureDoesNotMatch",
    ),
}
# What the JSON and query protocols say where S3's words differ.
_WORDS = {
    Failure.UNKNOWN_KEY: "The security token included in the request is invalid.",
    Failure.BAD_TOKEN: "The security token included in the request is invalid.",
    Failure.BAD_SIGNATURE: "The request signature we calculated does not match the signature you provided. Check your "
    "AWS Secret Access Key and signing method. Consult the service documentation for details.",
}
_S3_WORDS = {
    Failure.MISSING: "Access Denied",
    Failure.BAD_TOKEN: "The provided token is malformed or otherwise invalid.",
    Failure.EXPIRED_TOKEN: "The provided token has expired.",
    Failure.SKEWED: "The difference between the request time and the current time is too large.",
}
# S3's extra fields, from the failure's details.
_S3_FIELDS = {
    "access_key_id": "AWSAccessKeyId",
    "string_to_sign": "StringToSign",
    "canonical_request": "CanonicalRequest",
    "headers_not_signed": "HeadersNotSigned",
    "region": "Region",
    "expires": "Expires",
    "server_time": "ServerTime",
    "request_time": "RequestTime",
    "client": "ClientComputedContentSHA256",
    "server": "S3ComputedContentSHA256",
}


def describe(protocol: str, error: AuthError) -> tuple[int, str, str]:
    """(status, code, message) of the answer to a request that ``error`` refused, in ``protocol``."""
    (s3_status, s3_code), json_code, query_code = _CODES[error.failure]
    if protocol == "rest-xml":
        code = "AccessDenied" if "headers_not_signed" in error.details else s3_code
        return s3_status, code, _S3_WORDS.get(error.failure, error.message)
    status = 400 if error.failure in (Failure.MALFORMED, Failure.UNSUPPORTED, Failure.EXPIRED_TOKEN) else 403
    return status, query_code if protocol == "query" else json_code, _WORDS.get(error.failure, error.message)


def auth_failure(protocol: str, error: AuthError, *, query_compatible: bool = False) -> tuple[int, list, bytes]:
    """The answer to a request that ``error`` refused, in ``protocol``."""
    status, code, message = describe(protocol, error)
    if protocol == "rest-xml":
        return s3_error(status, code, message, **error.details)
    if protocol == "query":
        return query_error(status, code, message)
    if protocol == "rest-json":
        return rest_json_error(status, code, message)
    query_code = _CODES[error.failure][2] if query_compatible else None
    return json_error(status, code, message, query_code)


def access_denied(
    protocol: str, message: str, *, query_compatible: bool = False, query_code: str = "AccessDenied"
) -> tuple[int, list, bytes]:
    """AccessDenied in ``protocol``; ``query_code``: the query protocol's code (SNS says AuthorizationError)."""
    if protocol == "rest-xml":
        return s3_error(403, "AccessDenied", message)
    if protocol == "query":
        return query_error(403, query_code, message)
    if protocol == "rest-json":
        return rest_json_error(403, "AccessDeniedException", message)
    return json_error(400, "AccessDeniedException", message, query_code if query_compatible else None)


def s3_error(status: int, code: str, message: str, **details: str) -> tuple[int, list, bytes]:
    fields = "".join(
        f"<{_S3_FIELDS[name]}>{escape(str(value))}</{_S3_FIELDS[name]}>"
        for name, value in details.items()
        if name in _S3_FIELDS
    )
    request_id = _request_id()
    body = (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{escape(message)}</Message>'
        f"{fields}<RequestId>{request_id}</RequestId><HostId>{request_id}</HostId></Error>"
    )
    return status, [("Content-Type", "application/xml"), ("x-amz-request-id", request_id)], body.encode()


def query_error(status: int, code: str, message: str) -> tuple[int, list, bytes]:
    request_id = _request_id()
    body = (
        f"<ErrorResponse><Error><Type>Sender</Type><Code>{code}</Code><Message>{escape(message)}</Message></Error>"
        f"<RequestId>{request_id}</RequestId></ErrorResponse>"
    )
    return status, [("Content-Type", "text/xml"), ("x-amzn-RequestId", request_id)], body.encode()


def json_error(status: int, code: str, message: str, query_code: str | None = None) -> tuple[int, list, bytes]:
    request_id = _request_id()
    headers = [("Content-Type", "application/x-amz-json-1.1"), ("x-amzn-RequestId", request_id)]
    if query_code:
        headers.append(("x-amzn-query-error", f"{query_code};Sender"))
    return status, headers, json.dumps({"__type": code, "message": message}).encode()


def rest_json_error(status: int, code: str, message: str) -> tuple[int, list, bytes]:
    request_id = _request_id()
    headers = [("Content-Type", "application/json"), ("x-amzn-ErrorType", f"{code}:"), ("x-amzn-RequestId", request_id)]
    return status, headers, json.dumps({"message": message}).encode()


def _request_id() -> str:
    return str(uuid.uuid4())
