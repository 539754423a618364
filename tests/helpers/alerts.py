"""An SQS queue subscribed to an SNS topic in the local AWS: how the tests read the pipeline's notifications."""

from __future__ import annotations

import json
import time
import uuid

import boto3


def _client(service: str, aws_endpoint: str, key=None):
    """A client signing with ``key`` (a cli.local_aws.Key; the environment's, the tests' administrator, if None)."""
    credentials = (
        {"aws_access_key_id": key.access_key_id, "aws_secret_access_key": key.secret_access_key} if key else {}
    )
    return boto3.client(service, endpoint_url=aws_endpoint, **credentials)


def subscribe_queue(aws_endpoint: str, topic_arn: str, key=None) -> str:
    """A new queue that receives every message of ``topic_arn``; returns its URL. ``key``: whose the queue is (the
    local account's administrator)."""
    sqs = _client("sqs", aws_endpoint, key)
    url = sqs.create_queue(QueueName=f"alerts-{uuid.uuid4().hex[:8]}")["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    _client("sns", aws_endpoint, key).subscribe(TopicArn=topic_arn, Protocol="sqs", Endpoint=arn)
    return url


def read_alerts(
    aws_endpoint: str, queue_url: str, wanted: int = 1, timeout: float = 60, event: str = "", run_id: str = "", key=None
) -> list[dict]:
    """The notifications in the queue (SNS's envelope: Subject, Message, MessageAttributes) of ``event`` about
    ``run_id`` (when given: other runs' alerts may arrive meanwhile), once ``wanted`` have arrived or ``timeout``
    has passed; each message read is removed from the queue."""
    sqs = _client("sqs", aws_endpoint, key)
    found, deadline = [], time.monotonic() + timeout
    while len(found) < wanted and time.monotonic() < deadline:
        for message in sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=1).get(
            "Messages", []
        ):
            alert = json.loads(message["Body"])
            sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])
            if (not event or event_of(alert) == event) and run_id in alert["Message"]:
                found.append(alert)
    return found


def event_of(alert: dict) -> str:
    return alert.get("MessageAttributes", {}).get("event", {}).get("Value", "")
