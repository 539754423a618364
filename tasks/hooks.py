"""The Amazon provider's hooks on the pipeline's AWS connection and region: how every task reaches SageMaker, S3 and
CloudWatch, on AWS or on this machine alike. Airflow is imported inside the functions: the DAG imports modules that
import this one.

One hook per service for the process: each new hook makes a new boto3 session, which loads the service's model
again (half a second for SageMaker's), and a task asks the registry, the endpoint and S3 many times. A hook is made
anew when the connection's definition in the environment changes (the local stack's CLI and the tests set it).
"""

from __future__ import annotations

import functools
import os

from tasks.config import PipelineConfig


@functools.cache
def _hook(kind: str, aws_conn_id: str, region: str, _definition: str | None):
    if kind == "sagemaker":
        from airflow.providers.amazon.aws.hooks.sagemaker import SageMakerHook

        return SageMakerHook(aws_conn_id=aws_conn_id, region_name=region)
    if kind == "s3":
        from airflow.providers.amazon.aws.hooks.s3 import S3Hook

        return S3Hook(aws_conn_id=aws_conn_id, region_name=region)
    if kind == "logs":
        from airflow.providers.amazon.aws.hooks.logs import AwsLogsHook

        return AwsLogsHook(aws_conn_id=aws_conn_id, region_name=region)
    from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook

    return AwsBaseHook(aws_conn_id=aws_conn_id, client_type=kind, region_name=region)


def hook(config: PipelineConfig, kind: str):
    """The process's hook of ``kind`` ("sagemaker", "s3", "logs", or a boto3 client type such as "cloudwatch")."""
    definition = os.environ.get(f"AIRFLOW_CONN_{config.aws_conn_id.upper()}")
    return _hook(kind, config.aws_conn_id, config.region, definition)


def stop_when_killed(operator, what: str, name: str | None, stop) -> None:
    """A SageMaker operator's ``on_kill``: stop its ``what`` (e.g. "training job") ``name`` by calling ``stop``, where
    the provider's operators leave it running. Airflow calls on_kill on SIGTERM, then SIGKILLs the task 5 s later.
    A job that never started, or has ended already, is logged, not an error."""
    from botocore.exceptions import ClientError

    if not name:
        return
    try:
        stop()
        operator.log.info("Stopped %s %s: its task was killed", what, name)
    except ClientError as error:
        operator.log.info("%s %s not stopped: %s", what.capitalize(), name, error.response["Error"]["Message"])


def sagemaker_hook(config: PipelineConfig):
    return hook(config, "sagemaker")


def s3_hook(config: PipelineConfig):
    return hook(config, "s3")
