"""An endpoint's data capture, read incrementally: what its invocations sent and got back since the last check.

SageMaker writes one JSON line per captured invocation into objects keyed
``<destination>/<endpoint>/<variant>/yyyy/mm/dd/hh/<file>.jsonl`` (the hour in UTC, files named after the moment
they were written, so that keys sort in the order they were made). The drift check reads each object exactly once
across its runs, their retries and restarts of anything: where it stopped is kept in S3 next to its reports
(``<s3_root>/drift/<endpoint>/position.json``), and moved on only once a run's check has ended
(``advance``, a conditional write: two checks of one endpoint cannot both move it).

A position per variant is the newest key read, and the keys read from the hour before its hour on. The next read
lists from that hour on and leaves out what it read already, so an object that lands late, up to an hour after the
time its name says, is still read, once. SageMaker writes an object within minutes of its records, the local
service within seconds.

Inputs are decoded by the handler that the endpoint's model ships (inference/inference.py's ``input_fn``), so the
check sees what the model saw; outputs are the handler's JSON answers (``{"predictions": [{"label",
"probabilities"}]}``). A line that cannot be read or decoded is counted and left out, never fatal: capture is
written by another program, and one damaged object must not blind the check to everything else.
"""

from __future__ import annotations

import base64
import datetime
import json
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from data_checks.drift import PROBABILITY_SUM_TOLERANCE
from tasks.config import PipelineConfig
from tasks.deployment import CAPTURE_PREFIX
from tasks.hooks import s3_hook

log = logging.getLogger(__name__)

DRIFT_PREFIX = "drift"
POSITION_FILE = "position.json"
# How late an object may land after the hour its name says and still be read (see the module's docstring).
LATE_HOURS = 1
_HOUR = re.compile(r"(\d{4})/(\d\d)/(\d\d)/(\d\d)/[^/]+\.jsonl$")


class PositionMoved(RuntimeError):
    """Another check moved the position since this one read it; the message names the object."""


@dataclass
class Window:
    """What a check reads: the captured images and the model's probabilities for them, and what was left out."""

    images: np.ndarray  # (N, 28, 28) float32 pixels 0-255, as the handler decoded them
    probabilities: np.ndarray  # (N, 10)
    requests: int = 0  # invocations read (a request may hold several images)
    objects: list[str] = field(default_factory=list)  # keys read, in order
    skipped: dict[str, int] = field(default_factory=dict)  # lines left out, by reason
    first: str | None = None  # inferenceTime of the earliest and latest invocation read
    last: str | None = None


def endpoint_prefix(config: PipelineConfig, endpoint: str) -> str:
    """The key prefix of ``endpoint``'s capture (DataCaptureConfig's DestinationS3Uri is <s3_root>/capture)."""
    return f"{config.prefix.strip('/')}/{CAPTURE_PREFIX}/{endpoint}/"


def position_key(config: PipelineConfig, endpoint: str) -> str:
    return f"{config.prefix.strip('/')}/{DRIFT_PREFIX}/{endpoint}/{POSITION_FILE}"


def read_position(config: PipelineConfig, endpoint: str) -> tuple[dict, str | None]:
    """The endpoint's position (``{"variants": {name: {"after": key, "read": [keys]}}}``, empty before the first
    check) and its ETag (None before the first check)."""
    from botocore.exceptions import ClientError

    client = s3_hook(config).conn
    try:
        answer = client.get_object(Bucket=config.bucket, Key=position_key(config, endpoint))
    except ClientError as error:
        if error.response["Error"]["Code"] in ("NoSuchKey", "404"):
            return {"variants": {}}, None
        raise
    body = answer["Body"].read()
    try:
        position = json.loads(body)
        if not isinstance(position.get("variants"), dict):
            raise ValueError("no variants object")
    except (ValueError, AttributeError) as error:
        raise ValueError(
            f"s3://{config.bucket}/{position_key(config, endpoint)} is not a drift position: {error}; "
            "remove it to read the capture from its beginning"
        ) from None
    return position, answer["ETag"]


def _hour(key: str) -> datetime.datetime | None:
    found = _HOUR.search(key)
    if found is None:
        return None
    year, month, day, hour = (int(part) for part in found.groups())
    return datetime.datetime(year, month, day, hour, tzinfo=datetime.UTC)


def _hour_path(moment: datetime.datetime) -> str:
    return moment.strftime("%Y/%m/%d/%H")


def new_objects(config: PipelineConfig, endpoint: str, position: Mapping) -> list[str]:
    """The capture objects of ``endpoint`` that the checks before have not read, oldest first."""
    client = s3_hook(config).conn
    prefix = endpoint_prefix(config, endpoint)
    paginator = client.get_paginator("list_objects_v2")
    variants = [
        common["Prefix"]
        for page in paginator.paginate(Bucket=config.bucket, Prefix=prefix, Delimiter="/")
        for common in page.get("CommonPrefixes", [])
    ]
    found = []
    for variant_prefix in sorted(variants):
        variant = variant_prefix[len(prefix) :].rstrip("/")
        kept = position["variants"].get(variant) or {}
        read = set(kept.get("read", ()))
        start = {}
        if kept.get("after") and (newest := _hour(kept["after"])) is not None:
            # From the hour before the newest key read: StartAfter the hour's path sorts before all of its keys.
            start = {"StartAfter": variant_prefix + _hour_path(newest - datetime.timedelta(hours=LATE_HOURS))}
        for page in paginator.paginate(Bucket=config.bucket, Prefix=variant_prefix, **start):
            for item in page.get("Contents", []):
                key = item["Key"]
                if key not in read and _hour(key) is not None:
                    found.append(key)
    return found


def advanced(position: Mapping, objects: Iterable[str], prefix: str) -> dict:
    """The position once ``objects`` are read too: per variant its newest key, and the keys read since the hour
    before that key's hour (the ones a later listing sees again)."""
    variants = {
        name: {"after": kept.get("after"), "read": list(kept.get("read", ()))}
        for name, kept in position["variants"].items()
    }
    for key in objects:
        variant = key[len(prefix) :].split("/", 1)[0]
        kept = variants.setdefault(variant, {"after": None, "read": []})
        kept["read"].append(key)
        if kept["after"] is None or _order(key) > _order(kept["after"]):
            kept["after"] = key
    for kept in variants.values():
        oldest = _hour(kept["after"]) - datetime.timedelta(hours=LATE_HOURS)
        kept["read"] = sorted({key for key in kept["read"] if _hour(key) >= oldest})
    return {"variants": variants}


def _order(key: str) -> tuple:
    return _hour(key), key


def write_position(config: PipelineConfig, endpoint: str, position: Mapping, etag: str | None) -> None:
    """Store ``position`` where it was read with ``etag`` (None: where there was none): PositionMoved if another
    check has written it since."""
    from botocore.exceptions import ClientError

    from tasks.s3 import checksums

    body = json.dumps(position, sort_keys=True).encode()
    condition = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
    key = position_key(config, endpoint)
    try:
        s3_hook(config).conn.put_object(
            Bucket=config.bucket, Key=key, Body=body, ContentType="application/json", **condition, **checksums(body)
        )
    except ClientError as error:
        if error.response["ResponseMetadata"]["HTTPStatusCode"] in (409, 412):
            raise PositionMoved(
                f"s3://{config.bucket}/{key} was moved by another check since this one read it: its "
                "window may have been read twice; run the check again"
            ) from None
        raise


def read_window(config: PipelineConfig, objects: list[str], handler, max_requests: int) -> Window:
    """Read ``objects`` in order, each whole, until ``max_requests`` invocations are read: the window and the
    objects it took (the rest are the next check's). ``handler``: the model's inference module."""
    client = s3_hook(config).conn
    images, probabilities, window = [], [], Window(np.zeros((0, 28, 28), np.float32), np.zeros((0, 10)))
    for key in objects:
        if window.requests >= max_requests:
            break
        body = client.get_object(Bucket=config.bucket, Key=key)["Body"].read()
        window.objects.append(key)
        for line in body.splitlines():
            if not line.strip():
                continue
            decoded = _decode(line, handler, window.skipped)
            if decoded is None:
                continue
            pixels, answers, moment = decoded
            images.append(pixels)
            probabilities.append(answers)
            window.requests += 1
            window.first = min(window.first or moment, moment)
            window.last = max(window.last or moment, moment)
    if images:
        window.images = np.concatenate(images)
        window.probabilities = np.concatenate(probabilities)
    return window


def _skip(skipped: dict, reason: str) -> None:
    skipped[reason] = skipped.get(reason, 0) + 1


def _decode(line: bytes, handler, skipped: dict) -> tuple[np.ndarray, np.ndarray, str] | None:
    """One captured invocation as (images (n, 28, 28), probabilities (n, 10), its inferenceTime), or None, its
    reason counted in ``skipped``."""
    try:
        record = json.loads(line)
        captured = record["captureData"]
        sent, answered = captured["endpointInput"], captured["endpointOutput"]
        moment = str(record["eventMetadata"]["inferenceTime"])
    except (ValueError, KeyError, TypeError):
        _skip(skipped, "not a capture record")
        return None
    try:
        request = _body(sent)
        tensor = handler.input_fn(request, sent.get("observedContentType") or "")
        pixels = tensor.numpy().reshape(-1, 28, 28)
    except Exception:  # the handler's InvalidRequest, or a body damaged in capture
        _skip(skipped, "input not decodable")
        return None
    try:
        predictions = json.loads(_body(answered))["predictions"]
        answers = np.array([prediction["probabilities"] for prediction in predictions], dtype=np.float64)
    except (ValueError, KeyError, TypeError):
        _skip(skipped, "output not the model's JSON answer")
        return None
    if answers.shape != (len(pixels), 10) or not np.isfinite(answers).all():
        _skip(skipped, "output does not match its input")
        return None
    # Only the model's answers are judged: a row that is no distribution over the ten digits is not one.
    if (
        (answers < 0).any()
        or (answers > 1).any()
        or (np.abs(answers.sum(axis=1) - 1) > PROBABILITY_SUM_TOLERANCE).any()
    ):
        _skip(skipped, "output not probabilities summing to 1")
        return None
    return pixels, answers, moment


def _body(captured: Mapping) -> bytes | str:
    """A captured body as the handler takes it: text for JSON and CSV, bytes for BASE64."""
    data, encoding = captured["data"], captured.get("encoding", "BASE64")
    if not isinstance(data, str):
        raise TypeError("data is not a string")
    if encoding == "BASE64":
        return base64.b64decode(data, validate=True)
    if encoding in ("JSON", "CSV"):
        return data
    raise ValueError(f"unknown encoding {encoding!r}")
