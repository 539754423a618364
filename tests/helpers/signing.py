"""Requests signed as boto3 signs them, for the tests that speak HTTP without boto3 (raw sockets, httpx)."""

from __future__ import annotations

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from tests.conftest import KEYS


def signed_headers(
    method: str,
    url: str,
    headers: dict[str, str],
    body: bytes,
    *,
    service: str = "sagemaker",
    key=KEYS.admin,
    region: str = "us-east-1",
) -> dict[str, str]:
    """``headers`` with the SigV4 ones added (X-Amz-Date, Authorization), for ``key``; ``headers`` should name the
    Host the request will carry."""
    request = AWSRequest(method, url, data=body, headers=headers)
    SigV4Auth(Credentials(key.access_key_id, key.secret_access_key), service, region).add_auth(request)
    return dict(request.headers)


def raw_request(method: str, path: str, headers: dict[str, str], body: bytes, **signing) -> bytes:
    """The bytes of a signed HTTP/1.1 request for ``path`` with ``headers`` (Host among them; Content-Length added
    for a body unless given)."""
    if body and "Content-Length" not in headers:
        headers = {**headers, "Content-Length": str(len(body))}
    signed = signed_headers(method, f"http://{headers['Host']}{path}", headers, body, **signing)
    head = "".join(f"{name}: {value}\r\n" for name, value in signed.items())
    return f"{method} {path} HTTP/1.1\r\n{head}\r\n".encode("latin-1") + body


def unsigned_control_plane_answer(endpoint_url: str) -> tuple[int, str]:
    """The status and error ``__type`` a SageMaker control plane at ``endpoint_url`` answers ListEndpoints sent with
    no signature at all."""
    import http.client
    import json
    from urllib.parse import urlsplit

    target = urlsplit(endpoint_url)
    connection = http.client.HTTPConnection(target.hostname, target.port, timeout=10)
    try:
        connection.request(
            "POST",
            "/",
            body=b"{}",
            headers={"X-Amz-Target": "SageMaker.ListEndpoints", "Content-Type": "application/x-amz-json-1.1"},
        )
        answer = connection.getresponse()
        return answer.status, json.loads(answer.read())["__type"]
    finally:
        connection.close()
