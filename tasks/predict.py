"""`mnist-pipeline predict IMAGE... [--endpoint NAME]`: ask the endpoint which digit each picture shows.

The pictures (PNG or JPEG, any size) go as they are, one request each, through boto3's `sagemaker-runtime`
`invoke_endpoint`: the endpoint's handler converts them the way MNIST was made. With the local backend the client
is sent to the local SageMaker runtime (tasks.local_endpoints); with `sagemaker`, to AWS with your credentials.
"""

from __future__ import annotations

import json
from pathlib import Path

from tasks.config import PipelineConfig, load_config

DEFAULT_ENDPOINT = "mnist-classifier"  # the DAG's default endpoint_name
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
    import boto3

    if config.backend == "sagemaker":
        return boto3.client("sagemaker-runtime", region_name=config.region)
    from tasks.local_aws import LOCAL_CREDENTIALS
    from tasks.local_endpoints import EndpointNotFound, describe_endpoint, list_endpoints, runtime_url

    try:
        status = describe_endpoint(endpoint_name, config)["EndpointStatus"]
    except EndpointNotFound:
        known = ", ".join(list_endpoints(config)) or "none (run a sweep with deploy on: mnist-pipeline run)"
        raise PredictError(f"no local endpoint {endpoint_name!r}; local endpoints: {known}") from None
    if status != "InService":
        raise PredictError(f"local endpoint {endpoint_name!r} is {status}: `mnist-pipeline status` says more")
    return boto3.client(
        "sagemaker-runtime",
        endpoint_url=runtime_url(config),
        region_name=config.region,
        aws_access_key_id=LOCAL_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=LOCAL_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    )


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


def predict_command(args) -> int:
    from botocore.exceptions import BotoCoreError, ClientError
    from rich.console import Console
    from rich.table import Table

    console = Console(soft_wrap=True)
    try:
        results = predict([Path(image) for image in args.images], args.endpoint)
    except (PredictError, ClientError, BotoCoreError) as error:
        console.print(f"[red]error:[/] {error}")
        return 1
    if args.json:
        print(json.dumps(results))
        return 0
    table = Table("image", "digit", "confidence", title=f"endpoint {args.endpoint}")
    for result in results:
        table.add_row(result["image"], str(result["digit"]), f"{100 * result['confidence']:.1f}%")
    console.print(table)
    return 0
