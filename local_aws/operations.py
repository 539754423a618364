"""Which AWS operation a request to the local AWS is, read as the service's protocol defines it (botocore's models).

- JSON protocols (CloudWatch Logs, CloudWatch): ``X-Amz-Target: <prefix>.<Operation>``, the parameters a JSON body.
- Query protocols (SNS, STS, IAM, CloudWatch's older form): ``Action=<Operation>`` in a form body or the query.
- S3 (REST-XML): the operation whose HTTP binding fits the method, the path (service, bucket or object) and the
  query and header members it requires, the most specific first; the bucket is the path's first segment (the local
  AWS answers path-style only, as moto is told to), the key the rest, decoded.

The service is the one the credential's scope names when the request is signed, else the one its shape says. SQS is
served too: it is how the tests read what the pipeline publishes to SNS.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections.abc import Mapping
from urllib.parse import parse_qsl, unquote

# The services the local AWS serves: botocore's name → (signing name, IAM prefix).
SERVICES = {
    "s3": ("s3", "s3"),
    "cloudwatch": ("monitoring", "cloudwatch"),
    "logs": ("logs", "logs"),
    "sns": ("sns", "sns"),
    "sqs": ("sqs", "sqs"),
    "sts": ("sts", "sts"),
    "iam": ("iam", "iam"),
}
_BY_SIGNING_NAME = {signing: name for name, (signing, _) in SERVICES.items()}
_FORM = "application/x-www-form-urlencoded"
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


class UnknownOperation(Exception):
    """A request the local AWS cannot name an operation for; the message says why, ``service`` where it is known."""

    def __init__(self, message: str, service: str | None = None, code: str | None = None):
        super().__init__(message)
        self.service, self.code = service, code


@dataclasses.dataclass(frozen=True)
class Call:
    """One request as an operation: ``service`` is botocore's name; ``protocol`` is how errors are answered (rest-xml,
    json or query); ``params`` the operation's input as sent (for S3: Bucket, Key, the query and the headers)."""

    service: str
    protocol: str
    operation: str
    params: Mapping
    query_compatible: bool = False  # a JSON service that also answers the query protocol's error codes

    @property
    def iam_prefix(self) -> str:
        return SERVICES[self.service][1]


def signing_name(service: str) -> str:
    return SERVICES[service][0]


def identify(
    method: str, raw_path: str, raw_query: str, headers: Mapping[str, str], body: bytes, scope_service: str | None
) -> Call:
    """The call ``method raw_path?raw_query`` with ``headers`` (lower-case names) and ``body`` makes.
    ``scope_service``: the signing name in the request's credential scope, if it is signed."""
    service = _BY_SIGNING_NAME.get(scope_service) if scope_service else None
    if scope_service and service is None:
        raise UnknownOperation(
            f"the local AWS serves {', '.join(sorted(SERVICES))}; this request is signed for '{scope_service}'"
        )
    target = headers.get("x-amz-target")
    if target:
        return _json_call(target, body, headers, service)
    content_type = headers.get("content-type", "").split(";")[0].strip().lower()
    query = dict(parse_qsl(raw_query, keep_blank_values=True))
    if method == "POST" and content_type == _FORM and service != "s3":
        return _query_call(
            {**query, **dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))}, service
        )
    if "Action" in query and service != "s3" and raw_path in ("", "/"):
        return _query_call(query, service)
    if service not in (None, "s3"):
        raise UnknownOperation(f"this request names no {service} operation (no X-Amz-Target, no Action)", service)
    return _s3_call(method, raw_path, raw_query, headers, body)


def _json_call(target: str, body: bytes, headers: Mapping[str, str], service: str | None) -> Call:
    prefix, _, operation = target.partition(".")
    by_prefix = _json_prefixes()
    if prefix not in by_prefix or (service and by_prefix[prefix] != service):
        raise UnknownOperation(f"X-Amz-Target {target!r} names no operation of the local AWS", service)
    service = by_prefix[prefix]
    if operation not in _model(service).operation_names:
        raise UnknownOperation(f"{service} has no operation {operation!r}", service)
    try:
        params = json.loads(body or b"{}")
    except ValueError:
        raise UnknownOperation(f"the body of {service}.{operation} is not JSON", service) from None
    if not isinstance(params, dict):
        raise UnknownOperation(f"the body of {service}.{operation} is not a JSON object", service)
    return Call(service, "json", operation, params, query_compatible="x-amzn-query-mode" in headers)


def _query_call(params: dict[str, str], service: str | None) -> Call:
    operation = params.get("Action", "")
    if service is None:
        service = _query_versions().get(params.get("Version", ""))
    if service is None:
        raise UnknownOperation(
            f"Action={operation!r} with Version={params.get('Version')!r} names no service of the local AWS"
        )
    if operation not in _model(service).operation_names:
        raise UnknownOperation(f"{service} has no operation {operation!r}", service)
    return Call(service, "query", operation, params)


def _s3_call(method: str, raw_path: str, raw_query: str, headers: Mapping[str, str], body: bytes) -> Call:
    if ".s3-accesspoint." in headers.get("host", "") or ".s3-object-lambda." in headers.get("host", ""):
        raise UnknownOperation("the local AWS serves no S3 access points", "s3")
    segments = raw_path.lstrip("/").split("/", 1)
    bucket = segments[0]
    if bucket and not _BUCKET.fullmatch(bucket):
        raise UnknownOperation(f"The specified bucket is not valid: {unquote(bucket)!r}", "s3", "InvalidBucketName")
    key = "/".join(unquote(raw_path).split("/")[2:]) if bucket else None
    level = "service" if not bucket else "object" if len(segments) > 1 and segments[1] else "bucket"
    query = dict(parse_qsl(raw_query, keep_blank_values=True))
    fitting = []
    for operation, (binding_method, binding_level, markers) in _s3_bindings().items():
        if binding_method != method or binding_level != level:
            continue
        if all(
            (query.get(name) == value if value is not None else name in query) if where == "query" else name in headers
            for where, name, value in markers
        ):
            fitting.append((len(markers), operation, markers))
    if not fitting:
        raise UnknownOperation(f"{method} on an S3 {level} with these parameters names no S3 operation", "s3")
    most = max(count for count, _, _ in fitting)
    best = [(operation, markers) for count, operation, markers in fitting if count == most]
    # Two operations of one binding are one (GetBucketLifecycle, GetBucketLifecycleConfiguration); two of different
    # bindings fitting alike (`?acl&tagging`) are a request that could be served as either: what is authorized
    # must be what is served, so it is neither.
    if len({markers for _, markers in best}) > 1:
        names = ", ".join(operation for operation, _ in best)
        raise UnknownOperation(
            f"{method} on an S3 {level} with these parameters could be any of {names}", "s3", "InvalidRequest"
        )
    params = {"Bucket": bucket, "Key": key, "query": query, "headers": headers, "body": body}
    return Call("s3", "rest-xml", best[0][0], params)


@functools.cache
def _model(service: str):
    import botocore.session

    return botocore.session.get_session().get_service_model(service)


@functools.cache
def _json_prefixes() -> dict[str, str]:
    return {_model(name).metadata["targetPrefix"]: name for name in SERVICES if "targetPrefix" in _model(name).metadata}


@functools.cache
def _query_versions() -> dict[str, str]:
    return {
        _model(name).api_version: name
        for name in SERVICES
        if "query" in _model(name).metadata.get("protocols", ["query"])
    }


@functools.cache
def _s3_bindings() -> dict[str, tuple[str, str, tuple]]:
    """S3 operation → (method, level, markers): the query keys (with their value, where the binding fixes one) and
    the headers that tell it from the other operations on the same method and level."""
    model = _model("s3")
    bindings = {}
    for operation in sorted(model.operation_names):
        op = model.operation_model(operation)
        path, _, query = op.http["requestUri"].partition("?")
        level = {"/": "service", "/{Bucket}": "bucket", "/{Bucket}/{Key+}": "object"}.get(path)
        if level is None:
            continue
        markers = []
        for part in filter(None, query.split("&")):
            name, separator, value = part.partition("=")
            if name != "x-id":
                markers.append(("query", name, value if separator else None))
        shape = op.input_shape
        for member in shape.required_members if shape else ():
            serialization = shape.members[member].serialization
            if serialization.get("location") == "querystring":
                markers.append(("query", serialization["name"], None))
            elif serialization.get("location") == "header":
                markers.append(("header", serialization["name"].lower(), None))
        bindings[operation] = (op.http["method"], level, tuple(markers))
    return bindings
