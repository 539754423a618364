"""AWS Lambda handler: which digits images show, through the MNIST endpoint, behind API Gateway.

API Gateway's Lambda proxy integration (REST API, payload 1.0, or HTTP API, payload 2.0) sends ``POST`` with:
- ``Content-Type: application/json``: ``{"instances": [image, ...]}``, each image 28x28 pixel values 0-255
  (white ink on black) or 784 of them, at most ``MAX_IMAGES`` images;
- ``Content-Type: image/png`` or ``image/jpeg``: one picture of one digit (API Gateway passes it base64-encoded
  when the API lists the type among its binary media types).

Answers: 200 ``{"predictions": [{"label": 7, "confidence": 0.998}, ...]}``; a bad event 4xx with
``{"message": what is wrong}`` (the endpoint's own refusal of an image included); the endpoint not answering 502.
Nothing of an exception beyond its safe message goes back; the function's log has the rest.

Configuration: ``ENDPOINT_NAME`` (default ``mnist-classifier``); boto3's environment as usual (the function's
role and region on AWS). Permissions: ``iam-policy.json`` beside this file, InvokeEndpoint on that one endpoint and
the function's own log group, nothing else. Package this directory with ``mnist_client``.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os

from mnist_client import DEFAULT_ENDPOINT, JSON, MAX_PAYLOAD_BYTES, Client, PredictionError, image_type

log = logging.getLogger(__name__)

MAX_IMAGES = 1000  # per request: an answer well inside a Lambda's 6 MB response
# Fail fast when the endpoint is unreachable, wait as long as SageMaker allows an invocation (60 s) when it is not.
RUNTIME_CONFIG = {"connect_timeout": 2, "read_timeout": 65, "retries": {"total_max_attempts": 2, "mode": "standard"}}
_client: Client | None = None  # kept across invocations of a warm function


class BadRequest(ValueError):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def handler(event: dict, context=None) -> dict:
    try:
        body, content_type = _request(event)
        predictions = _endpoint().invoke(body, content_type)
    except BadRequest as error:
        return _answer(error.status, {"message": str(error)})
    except PredictionError as error:
        if error.status is not None and 400 <= error.status < 500:  # the model refused this input: say why
            return _answer(400, {"message": str(error)})
        log.error("the endpoint did not answer: %s", error)
        return _answer(502, {"message": "the MNIST endpoint could not answer; try again later"})
    except Exception:
        log.exception("classifying failed")
        return _answer(500, {"message": "internal error"})
    return _answer(
        200, {"predictions": [{"label": p.label, "confidence": round(p.confidence, 6)} for p in predictions]}
    )


def _endpoint() -> Client:
    global _client
    if _client is None:
        import boto3
        from botocore.config import Config

        runtime = boto3.client("sagemaker-runtime", config=Config(**RUNTIME_CONFIG))
        _client = Client(os.environ.get("ENDPOINT_NAME", DEFAULT_ENDPOINT), runtime)
    return _client


def _request(event: dict) -> tuple[bytes, str]:
    """The body to send and its content type, from an API Gateway proxy event; BadRequest naming what is wrong."""
    if not isinstance(event, dict):
        raise BadRequest("the event is not an API Gateway proxy event")
    method = event.get("httpMethod") or event.get("requestContext", {}).get("http", {}).get("method")
    if method != "POST":
        raise BadRequest(f"method {method or '(none)'} not allowed: POST an image or JSON", 405)
    headers = {str(name).lower(): str(value) for name, value in (event.get("headers") or {}).items()}
    content_type = headers.get("content-type", "").split(";")[0].strip().lower()
    raw = event.get("body")
    if not raw:
        raise BadRequest('empty body: POST {"instances": [...]} as application/json, or a PNG or JPEG picture')
    if event.get("isBase64Encoded"):
        try:
            body = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest("the body is marked base64-encoded but is not base64") from None
    else:
        body = raw.encode("utf-8", "surrogateescape") if isinstance(raw, str) else bytes(raw)
    if len(body) > MAX_PAYLOAD_BYTES:
        raise BadRequest(f"body of {len(body)} bytes: the endpoint takes at most {MAX_PAYLOAD_BYTES}", 413)
    if content_type in ("image/png", "image/jpeg"):
        if image_type(body) != content_type:
            raise BadRequest(f"the body is not a {content_type.split('/')[1].upper()} picture")
        return body, content_type
    if content_type != JSON:
        raise BadRequest(
            f"unsupported content type {content_type or '(none)'}: send application/json, image/png or image/jpeg", 415
        )
    try:
        document = json.loads(body)
    except (ValueError, RecursionError) as error:
        raise BadRequest(f"the body is not JSON: {type(error).__name__}") from None
    instances = document.get("instances") if isinstance(document, dict) else None
    if not isinstance(instances, list) or not instances:
        raise BadRequest('JSON body: expected {"instances": [image, ...]} with at least one image')
    if len(instances) > MAX_IMAGES:
        raise BadRequest(f"{len(instances)} images in one request: at most {MAX_IMAGES}", 413)
    return body, JSON  # as it came: the endpoint's handler reads the same document


def _answer(status: int, document: dict) -> dict:
    return {"statusCode": status, "headers": {"Content-Type": JSON}, "body": json.dumps(document)}
