"""The local AWS: S3, CloudWatch, CloudWatch Logs, SNS, STS and IAM (moto's), behind a gateway that checks every
request as AWS does: its SigV4 signature against the keys of the local IAM, and its authorization against the
principal's policies and the resource's, evaluated by iam-simulate. Its own package: it imports nothing else of the
project, and the local SageMaker service asks it, as SageMaker would ask IAM, who signed a request and whether it
is allowed."""

# The account of every local principal and resource, here and in the local SageMaker service, and the region both
# serve when none is named. tasks.config's defaults repeat them (the pipeline imports no part of the local stack):
# tests/test_layers.py holds the copies together.
LOCAL_ACCOUNT = "000000000000"
LOCAL_REGION = "us-east-1"
