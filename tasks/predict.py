"""`mnist-pipeline predict IMAGE... [--endpoint NAME]`: ask the endpoint which digit each picture shows.

The pictures (PNG or JPEG, any size) go as they are, one request each, through boto3's `sagemaker-runtime`
`invoke_endpoint`, wherever the AWS connection points: the endpoint's handler converts them the way MNIST was made.
"""

from __future__ import annotations

import json
from pathlib import Path

from tasks.config import PipelineConfig, load_config
from tasks.names import DEFAULT_ENDPOINT

# What the file starts with, not its name, decides the content type.
MAGIC = {b"\x89PNG\r\n\x1a\n": "image/png", b"\xff\xd8\xff": "image/jpeg"}


class PredictError(RuntimeError):
    pass


def content_type(path: Path, body: bytes) -> str:
    for magic, media_type in MAGIC.items():
        if body.startswith(magic):
            return media_type
    raise PredictError(f"{path} is not a PNG or JPEG image")


def runtime_client(config: PipelineConfig, endpoint_name: str):
    """The `sagemaker-runtime` client that reaches ``endpoint_name``; fails early, naming the endpoints there are."""
    from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook
    from airflow.providers.amazon.aws.hooks.sagemaker import SageMakerHook
    from botocore.exceptions import ClientError

    sagemaker = SageMakerHook(aws_conn_id=config.aws_conn_id, region_name=config.region)
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
    return AwsBaseHook(aws_conn_id=config.aws_conn_id, client_type="sagemaker-runtime", region_name=config.region).conn


def predict(paths: list[Path], endpoint_name: str = DEFAULT_ENDPOINT, config: PipelineConfig | None = None) -> list:
    """``[{"image", "digit", "confidence"}]`` for each picture, in order. Every file is read and checked first."""
    config = config or load_config()
    bodies = []
    for path in paths:
        try:
            body = path.read_bytes()
        except OSError as error:
            raise PredictError(f"cannot read {path}: {error.strerror}") from None
        bodies.append((path, body, content_type(path, body)))
    client = runtime_client(config, endpoint_name)
    results = []
    for path, body, media_type in bodies:
        reply = client.invoke_endpoint(
            EndpointName=endpoint_name, Body=body, ContentType=media_type, Accept="application/json"
        )
        prediction = json.loads(reply["Body"].read())["predictions"][0]
        digit = int(prediction["label"])
        results.append({"image": str(path), "digit": digit, "confidence": float(prediction["probabilities"][digit])})
    return results
