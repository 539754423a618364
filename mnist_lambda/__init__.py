"""An AWS Lambda function in front of the MNIST endpoint (handler.py), with its IAM policy (iam-policy.json)."""
