"""What each SageMaker operation needs from IAM, as SageMaker asks it: the action of the operation's name on the
resources its Service Authorization Reference entry names (local_aws.permissions fills their ARNs from the request,
names lower-cased as SageMaker's ARNs have them), with SageMaker's condition keys from the request; and beside it:

- ``iam:PassRole`` on each role the request hands to SageMaker (a training job's RoleArn, a tuning job's training
  definitions', a model's ExecutionRoleArn), with ``iam:PassedToService`` = ``sagemaker.amazonaws.com``;
- ``sagemaker:AddTags`` on the new resource when a Create* request tags it, with ``aws:RequestTag/*`` and
  ``aws:TagKeys``.
"""

from __future__ import annotations

from collections.abc import Mapping

from local_aws.permissions import Requirement, resources_of
from local_sagemaker.protocol import arn

SERVICE_PRINCIPAL = "sagemaker.amazonaws.com"
# The request member that names a new resource, for Create* operations that may tag it.
_CREATED = {
    "CreateTrainingJob": "TrainingJobName",
    "CreateHyperParameterTuningJob": "HyperParameterTuningJobName",
    "CreateTransformJob": "TransformJobName",
    "CreateModel": "ModelName",
    "CreateEndpointConfig": "EndpointConfigName",
    "CreateEndpoint": "EndpointName",
    "CreateExperiment": "ExperimentName",
    "CreateTrial": "TrialName",
    "CreateModelPackageGroup": "ModelPackageGroupName",
}


def requirements(operation: str, params: Mapping, *, region: str, account: str) -> list[Requirement]:
    action = f"sagemaker:{operation}"
    flat = {name.lower(): value for name, value in params.items()}
    if operation == "CreateModelPackage" and "modelpackagegroupname" in flat:
        # A new version of a group: its ARN ends with a version number the registry has yet to give.
        group = str(flat["modelpackagegroupname"]).rsplit("/", 1)[-1].lower()
        resources = [arn("model-package", f"{group}/*", region=region, account=account)]
    else:
        resources = resources_of(action, flat, region=region, account=account, lowercase=True)
    context = _context(operation, params, region, account)
    needed = [Requirement(action, resource, context) for resource in resources]
    for role in _passed_roles(operation, params):
        needed.append(Requirement("iam:PassRole", role, {"iam:PassedToService": SERVICE_PRINCIPAL}))
    if params.get("Tags") and operation in _CREATED:
        tags = {str(tag.get("Key")): str(tag.get("Value", "")) for tag in params["Tags"] if isinstance(tag, dict)}
        tag_context = {"aws:TagKeys": sorted(tags), **{f"aws:RequestTag/{key}": value for key, value in tags.items()}}
        needed += [Requirement("sagemaker:AddTags", resource, tag_context) for resource in resources[:1]]
    return needed


def _passed_roles(operation: str, params: Mapping) -> list[str]:
    if operation == "CreateTrainingJob":
        return [params["RoleArn"]] if params.get("RoleArn") else []
    if operation == "CreateModel":
        return [params["ExecutionRoleArn"]] if params.get("ExecutionRoleArn") else []
    if operation == "CreateHyperParameterTuningJob":
        definitions = [params.get("TrainingJobDefinition") or {}, *params.get("TrainingJobDefinitions", [])]
        return sorted({definition["RoleArn"] for definition in definitions if definition.get("RoleArn")})
    return []


def _context(operation: str, params: Mapping, region: str, account: str) -> dict[str, str | list[str]]:
    """SageMaker's condition keys that a request sets (instance types, KMS keys, VPC, isolation, approval)."""
    context: dict[str, str | list[str]] = {}
    definition = params.get("TrainingJobDefinition") or params
    resources = definition.get("ResourceConfig") or {}
    instance_types = [resources["InstanceType"]] if resources.get("InstanceType") else []
    instance_types += [
        variant["InstanceType"] for variant in params.get("ProductionVariants", []) if variant.get("InstanceType")
    ]
    if (transform := params.get("TransformResources")) and transform.get("InstanceType"):
        instance_types.append(transform["InstanceType"])
        if transform.get("VolumeKmsKeyId"):
            context["sagemaker:VolumeKmsKeyArn"] = transform["VolumeKmsKeyId"]
    if instance_types:
        context["sagemaker:InstanceTypes"] = instance_types
    if resources.get("VolumeKmsKeyId"):
        context["sagemaker:VolumeKmsKeyArn"] = resources["VolumeKmsKeyId"]
    if params.get("KmsKeyId") and operation == "CreateEndpointConfig":
        context["sagemaker:VolumeKmsKeyArn"] = params["KmsKeyId"]
    output = definition.get("OutputDataConfig") or params.get("TransformOutput") or {}
    if output.get("KmsKeyId"):
        context["sagemaker:OutputKmsKeyArn"] = output["KmsKeyId"]
    if (stopping := definition.get("StoppingCondition")) and "MaxRuntimeInSeconds" in stopping:
        context["sagemaker:MaxRuntimeInSeconds"] = str(stopping["MaxRuntimeInSeconds"])
    for member, key in (
        ("EnableNetworkIsolation", "sagemaker:NetworkIsolation"),
        ("EnableInterContainerTrafficEncryption", "sagemaker:InterContainerTrafficEncryption"),
    ):
        if member in definition:
            context[key] = str(bool(definition[member])).lower()
    if vpc := definition.get("VpcConfig"):
        context["sagemaker:VpcSubnets"] = list(vpc.get("Subnets", []))
        context["sagemaker:VpcSecurityGroupIds"] = list(vpc.get("SecurityGroupIds", []))
    if "ModelApprovalStatus" in params:
        context["sagemaker:ModelApprovalStatus"] = params["ModelApprovalStatus"]
    if operation == "CreateTransformJob" and params.get("ModelName"):
        context["sagemaker:ModelArn"] = arn("model", params["ModelName"], region=region, account=account)
    return context
