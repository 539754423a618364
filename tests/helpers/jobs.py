"""The training jobs of the tests: a stand-in script, put in S3 as the sourcedir.tar.gz it runs, a job's input
channel, the pipeline's operator that starts a job, and whether a job runs its script yet."""

from __future__ import annotations

import io
import tarfile


def put_script(s3, bucket: str, key: str, script: str) -> None:
    """``script`` as `train.py`, the one file of a sourcedir.tar.gz at ``s3://bucket/key``."""
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        body = script.encode()
        info = tarfile.TarInfo("train.py")
        info.size = len(body)
        tar.addfile(info, io.BytesIO(body))
    s3.put_object(Bucket=bucket, Key=key, Body=archive.getvalue())


def training(sagemaker, name: str) -> bool:
    """Whether training job ``name`` runs its script now (its SecondaryStatus is Training)."""
    return sagemaker.describe_training_job(TrainingJobName=name)["SecondaryStatus"] == "Training"


def training_operator(config: dict, **options):
    """The pipeline's TrainingOperator for the job ``config`` asks for, as the DAG sets it up against the local
    service but checking every second and printing no log (``options`` change or add to that)."""
    from tasks.operators import TrainingOperator

    settings = {"check_interval": 1, "print_log": False, "aws_conn_id": "aws_default", "region_name": "us-east-1"}
    return TrainingOperator(task_id="train", config=config, **(settings | options))


def s3_channel(name: str, uri: str, **fields) -> dict:
    """A training job's input channel ``name``: every object under the S3 prefix ``uri``, each instance given all of
    them (``fields``: the channel's others, such as its ContentType)."""
    source = {"S3DataType": "S3Prefix", "S3Uri": uri, "S3DataDistributionType": "FullyReplicated"}
    return {"ChannelName": name, "DataSource": {"S3DataSource": source}, **fields}
