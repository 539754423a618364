"""SigV4 as AWS checks it (local_aws/sigv4.py), against requests botocore signs: what it accepts, and each way a
request is refused, by kind."""

from __future__ import annotations

import datetime
import hashlib
from urllib.parse import urlsplit

import pytest
from botocore.auth import S3SigV4Auth, S3SigV4QueryAuth, SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from local_aws import sigv4
from local_aws.sigv4 import AuthError, Failure

KEY_ID, SECRET, TOKEN = "AKIDEXAMPLE000000000", "the-secret", "the-session-token"


def lookup(access_key_id: str, date: str, region: str, service: str) -> sigv4.Key | None:
    if access_key_id != KEY_ID:
        return None
    return sigv4.Key(sigv4.derive_key(SECRET, date, region, service), principal="someone")


def with_token(access_key_id: str, date: str, region: str, service: str, hours: float = 1) -> sigv4.Key | None:
    key = lookup(access_key_id, date, region, service)
    expires = datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=hours)
    return key and sigv4.Key(key.signing_key, TOKEN, expires, key.principal)


def arrived(request: AWSRequest, body: bytes | None = None, **changed_headers: str) -> sigv4.Request:
    """The request as a server receives it (its Host header among the rest), with a changed body or headers."""
    prepared = request.prepare()
    parts = urlsplit(prepared.url)
    headers = {"host": parts.netloc, **{name.lower(): value for name, value in prepared.headers.items()}}
    headers.update({name.lower().replace("_", "-"): value for name, value in changed_headers.items()})
    return sigv4.Request(prepared.method, parts.path, parts.query, headers, prepared.body if body is None else body)


def signed(
    method: str,
    url: str,
    body: bytes = b"",
    *,
    service: str = "sagemaker",
    secret: str = SECRET,
    token: str | None = None,
    headers: dict | None = None,
    s3: bool = False,
) -> AWSRequest:
    request = AWSRequest(method, url, data=body, headers=headers or {})
    if s3:
        request.headers["X-Amz-Content-SHA256"] = hashlib.sha256(body).hexdigest()
    (S3SigV4Auth if s3 else SigV4Auth)(Credentials(KEY_ID, secret, token), service, "us-east-1").add_auth(request)
    return request


def verify(request: sigv4.Request, **options) -> sigv4.Verified:
    options.setdefault("lookup", lookup)
    return sigv4.verify(request, region="us-east-1", **{"service": "sagemaker", **options})


def refused(request: sigv4.Request, **options) -> AuthError:
    with pytest.raises(AuthError) as caught:
        verify(request, **options)
    return caught.value


def test_what_botocore_signs_is_verified_for_json_requests():
    json_call = signed(
        "POST",
        "http://127.0.0.1:8090/",
        b'{"MaxResults": 5}',
        headers={"X-Amz-Target": "SageMaker.ListEndpoints", "Content-Type": "application/x-amz-json-1.1"},
    )
    assert verify(arrived(json_call)).principal == "someone"


def test_what_botocore_signs_is_verified_for_rest_requests():
    invocation = signed("POST", "http://127.0.0.1:8091/endpoints/digits/invocations", b"[0]")
    assert verify(arrived(invocation)).signed_headers == ("host", "x-amz-date")


def test_what_botocore_signs_is_verified_for_s3_requests():
    key = "http://127.0.0.1:5000/bucket/a%20b/c%2Bd%28e%29?tagging&x=1%2F2"
    s3 = signed("PUT", key, b"tags", service="s3", s3=True)
    assert verify(arrived(s3), service="s3", s3=True).access_key_id == KEY_ID


def test_a_presigned_url_is_verified_until_it_expires():
    request = AWSRequest("GET", "http://127.0.0.1:5000/bucket/report%20one.html")
    S3SigV4QueryAuth(Credentials(KEY_ID, SECRET), "s3", "us-east-1", expires=60).add_auth(request)
    assert verify(arrived(request), service="s3", s3=True).presigned
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=61)
    assert refused(arrived(request), service="s3", s3=True, now=later).failure is Failure.EXPIRED_URL
    other = arrived(request)
    other = sigv4.Request(other.method, other.raw_path.replace("one", "two"), other.raw_query, other.headers, b"")
    assert refused(other, service="s3", s3=True).failure is Failure.BAD_SIGNATURE


@pytest.mark.parametrize(
    ("change", "failure"),
    [
        ({"secret": "another"}, Failure.BAD_SIGNATURE),
        ({"body": b"[1]"}, Failure.BAD_SIGNATURE),  # a body other than the one signed (no header states its hash)
        ({"header": ("x-amz-target", "SageMaker.DeleteEndpoint")}, Failure.BAD_SIGNATURE),
        ({"header": ("authorization", "AWS4-HMAC-SHA256 Credential=x")}, Failure.MALFORMED),
        ({"header": ("authorization", "AWS AKID:signature")}, Failure.UNSUPPORTED),
        ({"header": ("x-amz-date", "yesterday")}, Failure.MALFORMED),
        ({"key": "AKIAUNKNOWN000000000"}, Failure.UNKNOWN_KEY),
        ({"service": "monitoring"}, Failure.WRONG_SCOPE),
        ({"region": "eu-west-1"}, Failure.WRONG_SCOPE),
        ({"skew": 16}, Failure.SKEWED),
        ({"unsigned": True}, Failure.MISSING),
    ],
)
def test_each_way_a_request_is_refused_is_named(change, failure):
    request = signed(
        "POST",
        "http://127.0.0.1:8090/",
        b"[0]",
        secret=change.get("secret", SECRET),
        headers={"X-Amz-Target": "SageMaker.ListEndpoints"},
    )
    received = arrived(request, change.get("body"), **dict([change["header"]]) if "header" in change else {})
    options = {}
    if "key" in change:
        received.headers["authorization"] = received.headers["authorization"].replace(KEY_ID, change["key"])
    if "service" in change:
        options["service"] = change["service"]
    if "region" in change:
        received = sigv4.Request(
            received.method, received.raw_path, received.raw_query, received.headers, received.body
        )
        with pytest.raises(AuthError) as caught:
            sigv4.verify(received, service="sagemaker", region=change["region"], lookup=lookup)
        assert caught.value.failure is failure
        return
    if "skew" in change:
        options["now"] = datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=change["skew"])
    if "unsigned" in change:
        received = sigv4.Request("POST", "/", "", {"host": "127.0.0.1:8090"}, b"[0]")
        assert not sigv4.is_signed(received)
    assert refused(received, **options).failure is failure


def test_s3_checks_the_payload_hash_it_is_told_and_every_amz_header_is_signed():
    request = signed("PUT", "http://127.0.0.1:5000/bucket/key", b"the body", service="s3", s3=True)
    mismatch = refused(arrived(request, b"another body"), service="s3", s3=True)
    assert mismatch.failure is Failure.CONTENT_MISMATCH and mismatch.details["client"] != mismatch.details["server"]
    unsigned_header = refused(arrived(request, x_amz_acl="public-read"), service="s3", s3=True)
    assert (
        unsigned_header.failure is Failure.BAD_SIGNATURE
        and unsigned_header.details["headers_not_signed"] == "x-amz-acl"
    )
    request = AWSRequest("GET", "http://127.0.0.1:5000/bucket/key")  # S3 wants x-amz-content-sha256 signed
    SigV4Auth(Credentials(KEY_ID, SECRET), "s3", "us-east-1").add_auth(request)
    assert refused(arrived(request), service="s3", s3=True).failure is Failure.MALFORMED


def test_a_session_key_signs_only_with_its_token():
    request = signed("POST", "http://127.0.0.1:8090/", b"{}", token=TOKEN)
    assert verify(arrived(request), lookup=with_token).principal == "someone"
    another = signed("POST", "http://127.0.0.1:8090/", b"{}", token="another")  # the right secret, not its token
    assert refused(arrived(another), lookup=with_token).failure is Failure.BAD_TOKEN
    untokened = signed("POST", "http://127.0.0.1:8090/", b"{}")
    assert refused(arrived(untokened), lookup=with_token).failure is Failure.BAD_TOKEN
    ended = refused(arrived(request), lookup=lambda *scope: with_token(*scope, hours=-0.01))
    assert ended.failure is Failure.EXPIRED_TOKEN
