"""The IAM policies shipped for AWS (iam/), as `mnist-pipeline iam render` fills them: linted with parliament (the
policy linter from PyPI) and held to least privilege: no finding, PassRole only for the execution role and only to
SageMaker, S3 only under the pipeline's prefix, the bucket's content-addressed prefixes written once."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest

from cli.iam import POLICIES, Blanks, render
from tests.conftest import ROOT

BLANKS = Blanks(
    account="123456789012",
    region="eu-west-1",
    bucket="mnist-pipeline",
    prefix="mnist-sweep",
    role="mnist-pipeline-sagemaker",
    principal="arn:aws:iam::123456789012:user/mnist-pipeline",
    topic="mnist-pipeline-alerts",
)
IDENTITY_POLICIES = ("airflow-policy", "sagemaker-execution-role-policy")


def statements(name: str) -> list[dict]:
    return render(name, BLANKS)["Statement"]


def as_list(value) -> list:
    return value if isinstance(value, list) else [value]


@pytest.mark.parametrize("name", [*POLICIES, "lambda"])
def test_parliament_finds_nothing(name):
    with warnings.catch_warnings():  # parliament still imports pkg_resources
        warnings.simplefilter("ignore")
        from parliament import analyze_policy_string

    if name == "lambda":
        policy = (ROOT / "mnist_lambda/iam-policy.json").read_text()
        policy = policy.replace("${Region}", BLANKS.region).replace("${AccountId}", BLANKS.account)
    else:
        policy = json.dumps(render(name, BLANKS))
    findings = [(finding.issue, finding.detail) for finding in analyze_policy_string(policy).findings]
    if name == "sagemaker-execution-role-trust":  # parliament reads it as an identity policy: a trust policy has none
        findings.remove(("MALFORMED", "Statement contains neither Resource nor NotResource"))
    assert findings == []


@pytest.mark.parametrize("name", IDENTITY_POLICIES)
def test_identity_policies_only_allow_and_name_no_wildcard_action(name):
    for statement in statements(name):
        assert statement["Effect"] == "Allow" and not {"NotAction", "NotResource", "NotPrincipal"} & set(statement)
        assert not [action for action in as_list(statement["Action"]) if "*" in action], statement


def test_the_airflow_principal_passes_only_the_execution_role_and_only_to_sagemaker():
    [passing] = [s for s in statements("airflow-policy") if s["Action"] == "iam:PassRole"]
    assert passing["Resource"] == "arn:aws:iam::123456789012:role/mnist-pipeline-sagemaker"
    assert passing["Condition"] == {"StringEquals": {"iam:PassedToService": "sagemaker.amazonaws.com"}}


@pytest.mark.parametrize("name", IDENTITY_POLICIES)
def test_s3_only_under_the_pipelines_prefix(name):
    for statement in statements(name):
        actions = as_list(statement["Action"])
        if not any(action.startswith("s3:") for action in actions):
            continue
        resources = as_list(statement["Resource"])
        if actions == ["s3:ListBucket"]:
            assert resources == ["arn:aws:s3:::mnist-pipeline"]
            condition = statement["Condition"]
            # A listing of the prefix, or HeadBucket (which carries no prefix), the provider's check of a bucket.
            assert condition == {"Null": {"s3:prefix": "true"}} or all(
                prefix.startswith("mnist-sweep/") for prefix in condition["StringLike"]["s3:prefix"]
            ), statement
        else:
            assert all(r.startswith("arn:aws:s3:::mnist-pipeline/mnist-sweep/") for r in resources), resources


def test_the_execution_role_trusts_only_sagemaker_of_this_account():
    [trust] = statements("sagemaker-execution-role-trust")
    assert trust["Principal"] == {"Service": "sagemaker.amazonaws.com"} and trust["Action"] == "sts:AssumeRole"
    assert trust["Condition"] == {"StringEquals": {"aws:SourceAccount": "123456789012"}}


def test_the_bucket_policy_only_denies_and_makes_the_content_addresses_write_once():
    found = {statement["Sid"]: statement for statement in statements("bucket-policy")}
    assert {statement["Effect"] for statement in found.values()} == {"Deny"}
    once = found["ContentAddressedObjectsAreWrittenOnce"]
    assert once["Condition"] == {"StringNotEquals": {"s3:if-none-match": "*"}}
    assert (
        sorted(once["Resource"])
        == sorted(found["ContentAddressedObjectsAreNeverDeleted"]["Resource"])
        == sorted(
            f"arn:aws:s3:::mnist-pipeline/mnist-sweep/{kind}/*"
            for kind in ("code", "datasets", "models", "model-quality")
        )
    )


RENDER = [
    sys.executable,
    "-m",
    "cli.main",
    "iam",
    "render",
    "--account",
    "123456789012",
    "--region",
    "eu-west-1",
    "--bucket",
    "b",
    "--prefix",
    "p",
    "--role",
    "r",
]


def test_render_prints_every_policy():
    printed = subprocess.run(RENDER, capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert [line.split(".json")[0] for line in printed.splitlines() if line.startswith("# ")] == [
        f"# {name}" for name in POLICIES
    ]
    assert "${" not in printed and "arn:aws:s3:::b/p/training-jobs/*" in printed
    alone = subprocess.run([*RENDER, "--policy", "bucket-policy"], capture_output=True, text=True, cwd=ROOT, check=True)
    assert json.loads(alone.stdout)["Statement"][0]["Sid"] == "ContentAddressedObjectsAreWrittenOnce"


def test_render_refuses_what_it_cannot_fill():
    bad = subprocess.run([*RENDER[:6], "12", *RENDER[7:]], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "--account must be a 12-digit AWS account id, not '12'" in bad.stderr
