"""Sending digits to an endpoint that captures its data, and waiting until the capture in S3 holds them."""

from __future__ import annotations

import json

import numpy as np

from tests.helpers.polling import wait_until


def captured(s3, config, endpoint: str) -> int:
    """Invocations of ``endpoint`` captured so far (lines of every capture object under its prefix)."""
    from tasks.capture import endpoint_prefix

    listing = s3.list_objects_v2(Bucket=config.bucket, Prefix=endpoint_prefix(config, endpoint))
    return sum(
        s3.get_object(Bucket=config.bucket, Key=item["Key"])["Body"].read().count(b"\n")
        for item in listing.get("Contents", [])
    )


def invoke_all(runtime, s3, config, endpoint: str, images: np.ndarray) -> None:
    """One request per digit to ``endpoint``, as JSON pixels (the endpoint's most common content type), then wait
    until the capture holds them all: the runtime writes it in batches, off the request path."""
    before = captured(s3, config, endpoint)
    for image in images:
        body = json.dumps({"instances": [image.tolist()]})
        runtime.invoke_endpoint(EndpointName=endpoint, ContentType="application/json", Body=body)
    wait_until(
        lambda: captured(s3, config, endpoint) >= before + len(images),
        timeout=60,
        interval=0.5,
        failure=f"the capture of {len(images)} invocations never reached S3",
    )
