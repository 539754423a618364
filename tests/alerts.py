"""An SQS queue subscribed to an SNS topic in the local AWS: how the tests read the pipeline's notifications."""

from __future__ import annotations

import json
import time
import uuid

import boto3


def subscribe_queue(aws_endpoint: str, topic_arn: str) -> str:
    """A new queue that receives every message of ``topic_arn``; returns its URL."""
    sqs = boto3.client("sqs", endpoint_url=aws_endpoint)
    url = sqs.create_queue(QueueName=f"alerts-{uuid.uuid4().hex[:8]}")["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    boto3.client("sns", endpoint_url=aws_endpoint).subscribe(TopicArn=topic_arn, Protocol="sqs", Endpoint=arn)
    return url


def read_alerts(aws_endpoint: str, queue_url: str, wanted: int = 1, timeout: float = 60, event: str = "",
                run_id: str = "") -> list[dict]:  # fmt: skip
    """The notifications in the queue (SNS's envelope: Subject, Message, MessageAttributes) of ``event`` about
    ``run_id`` (when given: other runs' alerts may arrive meanwhile), once ``wanted`` have arrived or ``timeout``
    has passed; each message read is removed from the queue."""
    sqs = boto3.client("sqs", endpoint_url=aws_endpoint)
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
