"""`mnist-pipeline predict IMAGE... [--endpoint NAME]`: ask the endpoint which digit each picture shows.

The pictures (PNG or JPEG, any size) go as they are, one request each, through the users' client module
(`mnist_client`, boto3's `sagemaker-runtime`) with the AWS connection's runtime client, wherever it points: the
endpoint's handler converts them the way MNIST was made.
"""

from __future__ import annotations

from pathlib import Path

from mnist_client import Client, PredictionError, read_picture
from tasks.config import PipelineConfig, load_config
from tasks.hooks import sagemaker_hook
from tasks.names import DEFAULT_ENDPOINT


class PredictError(RuntimeError):
    pass


def endpoint_runtime_client(config: PipelineConfig, endpoint_name: str):
    """The `sagemaker-runtime` client that reaches ``endpoint_name``; fails early, naming the endpoints there are."""
    from botocore.exceptions import ClientError

    from tasks.hooks import hook

    sagemaker = sagemaker_hook(config)
    try:
        status = sagemaker.describe_endpoint(endpoint_name)["EndpointStatus"]
    except ClientError as error:
        if "Could not find" not in str(error):
            raise
        names = [endpoint["EndpointName"] for endpoint in sagemaker.conn.list_endpoints()["Endpoints"]]
        known = ", ".join(names) or "none (run a sweep with deploy on: mnist-pipeline run)"
        raise PredictError(f"no endpoint {endpoint_name!r}; endpoints: {known}") from None
    if status != "InService":
        raise PredictError(f"endpoint {endpoint_name!r} is {status}")
    return hook(config, "sagemaker-runtime").conn


def predict(paths: list[Path], endpoint_name: str = DEFAULT_ENDPOINT, config: PipelineConfig | None = None) -> list:
    """``[{"image", "digit", "confidence"}]`` for each picture, in order. Every file is read and checked first."""
    config = config or load_config()
    try:
        pictures = [read_picture(path) for path in paths]  # every file read and checked before anything is sent
    except ValueError as error:
        raise PredictError(str(error)) from None
    client = Client(endpoint_name, endpoint_runtime_client(config, endpoint_name))
    try:
        predictions = [prediction for body, kind in pictures for prediction in client.invoke(body, kind)]
    except PredictionError as error:
        raise PredictError(str(error)) from None
    return [
        {"image": str(path), "digit": p.label, "confidence": p.confidence}
        for path, p in zip(paths, predictions, strict=True)
    ]
