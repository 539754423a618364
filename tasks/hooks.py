"""The Amazon provider's hooks on the pipeline's AWS connection and region: how every task reaches SageMaker and
S3, on AWS or on this machine alike. Airflow is imported inside the functions: the DAG imports modules that
import this one."""

from __future__ import annotations

from tasks.config import PipelineConfig


def sagemaker_hook(config: PipelineConfig):
    from airflow.providers.amazon.aws.hooks.sagemaker import SageMakerHook

    return SageMakerHook(aws_conn_id=config.aws_conn_id, region_name=config.region)


def s3_hook(config: PipelineConfig):
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    return S3Hook(aws_conn_id=config.aws_conn_id, region_name=config.region)
