"""Ask the MNIST endpoint which digits images show: ``predict(images) -> labels``.

    from mnist_client import predict
    labels = predict(images)                          # numpy array (N, 28, 28) or (28, 28), 0-255 white on black
    labels = predict(["seven.png", "two.jpg"])        # pictures of one digit each, any size
    labels = predict(images, endpoint_name="mnist-classifier", runtime=boto3.client("sagemaker-runtime"))

For labels with their confidence, ``Client(...).classify(images)``. Built on boto3's ``sagemaker-runtime``
``invoke_endpoint``: where it goes is boto3's business, as always (the region and credentials of the environment;
for the local stack, ``AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME`` or a client passed in). Arrays go as ``.npy`` in
requests of up to ``MAX_IMAGES_PER_REQUEST`` images (InvokeEndpoint takes 6 MB at most), pictures one per request,
nested lists as JSON. Nothing here needs the pipeline, Airflow or torch; numpy only for arrays.

A bad image raises ``ValueError`` naming it before anything is sent; what the endpoint refuses or cannot answer
raises ``PredictionError`` with its reason.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

DEFAULT_ENDPOINT = "mnist-classifier"
SIDE = 28
# 4,096 images of 784 bytes as .npy: 3.2 MB, well inside InvokeEndpoint's 6 MB.
MAX_IMAGES_PER_REQUEST = 4096
MAX_PAYLOAD_BYTES = 6 * 1024 * 1024
# What a picture starts with decides its content type, never its name.
MAGIC = {b"\x89PNG\r\n\x1a\n": "image/png", b"\xff\xd8\xff": "image/jpeg"}
JSON, NPY = "application/json", "application/x-npy"


class PredictionError(RuntimeError):
    """The endpoint refused a request or could not answer it; ``status`` is the HTTP status it gave, if any."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Prediction:
    label: int
    confidence: float  # the model's probability of that label


def image_type(body: bytes) -> str | None:
    """``image/png`` or ``image/jpeg`` by the bytes' signature, else None."""
    return next((media_type for magic, media_type in MAGIC.items() if body.startswith(magic)), None)


class Client:
    """One endpoint, through one ``sagemaker-runtime`` client (boto3's default one unless given)."""

    def __init__(self, endpoint_name: str = DEFAULT_ENDPOINT, runtime=None):
        if runtime is None:
            import boto3

            runtime = boto3.client("sagemaker-runtime")
        self.endpoint_name, self.runtime = endpoint_name, runtime

    def invoke(self, body: bytes, content_type: str) -> list[Prediction]:
        """One InvokeEndpoint request as it is (JSON, .npy, CSV, PNG or JPEG); its predictions in order."""
        from botocore.exceptions import BotoCoreError, ClientError

        if len(body) > MAX_PAYLOAD_BYTES:
            raise ValueError(f"a request of {len(body)} bytes is over InvokeEndpoint's {MAX_PAYLOAD_BYTES}")
        try:
            reply = self.runtime.invoke_endpoint(
                EndpointName=self.endpoint_name, Body=body, ContentType=content_type, Accept=JSON
            )
        except ClientError as error:
            raise _prediction_error(error, self.endpoint_name) from None
        except BotoCoreError as error:  # not reached: no connection, a timeout
            raise PredictionError(f"endpoint {self.endpoint_name} could not be reached: {error}") from None
        try:
            answers = json.loads(reply["Body"].read())["predictions"]
            return [Prediction(int(a["label"]), float(a["probabilities"][int(a["label"])])) for a in answers]
        except (ValueError, KeyError, TypeError, IndexError) as error:
            raise PredictionError(f"endpoint {self.endpoint_name} answered something unexpected: {error!r}") from None

    def classify(self, images) -> list[Prediction]:
        """The label and confidence of each image, in order (see the module's docstring for what images may be)."""
        predictions = []
        for body, content_type in _requests(images):
            predictions += self.invoke(body, content_type)
        return predictions

    def predict(self, images) -> list[int]:
        return [prediction.label for prediction in self.classify(images)]


def predict(images, endpoint_name: str = DEFAULT_ENDPOINT, runtime=None) -> list[int]:
    """The digit each image shows, in order."""
    return Client(endpoint_name, runtime).predict(images)


# --- requests --------------------------------------------------------------------------------------------------


def _requests(images) -> Iterable[tuple[bytes, str]]:
    """(body, content type) of each request for ``images``; every image is checked before any is yielded."""
    if hasattr(images, "__array__"):  # a numpy array (or anything that converts to one)
        return _array_requests(images)
    if isinstance(images, str | bytes | os.PathLike):
        images = [images]
    if not isinstance(images, Sequence) or not images:
        raise ValueError("images: give a numpy array, a list of pictures (paths or bytes) or of 28x28 pixel lists")
    if all(isinstance(image, str | bytes | os.PathLike) for image in images):
        return list(map(read_picture, images))
    if all(isinstance(image, list | tuple) for image in images):
        return _array_requests(images)
    raise ValueError("images: mix of pictures and pixel arrays; send one kind per call")


def read_picture(image: str | bytes | os.PathLike) -> tuple[bytes, str]:
    """A picture's bytes (a path's, or the bytes given) and its content type; ValueError naming what is wrong."""
    if isinstance(image, bytes):
        body, name = image, "a picture given as bytes"
    else:
        name = str(image)
        try:
            body = Path(image).read_bytes()
        except OSError as error:
            raise ValueError(f"cannot read {name}: {error.strerror}") from None
    kind = image_type(body)
    if kind is None:
        raise ValueError(f"{name} is not a PNG or JPEG picture")
    return body, kind


def _array_requests(images) -> list[tuple[bytes, str]]:
    import numpy as np

    array = np.asarray(images)
    if array.shape in ((SIDE, SIDE), (SIDE * SIDE,)):
        array = array[np.newaxis]
    if array.ndim == 2 and array.shape[1] == SIDE * SIDE:
        array = array.reshape(-1, SIDE, SIDE)
    if array.ndim != 3 or array.shape[1:] != (SIDE, SIDE) or len(array) == 0:
        raise ValueError(f"images: expected (N, 28, 28), (28, 28) or (N, 784) pixels, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise ValueError(f"images: pixels must be numbers 0-255, got dtype {array.dtype}")
    if not np.isfinite(array).all() or array.min() < 0 or array.max() > 255:
        raise ValueError("images: pixels must be finite numbers 0-255 (white ink on black, as MNIST)")
    requests = []
    for start in range(0, len(array), MAX_IMAGES_PER_REQUEST):
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(array[start : start + MAX_IMAGES_PER_REQUEST]).astype(np.uint8))
        requests.append((buffer.getvalue(), NPY))
    return requests


def _prediction_error(error, endpoint_name: str) -> PredictionError:
    response = error.response
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    message = response.get("Error", {}).get("Message") or str(error)
    original = response.get("OriginalStatusCode")
    if original:  # a ModelError: the model's own handler refused the request
        reason = response.get("OriginalMessage") or message
        return PredictionError(f"endpoint {endpoint_name} refused the request: {reason}", int(original))
    return PredictionError(f"endpoint {endpoint_name}: {message}", status)
