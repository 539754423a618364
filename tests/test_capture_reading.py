"""Reading an endpoint's data capture (tasks/capture.py) against the local S3: each object exactly once across
checks, late objects included; damaged lines counted and left out; the position moved only by the check that read
it. The capture objects are written here in SageMaker's format, as the local service's runtime writes them (its
own tests check that it does: tests/test_service_capture.py)."""

from __future__ import annotations

import base64
import io
import json
import uuid

import boto3
import numpy as np
import pytest

from tasks import capture
from tasks.config import load_config
from tasks.hooks import s3_hook

ENDPOINT = "reading-test"


@pytest.fixture
def config(local_aws):
    config = load_config(bucket=f"capture-{uuid.uuid4().hex[:12]}", prefix="mnist-sweep")
    boto3.client("s3", endpoint_url=local_aws).create_bucket(Bucket=config.bucket)
    return config


@pytest.fixture(scope="module")
def handler():
    from tasks.drift import decoding_handler

    return decoding_handler()


def record(image: np.ndarray, label: int, kind: str = "json", moment: str = "2026-12-07T10:00:00Z") -> dict:
    """One captured invocation of ``image`` answered ``label``, as SageMaker's data capture writes it."""
    if kind == "json":
        sent = {
            "observedContentType": "application/json",
            "mode": "INPUT",
            "encoding": "JSON",
            "data": json.dumps({"instances": [image.tolist()]}),
        }
    else:
        buffer = io.BytesIO()
        np.save(buffer, image[np.newaxis])
        sent = {
            "observedContentType": "application/x-npy",
            "mode": "INPUT",
            "encoding": "BASE64",
            "data": base64.b64encode(buffer.getvalue()).decode(),
        }
    probabilities = [0.01] * 10
    probabilities[label] = 0.91
    answer = json.dumps({"predictions": [{"label": label, "probabilities": probabilities}]})
    return {
        "captureData": {
            "endpointInput": sent,
            "endpointOutput": {
                "observedContentType": "application/json",
                "mode": "OUTPUT",
                "data": answer,
                "encoding": "JSON",
            },
        },
        "eventMetadata": {"eventId": str(uuid.uuid4()), "inferenceTime": moment},
        "eventVersion": "0",
    }


def put(config, hour: str, name: str, lines: list, variant: str = "AllTraffic") -> str:
    key = f"{capture.endpoint_prefix(config, ENDPOINT)}{variant}/{hour}/{name}.jsonl"
    body = b"".join((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n" for line in lines)
    s3_hook(config).conn.put_object(Bucket=config.bucket, Key=key, Body=body)
    return key


def digits(count: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    images = np.zeros((count, 28, 28), np.uint8)
    for image in images:
        top, left = rng.integers(4, 14, size=2)
        image[top : top + 10, left : left + 3] = 255  # a stroke: any image the handler accepts will do here
    return images


def read(config, handler, max_requests: int = 1000) -> tuple[capture.Window, dict]:
    """One check's read: its window, and the position it leaves (written, as a check does at its end)."""
    position, etag = capture.read_position(config, ENDPOINT)
    window = capture.read_window(config, capture.new_objects(config, ENDPOINT, position), handler, max_requests)
    moved = capture.advanced(position, window.objects, capture.endpoint_prefix(config, ENDPOINT))
    capture.write_position(config, ENDPOINT, moved, etag)
    return window, moved


def test_each_object_is_read_once_across_checks_and_a_late_one_still_is(config, handler):
    images = digits(6)
    first = put(config, "2026/12/07/10", "05-00-000-a", [record(images[0], 1), record(images[1], 2, "npy")])
    second = put(config, "2026/12/07/11", "01-00-000-b", [record(images[2], 3)])
    window, position = read(config, handler)
    assert window.objects == [first, second] and window.requests == 2 + 1
    # What the model saw: the handler's decoding of each body, JSON and .npy alike; the answers' probabilities.
    np.testing.assert_array_equal(window.images, images[:3].astype(np.float32))
    assert window.probabilities.argmax(axis=1).tolist() == [1, 2, 3]
    assert position["variants"]["AllTraffic"]["after"] == second

    assert read(config, handler)[0].objects == []  # nothing new: nothing read again
    # A file named in the hour before the newest one read lands only now (its writer was slow): it is read, once;
    # so is a new one.
    late = put(config, "2026/12/07/10", "59-59-999-c", [record(images[3], 4)])
    new = put(config, "2026/12/07/11", "30-00-000-d", [record(images[4], 5)])
    window, _ = read(config, handler)
    assert window.objects == [late, new] and window.requests == 2
    assert read(config, handler)[0].objects == []


def test_a_window_stops_at_max_requests_on_a_whole_object_and_the_next_check_goes_on(config, handler):
    images = digits(5)
    keys = [put(config, "2026/12/07/10", f"0{i}-00-000-x", [record(images[i], i)] * 2) for i in range(5)]
    window, _ = read(config, handler, max_requests=3)
    assert window.objects == keys[:2] and window.requests == 4  # the object that passes the limit is read whole
    assert read(config, handler, max_requests=100)[0].objects == keys[2:]


def test_damaged_lines_are_counted_and_left_out_never_fatal(config, handler):
    image = digits(1)[0]
    wrong_input = record(image, 1)
    wrong_input["captureData"]["endpointInput"]["data"] = '{"instances": [[1, 2, 3]]}'
    mismatched = record(image, 1)
    mismatched["captureData"]["endpointOutput"]["data"] = '{"predictions": []}'
    not_probabilities = record(image, 1)
    not_probabilities["captureData"]["endpointOutput"]["data"] = json.dumps(
        {"predictions": [{"label": 1, "probabilities": [2.0] + [0.0] * 9}]}
    )
    bad_base64 = record(image, 1, "npy")
    bad_base64["captureData"]["endpointInput"]["data"] = "%%%"
    put(
        config,
        "2026/12/07/10",
        "00-00-000-y",
        [b"not json", {"captureData": {}}, wrong_input, mismatched, not_probabilities, bad_base64, record(image, 7)],
    )
    window, _ = read(config, handler)
    assert window.requests == 1 and window.probabilities.argmax(axis=1).tolist() == [7]
    assert window.skipped == {
        "not a capture record": 2,
        "input not decodable": 2,
        "output does not match its input": 1,
        "output not probabilities summing to 1": 1,
    }


def test_the_position_moves_only_from_where_its_check_read_it(config, handler):
    put(config, "2026/12/07/10", "00-00-000-z", [record(digits(1)[0], 1)])
    position, etag = capture.read_position(config, ENDPOINT)
    assert etag is None and position == {"variants": {}}
    read(config, handler)  # another check reads and moves it meanwhile
    moved = capture.advanced(position, [], capture.endpoint_prefix(config, ENDPOINT))
    with pytest.raises(capture.PositionMoved, match=r"was moved by another check since this one read it"):
        capture.write_position(config, ENDPOINT, moved, etag)
    _, stale = capture.read_position(config, ENDPOINT)
    put(config, "2026/12/07/11", "00-00-000-z", [record(digits(1)[0], 2)])
    read(config, handler)
    with pytest.raises(capture.PositionMoved):
        capture.write_position(config, ENDPOINT, moved, stale)


def test_a_damaged_position_is_an_error_naming_it(config):
    key = capture.position_key(config, ENDPOINT)
    s3_hook(config).conn.put_object(Bucket=config.bucket, Key=key, Body=b"[1, 2]")
    with pytest.raises(ValueError, match=rf"s3://{config.bucket}/{key} is not a drift position"):
        capture.read_position(config, ENDPOINT)


def test_a_check_holds_the_window_to_the_configured_reference(config, small_mnist, small_reference):
    """The digits a model was trained on are no drift against their own reference (the configuration's
    mnist_reference), and are against the official MNIST's, which they do not resemble."""
    import dataclasses

    from tasks.drift import check
    from training.mnist_idx import load_mnist

    data = load_mnist(small_mnist)
    images, labels = data["train_images"], data["train_labels"]
    put(
        config,
        "2026/12/07/10",
        "00-00-000-r",
        [record(image, int(label)) for image, label in zip(images, labels, strict=True)],
    )
    configured = dataclasses.replace(config, mnist_reference=str(small_reference))
    result = check(configured, ENDPOINT, "manual__configured-reference", min_requests=500, max_requests=10_000)
    assert result["verdict"] == "no drift" and result["requests"] == len(images), result
    assert result["figures"]["mean_image_corr"] > 0.99 and result["figures"]["centre_shift"] < 0.05
    capture.write_position(config, ENDPOINT, {"variants": {}}, capture.read_position(config, ENDPOINT)[1])
    official = check(config, ENDPOINT, "manual__official-reference", min_requests=500, max_requests=10_000)
    assert official["verdict"] == "drift" and official["requests"] == len(images), official
