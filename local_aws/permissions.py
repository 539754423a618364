"""What a call needs: the IAM actions it is authorized as, on which resource ARNs, with which context keys.

Most operations are authorized as the action of the same name on the resources its Service Authorization Reference
entry requires (local_aws.sar), their ARNs filled from the request's own parameters. The rest are listed here as
AWS documents them. S3 most of all: HeadBucket and the listings are s3:ListBucket (with s3:prefix, s3:delimiter and
s3:max-keys as the request gives them), HeadObject is s3:GetObject, multipart uploads and CopyObject are
s3:PutObject (the copy also s3:GetObject on its source), DeleteObjects is s3:DeleteObject on each key it names.
STS's GetCallerIdentity needs no permission. Each requirement says which resource-based policy applies beside the
principal's own: the bucket's policy, the role's trust policy, the topic's policy.
"""

from __future__ import annotations

import dataclasses
import re
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Mapping
from urllib.parse import parse_qsl, unquote

from local_aws import sar
from local_aws.operations import Call, UnknownOperation


@dataclasses.dataclass(frozen=True)
class Requirement:
    """One authorization a call needs. ``resource_policy``: (kind, name) of the resource-based policy that applies
    (``bucket``, ``role`` or ``topic``), None where only identity-based policies count."""

    action: str
    resource: str
    context: Mapping[str, str | list[str]] = dataclasses.field(default_factory=dict)
    resource_policy: tuple[str, str] | None = None


# S3 operation → (IAM action, what it acts on): "service" (*), "bucket", "object", or "source" (CopyObject's).
_S3: dict[str, tuple[tuple[str, str], ...]] = {
    "ListBuckets": (("s3:ListAllMyBuckets", "service"),),
    "CreateBucket": (("s3:CreateBucket", "bucket"),),
    "DeleteBucket": (("s3:DeleteBucket", "bucket"),),
    "HeadBucket": (("s3:ListBucket", "bucket"),),
    "ListObjects": (("s3:ListBucket", "bucket"),),
    "ListObjectsV2": (("s3:ListBucket", "bucket"),),
    "ListObjectVersions": (("s3:ListBucketVersions", "bucket"),),
    "ListMultipartUploads": (("s3:ListBucketMultipartUploads", "bucket"),),
    "GetBucketLocation": (("s3:GetBucketLocation", "bucket"),),
    "GetBucketPolicy": (("s3:GetBucketPolicy", "bucket"),),
    "PutBucketPolicy": (("s3:PutBucketPolicy", "bucket"),),
    "DeleteBucketPolicy": (("s3:DeleteBucketPolicy", "bucket"),),
    "GetBucketPolicyStatus": (("s3:GetBucketPolicyStatus", "bucket"),),
    "GetBucketVersioning": (("s3:GetBucketVersioning", "bucket"),),
    "PutBucketVersioning": (("s3:PutBucketVersioning", "bucket"),),
    "GetBucketAcl": (("s3:GetBucketAcl", "bucket"),),
    "PutBucketAcl": (("s3:PutBucketAcl", "bucket"),),
    "GetBucketTagging": (("s3:GetBucketTagging", "bucket"),),
    "PutBucketTagging": (("s3:PutBucketTagging", "bucket"),),
    "DeleteBucketTagging": (("s3:PutBucketTagging", "bucket"),),
    "GetBucketCors": (("s3:GetBucketCORS", "bucket"),),
    "PutBucketCors": (("s3:PutBucketCORS", "bucket"),),
    "DeleteBucketCors": (("s3:PutBucketCORS", "bucket"),),
    "GetBucketEncryption": (("s3:GetEncryptionConfiguration", "bucket"),),
    "PutBucketEncryption": (("s3:PutEncryptionConfiguration", "bucket"),),
    "DeleteBucketEncryption": (("s3:PutEncryptionConfiguration", "bucket"),),
    "GetBucketLifecycle": (("s3:GetLifecycleConfiguration", "bucket"),),
    "GetBucketLifecycleConfiguration": (("s3:GetLifecycleConfiguration", "bucket"),),
    "PutBucketLifecycle": (("s3:PutLifecycleConfiguration", "bucket"),),
    "PutBucketLifecycleConfiguration": (("s3:PutLifecycleConfiguration", "bucket"),),
    "DeleteBucketLifecycle": (("s3:PutLifecycleConfiguration", "bucket"),),
    "GetBucketNotification": (("s3:GetBucketNotification", "bucket"),),
    "GetBucketNotificationConfiguration": (("s3:GetBucketNotification", "bucket"),),
    "PutBucketNotification": (("s3:PutBucketNotification", "bucket"),),
    "PutBucketNotificationConfiguration": (("s3:PutBucketNotification", "bucket"),),
    "GetBucketLogging": (("s3:GetBucketLogging", "bucket"),),
    "PutBucketLogging": (("s3:PutBucketLogging", "bucket"),),
    "GetPublicAccessBlock": (("s3:GetBucketPublicAccessBlock", "bucket"),),
    "PutPublicAccessBlock": (("s3:PutBucketPublicAccessBlock", "bucket"),),
    "DeletePublicAccessBlock": (("s3:PutBucketPublicAccessBlock", "bucket"),),
    "GetBucketOwnershipControls": (("s3:GetBucketOwnershipControls", "bucket"),),
    "PutBucketOwnershipControls": (("s3:PutBucketOwnershipControls", "bucket"),),
    "DeleteBucketOwnershipControls": (("s3:PutBucketOwnershipControls", "bucket"),),
    "GetObjectLockConfiguration": (("s3:GetBucketObjectLockConfiguration", "bucket"),),
    "PutObjectLockConfiguration": (("s3:PutBucketObjectLockConfiguration", "bucket"),),
    "GetObject": (("s3:GetObject", "object"),),
    "HeadObject": (("s3:GetObject", "object"),),
    "GetObjectAttributes": (("s3:GetObject", "object"), ("s3:GetObjectAttributes", "object")),
    "PutObject": (("s3:PutObject", "object"),),
    "CopyObject": (("s3:PutObject", "object"), ("s3:GetObject", "source")),
    "DeleteObject": (("s3:DeleteObject", "object"),),
    "DeleteObjects": (("s3:DeleteObject", "objects"),),
    "CreateMultipartUpload": (("s3:PutObject", "object"),),
    "UploadPart": (("s3:PutObject", "object"),),
    "UploadPartCopy": (("s3:PutObject", "object"), ("s3:GetObject", "source")),
    "CompleteMultipartUpload": (("s3:PutObject", "object"),),
    "AbortMultipartUpload": (("s3:AbortMultipartUpload", "object"),),
    "ListParts": (("s3:ListMultipartUploadParts", "object"),),
    "GetObjectTagging": (("s3:GetObjectTagging", "object"),),
    "PutObjectTagging": (("s3:PutObjectTagging", "object"),),
    "DeleteObjectTagging": (("s3:DeleteObjectTagging", "object"),),
    "GetObjectAcl": (("s3:GetObjectAcl", "object"),),
    "PutObjectAcl": (("s3:PutObjectAcl", "object"),),
    "GetObjectRetention": (("s3:GetObjectRetention", "object"),),
    "PutObjectRetention": (("s3:PutObjectRetention", "object"),),
    "GetObjectLegalHold": (("s3:GetObjectLegalHold", "object"),),
    "PutObjectLegalHold": (("s3:PutObjectLegalHold", "object"),),
    "RestoreObject": (("s3:RestoreObject", "object"),),
    "SelectObjectContent": (("s3:GetObject", "object"),),
}
# Headers whose values S3 offers as condition keys, each under its own name.
_S3_HEADER_KEYS = (
    "x-amz-acl",
    "x-amz-content-sha256",
    "x-amz-copy-source",
    "x-amz-metadata-directive",
    "x-amz-server-side-encryption",
    "x-amz-server-side-encryption-aws-kms-key-id",
    "x-amz-storage-class",
    "x-amz-grant-read",
    "x-amz-grant-write",
    "x-amz-grant-read-acp",
    "x-amz-grant-write-acp",
    "x-amz-grant-full-control",
    "x-amz-website-redirect-location",
    "x-amz-object-lock-mode",
    "x-amz-object-lock-retain-until-date",
    "x-amz-object-lock-legal-hold",
)
_S3_LIST_KEYS = {"prefix": "s3:prefix", "delimiter": "s3:delimiter", "max-keys": "s3:max-keys"}

# Operations authorized otherwise than as the action of their own name (botocore service → operation → actions).
_NO_PERMISSION = {("sts", "GetCallerIdentity")}
_LOG_GROUP_LEVEL = "arn:${Partition}:logs:${Region}:${Account}:log-group:${LogGroupName}"


def requirements(
    call: Call, *, region: str, account: str, arn_of: Callable[[str, str], str | None]
) -> list[Requirement]:
    """What ``call`` needs, in the order AWS checks it. ``arn_of(kind, name)``: the ARN of an IAM role, user or
    group by name (their paths are in their ARNs), None when there is none."""
    if call.service == "s3":
        return _s3(call)
    if (call.service, call.operation) in _NO_PERMISSION:
        return []
    action = f"{call.iam_prefix}:{call.operation}"
    if sar.action(action) is None:
        raise UnknownOperation(
            f"the Service Authorization Reference has no action {action}: the local AWS cannot "
            f"authorize {call.service}.{call.operation}",
            call.service,
        )
    params = flat(call.params, call.protocol)
    if "queueurl" in params:  # SQS names a queue by its URL, whose last part is the queue's name
        params["queuename"] = str(params["queueurl"]).rstrip("/").rsplit("/", 1)[-1]
    context = _context(call, params)
    policy_kind = {"sts:AssumeRole": "role", "sns:Publish": "topic", "sns:Subscribe": "topic"}.get(action)
    return [
        Requirement(action, resource, context, (policy_kind, resource) if policy_kind else None)
        for resource in resources_of(action, params, region=region, account=account, arn_of=arn_of)
    ]


def resources_of(
    action: str,
    params: dict,
    *,
    region: str,
    account: str,
    arn_of: Callable[[str, str], str | None] = lambda kind, name: None,
    lowercase: bool = False,
) -> list[str]:
    """The resource ARNs ``action`` is authorized on for a call with ``params`` (``flat``): a parameter that holds an
    ARN of a type the action takes, whole; else each type it requires, its format filled from the parameters named
    like its variables (``lowercase``: names as SageMaker puts them in its ARNs); else ``*``."""
    formats = sar.arn_formats(action)
    for value in params.values():
        if isinstance(value, str) and value.startswith("arn:") and any(sar.matches(f, value) for f, _ in formats):
            return [value]
    required = [arn_format for arn_format, needed in formats if needed]
    if not required:
        return ["*"]
    found = []
    for arn_format in required:
        found += _resources(arn_format, params, region=region, account=account, arn_of=arn_of, lowercase=lowercase)
    return found


# -- S3 ------------------------------------------------------------------------------------------------------------


def _s3(call: Call) -> list[Requirement]:
    entries = _S3.get(call.operation)
    if entries is None:
        raise UnknownOperation(f"the local AWS does not serve S3's {call.operation}", "s3")
    params = call.params
    bucket, key, query, headers = params["Bucket"], params["Key"], params["query"], params["headers"]
    context = {f"s3:{name}": headers[name] for name in _S3_HEADER_KEYS if name in headers}
    if "if-none-match" in headers:
        context["s3:if-none-match"] = headers["if-none-match"]
    if "if-match" in headers:
        context["s3:if-match"] = headers["if-match"]
    if tagging := headers.get("x-amz-tagging"):
        tags = dict(parse_qsl(tagging, keep_blank_values=True))
        context["s3:RequestObjectTagKeys"] = sorted(tags)
        context.update({f"s3:RequestObjectTag/{name}": value for name, value in tags.items()})
    result = []
    for action, target in entries:
        keys = dict(context)
        if action == "s3:ListBucket":
            keys.update({name: query[parameter] for parameter, name in _S3_LIST_KEYS.items() if parameter in query})
        if target == "service":
            result.append(Requirement(action, "*", keys))
        elif target == "bucket":
            result.append(Requirement(action, f"arn:aws:s3:::{bucket}", keys, ("bucket", bucket)))
        elif target == "object":
            version = "versionId" in query and action in ("s3:GetObject", "s3:DeleteObject")
            result.append(
                Requirement(
                    f"{action}Version" if version else action, f"arn:aws:s3:::{bucket}/{key}", keys, ("bucket", bucket)
                )
            )
        elif target == "source":
            source_bucket, source_key, version = _copy_source(headers.get("x-amz-copy-source", ""))
            result.append(
                Requirement(
                    "s3:GetObjectVersion" if version else "s3:GetObject",
                    f"arn:aws:s3:::{source_bucket}/{source_key}",
                    {},
                    ("bucket", source_bucket),
                )
            )
        elif target == "objects":
            for name, version in _deleted_keys(params.get("body", b"")):
                result.append(
                    Requirement(
                        "s3:DeleteObjectVersion" if version else action,
                        f"arn:aws:s3:::{bucket}/{name}",
                        keys,
                        ("bucket", bucket),
                    )
                )
    return result


def _copy_source(header: str) -> tuple[str, str, str | None]:
    source, _, version = unquote(header).lstrip("/").partition("?versionId=")
    bucket, _, key = source.partition("/")
    if not bucket or not key:
        raise UnknownOperation(f"x-amz-copy-source {header!r} is not bucket/key", "s3")
    return bucket, key, version or None


def _deleted_keys(body: bytes) -> list[tuple[str, str | None]]:
    """The keys (and versions) a DeleteObjects body names."""
    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError:
        raise UnknownOperation("the DeleteObjects body is not XML", "s3") from None
    keys = []
    for element in root.iter():
        if element.tag.rsplit("}", 1)[-1] == "Object":
            fields = {child.tag.rsplit("}", 1)[-1]: child.text or "" for child in element}
            keys.append((fields.get("Key", ""), fields.get("VersionId")))
    if not keys:
        raise UnknownOperation("the DeleteObjects body names no object", "s3")
    return keys


# -- the other services ------------------------------------------------------------------------------------------------


def flat(params: Mapping, protocol: str) -> dict[str, object]:
    """A call's parameters by lower-case name: JSON members as they are, query lists (``Name.member.N``) gathered
    under ``Name``."""
    if protocol == "json":
        return {name.lower(): value for name, value in params.items()}
    flat: dict[str, object] = {}
    for name, value in params.items():
        match = re.fullmatch(r"([A-Za-z]+)\.member\.(\d+)", name)
        if match:
            flat.setdefault(match[1].lower(), []).append(value)
        else:
            flat[name.lower()] = value
    return flat


def _resources(
    arn_format: str,
    params: dict,
    *,
    region: str,
    account: str,
    arn_of: Callable[[str, str], str | None],
    lowercase: bool,
) -> list[str]:
    """The ARNs of the resources of type ``arn_format`` a call names: a parameter holding such an ARN whole, else the
    format filled from the parameters named like its variables (a list gives one ARN each; none gives ``*``)."""
    for value in params.values():
        if isinstance(value, str) and value.startswith("arn:") and sar.matches(arn_format, value):
            return [value]
    values: dict[str, list[str]] = {"Partition": ["aws"], "Region": [region], "Account": [account]}
    for variable in sar.variables(arn_format):
        if variable in values:
            continue
        name = variable.removesuffix("WithPath").lower()
        found = params.get(name, params.get(f"{name}s"))
        if found is None:
            continue
        found = found if isinstance(found, list) else [found]
        if variable.endswith("WithPath"):
            kind = variable.removesuffix("NameWithPath").lower()
            arns = [arn_of(kind, str(item)) for item in found]
            return [
                arn or sar.fill(arn_format, {"Account": account, "Partition": "aws", variable: str(item)})
                for arn, item in zip(arns, found, strict=True)
            ]
        values[variable] = [str(item).lower() if lowercase else str(item) for item in found]
    if arn_format == _LOG_GROUP_LEVEL:
        # A log group is authorized as CloudWatch Logs names it in its messages: its ARN followed by ":log-stream:",
        # which policies match with `log-group:NAME:*`.
        arn_format += ":log-stream:"
    combined = [{}]
    for variable, options in values.items():
        combined = [{**partial, variable: option} for partial in combined for option in options]
    return [sar.fill(arn_format, filled) for filled in combined]


def _context(call: Call, params: dict) -> dict[str, str | list[str]]:
    """The service's own condition keys the request sets (tags, CloudWatch's namespace, STS's session fields...)."""
    context: dict[str, str | list[str]] = {}
    tags = _tags(call, params)
    if tags:
        context["aws:TagKeys"] = sorted(tags)
        context.update({f"aws:RequestTag/{name}": value for name, value in tags.items()})
    if call.service == "cloudwatch" and "namespace" in params:
        context["cloudwatch:namespace"] = str(params["namespace"])
    if call.service == "sts":
        for parameter, key in (
            ("rolesessionname", "sts:RoleSessionName"),
            ("externalid", "sts:ExternalId"),
            ("sourceidentity", "sts:SourceIdentity"),
        ):
            if parameter in params:
                context[key] = str(params[parameter])
    if call.service == "sns" and call.operation == "Subscribe":
        context.update(
            {"sns:Protocol": str(params.get("protocol", "")), "sns:Endpoint": str(params.get("endpoint", ""))}
        )
    if call.service == "iam":
        if "permissionsboundary" in params:
            context["iam:PermissionsBoundary"] = str(params["permissionsboundary"])
        if "policyarn" in params:
            context["iam:PolicyARN"] = str(params["policyarn"])
    return context


def _tags(call: Call, params: dict) -> dict[str, str]:
    if call.protocol == "json":
        tags = params.get("tags", params.get("tags".lower()))
        if isinstance(tags, dict):
            return {str(name): str(value) for name, value in tags.items()}
        if isinstance(tags, list):
            return {
                str(tag.get("Key", tag.get("key"))): str(tag.get("Value", tag.get("value", "")))
                for tag in tags
                if isinstance(tag, dict)
            }
        return {}
    tags = {}
    for name, value in call.params.items():
        match = re.fullmatch(r"Tags\.member\.(\d+)\.Key", name)
        if match:
            tags[value] = call.params.get(f"Tags.member.{match[1]}.Value", "")
    return tags
