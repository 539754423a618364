"""The model registry on the local SageMaker service, through boto3: groups, versions, approval, listing."""

from __future__ import annotations

import pytest
from botocore.exceptions import ClientError

from local_sagemaker import protocol
from tests.conftest import EXECUTION_ROLE

GROUP = "registry-digits"


def validated(operation: str, answer: dict) -> dict:
    """``answer`` as botocore parsed it, checked against the operation's output shape (required members, enums)."""
    protocol.validate_response(operation, {k: v for k, v in answer.items() if k != "ResponseMetadata"})
    return answer


def inference(version: int) -> dict:
    return {
        "Containers": [{"Image": "pytorch-inference", "ModelDataUrl": f"s3://bucket/models/v{version}/model.tar.gz"}],
        "SupportedContentTypes": ["application/json", "application/x-npy"],
        "SupportedResponseMIMETypes": ["application/json"],
        "SupportedRealtimeInferenceInstanceTypes": ["ml.m5.large"],
    }


@pytest.fixture(scope="module")
def sagemaker(local_sagemaker):
    import boto3

    client = boto3.client("sagemaker", endpoint_url=local_sagemaker)
    client.create_model_package_group(ModelPackageGroupName=GROUP, ModelPackageGroupDescription="MNIST models")
    return client


def test_groups(sagemaker):
    described = validated(
        "DescribeModelPackageGroup", sagemaker.describe_model_package_group(ModelPackageGroupName=GROUP)
    )
    assert described["ModelPackageGroupArn"].endswith(f":model-package-group/{GROUP}")
    assert (described["ModelPackageGroupStatus"], described["ModelPackageGroupDescription"]) == (
        "Completed",
        "MNIST models",
    )
    with pytest.raises(ClientError, match="Model Package Group already exists"):
        sagemaker.create_model_package_group(ModelPackageGroupName=GROUP)
    with pytest.raises(ClientError, match="ModelPackageGroup absent does not exist"):
        sagemaker.describe_model_package_group(ModelPackageGroupName="absent")
    names = [
        g["ModelPackageGroupName"]
        for g in sagemaker.list_model_package_groups(NameContains="registry-")["ModelPackageGroupSummaryList"]
    ]
    assert names == [GROUP]


def test_versions_are_numbered_described_listed_and_approved(sagemaker):
    arns = []
    for version, status in ((1, "Approved"), (2, "Rejected"), (3, "PendingManualApproval")):
        arns.append(
            sagemaker.create_model_package(
                ModelPackageGroupName=GROUP,
                ModelPackageDescription=f"hidden_channels {version * 10}",
                InferenceSpecification=inference(version),
                ModelApprovalStatus=status,
                ModelMetrics={
                    "ModelQuality": {
                        "Statistics": {
                            "ContentType": "application/json",
                            "S3Uri": f"s3://bucket/reports/v{version}.json",
                        }
                    }
                },
                CustomerMetadataProperties={"test_accuracy": f"0.9{version}", "run_id": f"run-{version}"},
            )["ModelPackageArn"]
        )
    assert [arn.rsplit("/", 2)[1:] for arn in arns] == [[GROUP, "1"], [GROUP, "2"], [GROUP, "3"]]

    described = validated("DescribeModelPackage", sagemaker.describe_model_package(ModelPackageName=arns[2]))
    assert (described["ModelPackageGroupName"], described["ModelPackageVersion"]) == (GROUP, 3)
    assert (
        described["ModelApprovalStatus"] == "PendingManualApproval" and described["ModelPackageStatus"] == "Completed"
    )
    assert described["InferenceSpecification"]["Containers"][0]["ModelDataUrl"].endswith("v3/model.tar.gz")
    assert described["CustomerMetadataProperties"] == {"test_accuracy": "0.93", "run_id": "run-3"}
    assert described["ModelMetrics"]["ModelQuality"]["Statistics"]["S3Uri"].endswith("v3.json")

    listed = sagemaker.list_model_packages(ModelPackageGroupName=GROUP, SortBy="CreationTime", SortOrder="Descending")
    assert [p["ModelPackageVersion"] for p in validated("ListModelPackages", listed)["ModelPackageSummaryList"]] == [
        3,
        2,
        1,
    ]
    # A version's summary, as SageMaker's: named by its group and number, with no ModelPackageName.
    assert {key for p in listed["ModelPackageSummaryList"] for key in p} == {
        "ModelPackageGroupName",
        "ModelPackageVersion",
        "ModelPackageArn",
        "ModelPackageDescription",
        "CreationTime",
        "ModelPackageStatus",
        "ModelApprovalStatus",
        "ModelPackageRegistrationType",
    }
    # Without a group, SageMaker lists the unversioned packages unless asked for versions (this registry has none).
    assert sagemaker.list_model_packages()["ModelPackageSummaryList"] == []
    versions = sagemaker.list_model_packages(ModelPackageType="Versioned", NameContains=GROUP)
    assert [p["ModelPackageArn"] for p in versions["ModelPackageSummaryList"]] == arns
    approved = sagemaker.list_model_packages(ModelPackageGroupName=GROUP, ModelApprovalStatus="Approved")
    assert [p["ModelPackageArn"] for p in approved["ModelPackageSummaryList"]] == [arns[0]]
    first = sagemaker.list_model_packages(ModelPackageGroupName=GROUP, MaxResults=2)
    rest = sagemaker.list_model_packages(ModelPackageGroupName=GROUP, MaxResults=2, NextToken=first["NextToken"])
    assert [p["ModelPackageVersion"] for p in first["ModelPackageSummaryList"] + rest["ModelPackageSummaryList"]] == [
        1,
        2,
        3,
    ]
    assert "NextToken" not in rest

    # A person approves version 3 (as `mnist-pipeline approve` or the registry on AWS would).
    before = described["LastModifiedTime"]
    sagemaker.update_model_package(
        ModelPackageArn=arns[2],
        ModelApprovalStatus="Approved",
        ApprovalDescription="checked by hand",
        CustomerMetadataPropertiesToRemove=["run_id"],
    )
    updated = sagemaker.describe_model_package(ModelPackageName=arns[2])
    assert (updated["ModelApprovalStatus"], updated["ApprovalDescription"]) == ("Approved", "checked by hand")
    assert updated["CustomerMetadataProperties"] == {"test_accuracy": "0.93"} and updated["LastModifiedTime"] >= before
    approved = sagemaker.list_model_packages(
        ModelPackageGroupName=GROUP, ModelApprovalStatus="Approved", SortBy="CreationTime", SortOrder="Descending"
    )
    assert [p["ModelPackageVersion"] for p in approved["ModelPackageSummaryList"]] == [3, 1]


def test_the_sdk_lists_a_groups_versions(sagemaker, monkeypatch):
    """The SageMaker Python SDK's own ModelPackage.get_all, pointed at the service by the standard variable: it lists
    the group's versions and describes each by its ARN."""
    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL_SAGEMAKER", sagemaker.meta.endpoint_url)
    from sagemaker.core.resources import ModelPackage

    versions = list(ModelPackage.get_all(model_package_group_name=GROUP, session=boto3.Session()))
    assert [(v.model_package_version, v.model_approval_status) for v in versions] == [
        (1, "Approved"),
        (2, "Rejected"),
        (3, "Approved"),
    ]
    assert {v.model_package_name for v in versions} == {GROUP}, "DescribeModelPackage's: the group's name"
    assert versions[2].inference_specification.containers[0].model_data_url.endswith("v3/model.tar.gz")


def test_what_is_wrong_is_named(sagemaker):
    arn = f"arn:aws:sagemaker:us-east-1:000000000000:model-package/{GROUP}/99"
    with pytest.raises(ClientError, match=f"ModelPackage {arn} does not exist"):
        sagemaker.describe_model_package(ModelPackageName=arn)
    with pytest.raises(ClientError, match="ModelPackageGroup absent does not exist"):
        sagemaker.create_model_package(ModelPackageGroupName="absent", InferenceSpecification=inference(1))
    with pytest.raises(ClientError, match="InferenceSpecification is required"):
        sagemaker.create_model_package(ModelPackageGroupName=GROUP)
    import boto3
    from botocore.config import Config

    unchecked = boto3.client(
        "sagemaker", endpoint_url=sagemaker.meta.endpoint_url, config=Config(parameter_validation=False)
    )
    with pytest.raises(ClientError) as caught:  # the service checks botocore's model: the status is an enum
        unchecked.update_model_package(ModelPackageArn=arn, ModelApprovalStatus="Maybe")
    assert caught.value.response["Error"]["Code"] == "ValidationException"
    assert (
        "failed to satisfy constraint: Member must satisfy enum value set" in caught.value.response["Error"]["Message"]
    )


def test_tags_are_added_listed_and_deleted_by_arn(sagemaker):
    """Tags on a group and on an endpoint config (the pipeline keeps a deployment's test accuracy there)."""
    group_arn = sagemaker.describe_model_package_group(ModelPackageGroupName=GROUP)["ModelPackageGroupArn"]
    sagemaker.create_model(
        ModelName="tagged",
        ExecutionRoleArn=EXECUTION_ROLE,
        PrimaryContainer={"Image": "i", "ModelDataUrl": "s3://bucket/m/model.tar.gz"},
    )
    sagemaker.create_endpoint_config(
        EndpointConfigName="tagged",
        ProductionVariants=[{"VariantName": "AllTraffic", "ModelName": "tagged", "InitialInstanceCount": 1}],
        Tags=[{"Key": "project", "Value": "mnist-pipeline"}],
    )
    config_arn = sagemaker.describe_endpoint_config(EndpointConfigName="tagged")["EndpointConfigArn"]
    assert validated("ListTags", sagemaker.list_tags(ResourceArn=config_arn))["Tags"] == [
        {"Key": "project", "Value": "mnist-pipeline"}
    ]
    validated(
        "AddTags",
        sagemaker.add_tags(
            ResourceArn=config_arn,
            Tags=[{"Key": "mnist-pipeline:test-accuracy", "Value": "0.9714"}, {"Key": "project", "Value": "changed"}],
        ),
    )
    assert sagemaker.list_tags(ResourceArn=config_arn)["Tags"] == [
        {"Key": "project", "Value": "changed"},
        {"Key": "mnist-pipeline:test-accuracy", "Value": "0.9714"},
    ]
    sagemaker.delete_tags(ResourceArn=config_arn, TagKeys=["project"])
    assert [t["Key"] for t in sagemaker.list_tags(ResourceArn=config_arn)["Tags"]] == ["mnist-pipeline:test-accuracy"]
    sagemaker.add_tags(ResourceArn=group_arn, Tags=[{"Key": "team", "Value": "ops"}])
    assert sagemaker.list_tags(ResourceArn=group_arn)["Tags"] == [{"Key": "team", "Value": "ops"}]
    assert "Tags" not in sagemaker.describe_endpoint_config(EndpointConfigName="tagged"), "as SageMaker answers"
    with pytest.raises(ClientError, match=r"Resource arn:aws:sagemaker:us-east-1:000000000000:model/absent does not"):
        sagemaker.list_tags(ResourceArn="arn:aws:sagemaker:us-east-1:000000000000:model/absent")
    sagemaker.delete_endpoint_config(EndpointConfigName="tagged")
    sagemaker.delete_model(ModelName="tagged")
