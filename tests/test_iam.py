"""The IAM policies shipped for AWS, linted with parliament (the policy linter from PyPI) and held to least privilege:
no finding, PassRole only for the execution role and only to SageMaker, S3 only under the pipeline's prefix."""

from __future__ import annotations

import json
import warnings

import pytest

from tests.conftest import ROOT

PLACEHOLDERS = {"${Region}": "eu-west-1", "${AccountId}": "123456789012", "${Bucket}": "mnist-pipeline",
                "${Prefix}": "mnist-sweep", "${ExecutionRoleName}": "mnist-pipeline-sagemaker",
                "${AlertTopicName}": "mnist-pipeline-alerts"}  # fmt: skip
POLICIES = ("iam/airflow-policy.json", "iam/sagemaker-execution-role-policy.json", "mnist_lambda/iam-policy.json")


def filled(path: str) -> str:
    text = (ROOT / path).read_text()
    for placeholder, value in PLACEHOLDERS.items():
        text = text.replace(placeholder, value)
    assert "${" not in text, f"{path}: a placeholder without a value"
    return text


def statements(path: str) -> list[dict]:
    return json.loads(filled(path))["Statement"]


@pytest.mark.parametrize("path", POLICIES)
def test_parliament_finds_nothing(path):
    with warnings.catch_warnings():  # parliament still imports pkg_resources
        warnings.simplefilter("ignore")
        from parliament import analyze_policy_string

    findings = analyze_policy_string(filled(path)).findings
    assert [(finding.issue, finding.detail) for finding in findings] == []


@pytest.mark.parametrize("path", POLICIES)
def test_only_allows_and_no_wildcard_actions(path):
    for statement in statements(path):
        assert statement["Effect"] == "Allow" and not {"NotAction", "NotResource", "NotPrincipal"} & set(statement)
        actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        assert not [action for action in actions if "*" in action], statement


def test_the_airflow_principal_passes_only_the_execution_role_and_only_to_sagemaker():
    [passing] = [s for s in statements("iam/airflow-policy.json") if s["Action"] == "iam:PassRole"]
    assert passing["Resource"] == "arn:aws:iam::123456789012:role/mnist-pipeline-sagemaker"
    assert passing["Condition"] == {"StringEquals": {"iam:PassedToService": "sagemaker.amazonaws.com"}}


@pytest.mark.parametrize("path", ["iam/airflow-policy.json", "iam/sagemaker-execution-role-policy.json"])
def test_s3_only_under_the_pipelines_prefix(path):
    for statement in statements(path):
        actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        if not any(action.startswith("s3:") for action in actions):
            continue
        resources = statement["Resource"] if isinstance(statement["Resource"], list) else [statement["Resource"]]
        if actions == ["s3:ListBucket"]:
            assert resources == ["arn:aws:s3:::mnist-pipeline"]
            assert all(p.startswith("mnist-sweep/") for p in statement["Condition"]["StringLike"]["s3:prefix"])
        else:
            assert all(r.startswith("arn:aws:s3:::mnist-pipeline/mnist-sweep/") for r in resources), resources


def test_the_execution_role_trusts_only_sagemaker_of_this_account():
    [trust] = json.loads(filled("iam/sagemaker-execution-role-trust.json"))["Statement"]
    assert trust["Principal"] == {"Service": "sagemaker.amazonaws.com"} and trust["Action"] == "sts:AssumeRole"
    assert trust["Condition"] == {"StringEquals": {"aws:SourceAccount": "123456789012"}}
