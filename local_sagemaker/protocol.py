"""SageMaker's wire contract (AWS JSON 1.1), driven by botocore's own service model for SageMaker.

Pure functions over bytes and dicts, so that any HTTP server can sit in front: ``parse_request`` turns the
``X-Amz-Target`` header and body of a ``POST /`` into (operation, params) checked against the operation's input
shape, ``serialize_response`` shapes a handler's answer by the output shape, and ``error_response`` renders a
``SageMakerError`` as SageMaker does, so that botocore raises ``ClientError`` with the same code and message.

Validation is what SageMaker does server-side, in its words ("1 validation error detected: Value 'x' at
'trainingJobName' failed to satisfy constraint: ..."): botocore's ``ParamValidator`` checks types, required members
and unknown keys; the constraints it leaves to the service (max, enum, pattern; min is redone here for AWS's wording)
are checked here. Model patterns are Java regexes: the few Python cannot compile (``\\p{L}`` classes) are skipped.
"""

from __future__ import annotations

import base64
import json
import re
import uuid
from collections.abc import Collection
from datetime import UTC, datetime
from functools import cache

import botocore.session
from botocore.model import OperationModel, ServiceModel, Shape
from botocore.utils import parse_to_aware_datetime
from botocore.validate import ParamValidator

from local_aws import LOCAL_ACCOUNT, LOCAL_REGION

CONTENT_TYPE = "application/x-amz-json-1.1"
# SageMaker's bound on a FailureReason: a longer one is cut there.
MAX_FAILURE_REASON = 1024


# -- errors ------------------------------------------------------------------------------------------------------


class SageMakerError(Exception):
    """An error answer: ``code`` is what botocore reports as ``Error.Code``, ``status`` the HTTP status."""

    code = "ValidationException"
    status = 400

    def __init__(self, message: str = "", *, code: str | None = None, status: int | None = None):
        super().__init__(message)
        self.message = message
        self.code = code or self.code
        self.status = status or self.status

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class ValidationException(SageMakerError):
    code = "ValidationException"


class ResourceInUse(SageMakerError):
    code = "ResourceInUse"


class ResourceLimitExceeded(SageMakerError):
    code = "ResourceLimitExceeded"


class ResourceNotFound(SageMakerError):
    code = "ResourceNotFound"


class UnknownOperationException(SageMakerError):
    code = "UnknownOperationException"


class SerializationException(SageMakerError):
    code = "SerializationException"


class ThrottlingException(SageMakerError):
    code = "ThrottlingException"


class InternalFailure(SageMakerError):
    code, status = "InternalFailure", 500


# A missing resource: SageMaker answers ValidationException (not ResourceNotFound) with these messages; the ARN
# types they name; SageMaker ARNs carry the name lower-cased.
_KINDS = {
    "training job": "training-job",
    "model": "model",
    "endpoint config": "endpoint-config",
    "endpoint configuration": "endpoint-config",
    "endpoint": "endpoint",
}
_NOUNS = {"endpoint-config": "endpoint configuration"}


def _resource_type(kind: str) -> str:
    return _KINDS.get(kind.lower().replace("-", " ").replace("_", " "), kind)


def arn(kind: str, name: str, *, region: str = LOCAL_REGION, account: str = LOCAL_ACCOUNT) -> str:
    """The ARN SageMaker gives resource ``name`` of ``kind`` ("training job" or "training-job", "endpoint config"...)."""
    return f"arn:aws:sagemaker:{region}:{account}:{_resource_type(kind)}/{name.lower()}"


def not_found(
    kind: str,
    name: str,
    resource_arn: str | None = None,
    *,
    region: str = LOCAL_REGION,
    account: str = LOCAL_ACCOUNT,
) -> SageMakerError:
    """The error SageMaker's Describe*/Delete* give for a missing resource (its ARN: ``resource_arn``, or made from
    ``region`` and ``account``), e.g. ``Could not find endpoint "arn:aws:sagemaker:us-east-1:000000000000:endpoint/x".``
    """
    resource_type = _resource_type(kind)
    if resource_type == "training-job":
        return ValidationException("Requested resource not found.")
    noun = _NOUNS.get(resource_type, resource_type.replace("-", " "))
    return ValidationException(
        f'Could not find {noun} "{resource_arn or arn(kind, name, region=region, account=account)}".'
    )


def failure_reason(text: str) -> str:
    """``text`` as a FailureReason: within SageMaker's bound."""
    return text[:MAX_FAILURE_REASON]


def error_response(error: BaseException, request_id: str | None = None) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) for an error; anything not a SageMakerError is an InternalFailure (500)."""
    if not isinstance(error, SageMakerError):
        error = InternalFailure(f"{type(error).__name__}: {error}")
    headers = {**response_headers(request_id), "x-amzn-ErrorType": error.code}
    return error.status, headers, json.dumps({"__type": error.code, "message": error.message}).encode()


def response_headers(request_id: str | None = None) -> dict[str, str]:
    """Headers of any answer: the JSON 1.1 content type and a request id (botocore's ResponseMetadata.RequestId)."""
    return {"Content-Type": CONTENT_TYPE, "x-amzn-RequestId": request_id or str(uuid.uuid4())}


# -- the model ---------------------------------------------------------------------------------------------------


@cache
def service_model() -> ServiceModel:
    """botocore's SageMaker service model, loaded once."""
    return botocore.session.get_session().get_service_model("sagemaker")


@cache
def operation_names() -> frozenset[str]:
    """Every operation SageMaker's model defines (CreateTrainingJob, DescribeEndpoint, ...)."""
    return frozenset(service_model().operation_names)


def operation_model(operation: str) -> OperationModel:
    """The model of ``operation``; UnknownOperationException if SageMaker has no such operation."""
    if operation not in operation_names():
        raise UnknownOperationException(f"Unknown operation {operation!r}")
    return service_model().operation_model(operation)


# -- requests ----------------------------------------------------------------------------------------------------


def parse_request(
    target: str | bytes | None, body: bytes | str, implemented: Collection[str] | None = None
) -> tuple[str, dict]:
    """(operation, params) of a request, params with timestamps as UTC datetimes and blobs as bytes.

    Raises UnknownOperationException for a target that is not ``SageMaker.<Operation>`` or names an operation not in
    ``implemented`` (when given), SerializationException for a body not a JSON object (an empty body is ``{}``), and
    ValidationException naming every way the params break the operation's input shape."""
    prefix = service_model().metadata["targetPrefix"] + "."
    target = target.decode("latin-1") if isinstance(target, bytes) else target
    operation = target[len(prefix) :] if target and target.startswith(prefix) else ""
    if operation not in operation_names():
        raise UnknownOperationException(f"Unknown operation {target!r}: expected X-Amz-Target SageMaker.<Operation>")
    if implemented is not None and operation not in implemented:
        raise UnknownOperationException(f"{operation} is not supported by this local SageMaker service")
    try:
        params = json.loads(body) if body.strip() else {}
    except ValueError as exc:
        raise SerializationException(f"The request body is not valid JSON: {exc}") from None
    if not isinstance(params, dict):
        raise SerializationException("The request body must be a JSON object")
    shape = operation_model(operation).input_shape
    if shape is None:
        return operation, {}
    params = _decode(params, shape)
    if problems := _problems(params, shape):
        raise ValidationException(_summary(problems))
    return operation, params


def _decode(value, shape: Shape):
    """JSON values to the Python types botocore validates and handlers use; JSON nulls are absent members."""
    kind = shape.type_name
    if kind == "structure" and isinstance(value, dict):
        return {k: _decode(v, shape.members[k]) if k in shape.members else v for k, v in value.items() if v is not None}
    if kind == "list" and isinstance(value, list):
        return [_decode(item, shape.member) for item in value]
    if kind == "map" and isinstance(value, dict):
        return {k: _decode(v, shape.value) for k, v in value.items()}
    if kind == "timestamp" and isinstance(value, int | float | str) and not isinstance(value, bool):
        try:
            return parse_to_aware_datetime(value).astimezone(UTC)
        except (ValueError, TypeError, OverflowError):
            return value  # left for ParamValidator to report
    if kind == "blob" and isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except ValueError:
            raise SerializationException(f"Blob value {value[:40]!r} is not valid base64") from None
    return value


# ParamValidator's findings that _constraints reports again, in SageMaker's words.
_REDONE = {"missing required field", "invalid length", "invalid range"}
_NUMBERS = ("integer", "long", "float", "double")


def _problems(params: dict, shape: Shape) -> list[str]:
    """Every way ``params`` break ``shape``: botocore's type/unknown-key findings, then SageMaker's constraints."""
    report = ParamValidator().validate(params, shape)
    # botocore's ValidationErrors has no public accessor for its findings: a list of (reason, name, details).
    found = [report._format_error(e) for e in report._errors if e[0] not in _REDONE]
    _constraints(params, shape, "", found)
    return found


def _summary(problems: list[str]) -> str:
    return f"{len(problems)} validation error{'s' if len(problems) > 1 else ''} detected: " + "; ".join(problems)


def _constraints(value, shape: Shape, path: str, out: list[str]) -> None:
    """SageMaker's messages for ``value`` at ``path`` (camelCase, lists as ``name.1.member``) breaking ``shape``."""
    out.extend(f"Value {_java(value)} at '{path}' failed to satisfy constraint: {m}" for m in _failures(value, shape))
    if shape.type_name == "structure" and isinstance(value, dict):
        for name in shape.metadata.get("required", ()):
            if name not in value:
                out.append(
                    f"Value null at '{_camel(path, name)}' failed to satisfy constraint: Member must not be null"
                )
        for name, member in value.items():
            if name in shape.members:
                _constraints(member, shape.members[name], _camel(path, name), out)
    elif shape.type_name == "list" and isinstance(value, list):
        for i, item in enumerate(value, 1):
            _constraints(item, shape.member, f"{path}.{i}.member", out)
    elif shape.type_name == "map" and isinstance(value, dict):
        keys = {m: None for k in value for m in _failures(k, shape.key)}
        values = {}
        for k, v in value.items():
            if shape.value.type_name in ("structure", "list", "map"):
                _constraints(v, shape.value, f"{path}.{k}", out)
            else:
                values.update(dict.fromkeys(_failures(v, shape.value)))
        for what, failed in (("Map keys", keys), ("Map value", values)):
            if failed:
                out.append(
                    f"Value {_java(value)} at '{path}' failed to satisfy constraint: "
                    f"{what} must satisfy constraint: [{', '.join(failed)}]"
                )


def _failures(value, shape: Shape) -> list[str]:
    """The constraints (min, max, pattern, enum) of ``shape`` that ``value`` breaks; type errors are botocore's."""
    meta, kind = shape.metadata, shape.type_name
    if kind in ("string", "list", "map") and isinstance(value, str | list | dict):
        size, what = len(value), "length"
    elif kind in _NUMBERS and isinstance(value, int | float) and not isinstance(value, bool):
        size, what = value, "value"
    else:
        return []  # a type error, which botocore's ParamValidator reports
    failed = []
    if "max" in meta and size > meta["max"]:
        failed.append(f"Member must have {what} less than or equal to {meta['max']}")
    if "min" in meta and size < meta["min"]:
        failed.append(f"Member must have {what} greater than or equal to {meta['min']}")
    if kind == "string" and (regex := _regex(meta.get("pattern"))) and not regex.fullmatch(value):
        failed.append(f"Member must satisfy regular expression pattern: {meta['pattern']}")
    if kind == "string" and "enum" in meta and value not in meta["enum"]:
        failed.append(f"Member must satisfy enum value set: [{', '.join(meta['enum'])}]")
    return failed


@cache
def _regex(pattern: str | None) -> re.Pattern | None:
    try:
        return re.compile(pattern) if pattern else None
    except re.error:
        return None  # a Java-only construct: not checked


def _camel(path: str, member: str) -> str:
    name = member[:1].lower() + member[1:]
    return f"{path}.{name}" if path else name


def _java(value) -> str:
    """``value`` as SageMaker (Java) prints it in a validation message: 'x', '[a, b]', '{k=v}'."""
    return f"'{_show(value)}'"


def _show(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ", ".join(map(_show, value)) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}={_show(v)}" for k, v in value.items()) + "}"
    return str(value)


# -- responses ---------------------------------------------------------------------------------------------------


def serialize_response(operation: str, result: dict | None, *, strict: bool = False) -> bytes:
    """The JSON body of ``operation``'s answer ``result``, shaped by the output shape: members the shape lacks are
    dropped (``strict``: ValueError naming the path), None dropped, timestamps (datetime, naive meaning UTC, or ISO
    string) as epoch seconds, blobs as base64."""
    shape = operation_model(operation).output_shape
    body = _encode(result or {}, shape, "", strict) if shape is not None else {}
    return json.dumps(body, separators=(",", ":")).encode()


def _encode(value, shape: Shape, path: str, strict: bool):
    """``value`` as the JSON protocol writes ``shape``; ``path`` (botocore's spelling) names it in errors."""
    kind = shape.type_name
    if (kind in ("structure", "map") and not isinstance(value, dict)) or (
        kind == "list" and not isinstance(value, list)
    ):
        raise ValueError(f"{path or 'output'}: {shape.name} is a {kind}, got {type(value).__name__}")
    if kind == "structure":
        unknown = [k for k in value if k not in shape.members]
        if strict and unknown:
            raise ValueError(f"{path + '.' if path else ''}{unknown[0]}: not a member of {shape.name}")
        members = shape.members
        return {
            k: _encode(v, members[k], f"{path}.{k}".lstrip("."), strict)
            for k, v in value.items()
            if k in members and v is not None
        }
    if kind == "list":
        return [_encode(v, shape.member, f"{path}[{i}]", strict) for i, v in enumerate(value)]
    if kind == "map":
        return {k: _encode(v, shape.value, f"{path}.{k}", strict) for k, v in value.items() if v is not None}
    if kind == "timestamp":
        if isinstance(value, datetime):
            return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()
        return parse_to_aware_datetime(value).timestamp()
    if kind == "blob":
        return base64.b64encode(value.encode() if isinstance(value, str) else bytes(value)).decode()
    return value


def validate_response(operation: str, result: dict | None) -> None:
    """ValueError unless ``result`` is a model-valid answer to ``operation`` as the client will read it: no member
    the model lacks, required members present, right types, constraints (enums, lengths...) met."""
    shape = operation_model(operation).output_shape
    wire = json.loads(serialize_response(operation, result, strict=True))
    if shape is not None and (problems := _problems(_decode(wire, shape), shape)):
        raise ValueError(f"{operation} answer is not valid: {_summary(problems)}")
