"""The users' client module (`mnist_client.predict`) and the Lambda handler, against a real endpoint on the local
SageMaker service: boto3's sagemaker-runtime through the service's runtime, the model's own handler behind it."""

from __future__ import annotations

import base64
import io
import json

import boto3
import numpy as np
import pytest

from mnist_client import Client, PredictionError, predict
from tests.helpers.endpoints import serve_trained_model
from training.mnist_idx import load_mnist

BUCKET = "client-and-lambda"
ENDPOINT = "client-digits"
POLICY = "mnist_lambda/iam-policy.json"


@pytest.fixture(scope="module")
def endpoint(local_sagemaker, local_sagemaker_runtime, local_aws, small_mnist, tmp_path_factory) -> dict:
    sagemaker, built = serve_trained_model(
        local_sagemaker, local_aws, small_mnist, tmp_path_factory, BUCKET, "good/model.tar.gz", ENDPOINT
    )
    sagemaker.get_waiter("endpoint_in_service").wait(EndpointName=ENDPOINT, WaiterConfig={"Delay": 1})
    data = load_mnist(small_mnist)
    yield {
        "runtime": boto3.client("sagemaker-runtime", endpoint_url=local_sagemaker_runtime),
        "images": data["test_images"],
        "labels": data["test_labels"],
        "accuracy": built["test_accuracy"],
        "url": local_sagemaker_runtime,
    }
    sagemaker.delete_endpoint(EndpointName=ENDPOINT)


def png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_predict_takes_arrays_lists_and_pictures(endpoint, tmp_path):
    images, labels, runtime = endpoint["images"], endpoint["labels"], endpoint["runtime"]
    predicted = predict(images, ENDPOINT, runtime=runtime)
    assert len(predicted) == len(images) and all(isinstance(label, int) for label in predicted)
    assert np.mean(np.array(predicted) == labels) == pytest.approx(endpoint["accuracy"])
    assert predict(images[0], ENDPOINT, runtime=runtime) == predicted[:1]  # one (28, 28) image
    assert predict(images[:3].reshape(3, 784), ENDPOINT, runtime=runtime) == predicted[:3]
    assert predict(images[:2].tolist(), ENDPOINT, runtime=runtime) == predicted[:2]
    picture = tmp_path / "digit.png"
    picture.write_bytes(png(images[0]))
    [classified] = Client(ENDPOINT, runtime).classify([picture])
    assert 0 <= classified.label <= 9 and 0 < classified.confidence <= 1


def test_many_images_go_in_requests_under_the_limit(endpoint, monkeypatch):
    import mnist_client

    monkeypatch.setattr(mnist_client, "MAX_IMAGES_PER_REQUEST", 32)  # 100 images: four requests
    sent = []
    runtime = endpoint["runtime"]
    runtime.meta.events.register("before-call.sagemaker-runtime.InvokeEndpoint", lambda **kw: sent.append(kw))
    try:
        predicted = predict(endpoint["images"], ENDPOINT, runtime=runtime)
    finally:
        runtime.meta.events.unregister("before-call.sagemaker-runtime.InvokeEndpoint")
    assert len(sent) == 4 and len(predicted) == len(endpoint["images"])


def test_bad_images_are_refused_naming_what_is_wrong(endpoint, tmp_path):
    runtime = endpoint["runtime"]
    for images, message in (
        (np.zeros((2, 27, 27)), r"expected \(N, 28, 28\), \(28, 28\) or \(N, 784\) pixels, got shape \(2, 27, 27\)"),
        (np.full((1, 28, 28), 300), "pixels must be finite numbers 0-255"),
        (np.full((1, 28, 28), np.nan), "pixels must be finite numbers 0-255"),
        ([], "give a numpy array, a list of pictures"),
        ([tmp_path / "missing.png"], r"cannot read .*missing\.png"),
        ([b"GIF89a..."], "a picture given as bytes is not a PNG or JPEG picture"),
    ):
        with pytest.raises(ValueError, match=message):
            predict(images, ENDPOINT, runtime=runtime)
    with pytest.raises(PredictionError, match="endpoint absent: Endpoint absent of account"):
        predict(endpoint["images"][:1], "absent", runtime=runtime)


# --- the Lambda handler ---------------------------------------------------------------------------------------


@pytest.fixture
def handler(endpoint, monkeypatch):
    """The handler as Lambda runs it: boto3's default client, pointed at the local runtime by its environment."""
    from mnist_lambda import handler as module

    monkeypatch.setenv("ENDPOINT_NAME", ENDPOINT)
    monkeypatch.setenv("AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME", endpoint["url"])
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setattr(module, "_client", None)
    return module.handler


def rest_event(
    body: str | None, content_type: str = "application/json", base64_encoded: bool = False, method: str = "POST"
) -> dict:
    """An API Gateway REST API (payload 1.0) proxy event."""
    return {
        "resource": "/classify",
        "path": "/classify",
        "httpMethod": method,
        "headers": {"Content-Type": content_type},
        "body": body,
        "isBase64Encoded": base64_encoded,
        "requestContext": {"stage": "prod", "httpMethod": method},
    }


def test_the_lambda_classifies_json_and_pictures(handler, endpoint):
    images = endpoint["images"]
    answer = handler(rest_event(json.dumps({"instances": images[:20].tolist()})))
    assert answer["statusCode"] == 200 and answer["headers"]["Content-Type"] == "application/json"
    predictions = json.loads(answer["body"])["predictions"]
    assert [p["label"] for p in predictions] == predict(images[:20], ENDPOINT, runtime=endpoint["runtime"])
    assert all(0 < p["confidence"] <= 1 for p in predictions)

    picture = base64.b64encode(png(images[0])).decode()
    http_api = {
        "version": "2.0",
        "routeKey": "POST /classify",
        "headers": {"content-type": "image/png"},
        "body": picture,
        "isBase64Encoded": True,
        "requestContext": {"http": {"method": "POST", "path": "/classify"}},
    }
    answer = handler(http_api)
    assert answer["statusCode"] == 200 and len(json.loads(answer["body"])["predictions"]) == 1


def test_bad_events_get_a_4xx_that_says_what_is_wrong(handler, endpoint):
    deep = "[" * 100_000 + "]" * 100_000
    for event, status, message in (
        (rest_event('{"instances": []}', method="GET"), 405, "method GET not allowed"),
        (rest_event(None), 400, "empty body"),
        (rest_event("not json"), 400, "the body is not JSON"),
        (rest_event(deep), 400, "the body is not JSON"),
        (rest_event('{"images": []}'), 400, 'expected {"instances": [image, ...]}'),
        (rest_event(json.dumps({"instances": [[0] * 784] * 1001})), 413, "1001 images in one request: at most 1000"),
        (rest_event("<x/>", content_type="text/xml"), 415, "unsupported content type text/xml"),
        (rest_event("!!", content_type="image/png", base64_encoded=True), 400, "not base64"),
        (rest_event(base64.b64encode(b"GIF89a").decode(), "image/png", True), 400, "the body is not a PNG picture"),
        # The model's own handler refuses a wrong shape: its reason comes back, as a 400.
        (rest_event(json.dumps({"instances": [[1, 2, 3]]})), 400, "each image must be 28x28 or 784 pixel values"),
        ("not an event", 400, "not an API Gateway proxy event"),
    ):
        answer = handler(event)
        assert answer["statusCode"] == status, (event if isinstance(event, str) else event.get("body", "")[:50], answer)
        assert message in json.loads(answer["body"])["message"]


def test_an_unreachable_endpoint_is_a_502_without_details(handler, monkeypatch):
    from mnist_lambda import handler as module

    monkeypatch.setenv("AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setattr(module, "_client", None)
    answer = handler(rest_event(json.dumps({"instances": [[0] * 784]})))
    assert answer["statusCode"] == 502
    assert json.loads(answer["body"]) == {"message": "the MNIST endpoint could not answer; try again later"}


def test_the_lambdas_policy_grants_only_what_it_calls():
    from tests.conftest import ROOT

    policy = json.loads((ROOT / POLICY).read_text())
    granted = {}
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow" and "NotAction" not in statement and "NotResource" not in statement
        actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        for action in actions:
            granted[action] = statement["Resource"]
    assert granted == {
        "sagemaker:InvokeEndpoint": "arn:aws:sagemaker:${Region}:${AccountId}:endpoint/mnist-classifier",
        "logs:CreateLogGroup": "arn:aws:logs:${Region}:${AccountId}:log-group:/aws/lambda/mnist-classify",
        "logs:CreateLogStream": "arn:aws:logs:${Region}:${AccountId}:log-group:/aws/lambda/mnist-classify:log-stream:*",
        "logs:PutLogEvents": "arn:aws:logs:${Region}:${AccountId}:log-group:/aws/lambda/mnist-classify:log-stream:*",
    }
