"""The model registry: model package groups and their versioned model packages, with approval.

CreateModelPackageGroup, DescribeModelPackageGroup, ListModelPackageGroups, DeleteModelPackageGroup (an empty one); CreateModelPackage (a version in a
group: InferenceSpecification, ModelMetrics, ModelApprovalStatus, CustomerMetadataProperties, MetadataProperties),
DescribeModelPackage (by name or ARN), ListModelPackages (by group, approval status, time, name; sorted, paged),
UpdateModelPackage (approval, its description, customer metadata). Records only, as on SageMaker: a version names
its artifact and image; serving it is CreateModel's business.
"""

from __future__ import annotations

import re
import threading

from local_sagemaker.listing import Listing
from local_sagemaker.protocol import ValidationException, arn
from local_sagemaker.store import Store, now
from local_sagemaker.tags import untagged

GROUPS, PACKAGES = "model-package-groups", "model-packages"
CREATED_BY = {"UserProfileName": "local", "DomainId": "local"}
# What CreateModelPackage keeps as it was sent (and DescribeModelPackage answers).
PACKAGE_FIELDS = (
    "ModelPackageDescription",
    "InferenceSpecification",
    "ModelMetrics",
    "MetadataProperties",
    "CustomerMetadataProperties",
    "Domain",
    "Task",
    "SamplePayloadUrl",
    "SourceUri",
)
PACKAGE_ARN = re.compile(r"arn:aws[a-z-]*:sagemaker:[^:]+:\d{12}:model-package/([^/]+)/(\d+)")
# What ListModelPackages says of a version, as SageMaker does: a version is named by its group and number, so its
# summary has no ModelPackageName (that is an unversioned package's); DescribeModelPackage, whose answer requires
# one, gives the group's name there. Clients (the SDK's ModelPackage.get_all) then describe each version by its ARN.
SUMMARY_FIELDS = (
    "ModelPackageGroupName",
    "ModelPackageVersion",
    "ModelPackageArn",
    "ModelPackageDescription",
    "CreationTime",
    "ModelPackageStatus",
    "ModelApprovalStatus",
    "ModelPackageRegistrationType",
)
PACKAGE_LISTING = Listing("ModelPackageSummaryList", "ModelPackageName", keys=SUMMARY_FIELDS)
GROUP_LISTING = Listing(
    "ModelPackageGroupSummaryList",
    "ModelPackageGroupName",
    keys=(
        "ModelPackageGroupName",
        "ModelPackageGroupArn",
        "ModelPackageGroupDescription",
        "CreationTime",
        "ModelPackageGroupStatus",
    ),
    default_order="Descending",
)


class Registry:
    def __init__(self, store: Store, region: str, account: str):
        self.store, self.region, self.account = store, region, account
        self._versions = threading.Lock()  # one version number per CreateModelPackage, in order

    def _arn(self, kind: str, name: str) -> str:
        return arn(kind, name, region=self.region, account=self.account)

    # -- groups ----------------------------------------------------------------------------------------------------

    def create_group(self, request: dict) -> dict:
        name = request["ModelPackageGroupName"]
        record = {
            "ModelPackageGroupName": name,
            "ModelPackageGroupArn": self._arn("model-package-group", name),
            "ModelPackageGroupDescription": request.get("ModelPackageGroupDescription"),
            "CreationTime": now(),
            "CreatedBy": CREATED_BY,
            "ModelPackageGroupStatus": "Completed",
            "Tags": request.get("Tags", []),
        }
        self.store.put_new(
            GROUPS,
            name,
            {k: v for k, v in record.items() if v is not None},
            ValidationException(f"Model Package Group already exists: {self._arn('model-package-group', name)}"),
        )
        return {"ModelPackageGroupArn": record["ModelPackageGroupArn"]}

    def group(self, name: str) -> dict:
        return self.store.require(GROUPS, name, ValidationException(f"ModelPackageGroup {name} does not exist."))

    def describe_group(self, name: str) -> dict:
        return untagged(self.group(name))

    def delete_group(self, name: str) -> dict:
        """As on SageMaker, only an empty group goes (the provider's register operator deletes the group it just
        created when its version could not be)."""
        with self.store.lock:
            self.group(name)
            if self._packages(name):
                raise ValidationException(f"Model Package Group {name} has model packages: delete them first")
            self.store.delete(GROUPS, name)
        return {}

    def list_groups(self, params: dict) -> dict:
        return GROUP_LISTING.answer(self.store.items(GROUPS), params)

    # -- versions --------------------------------------------------------------------------------------------------

    def create_package(self, request: dict) -> dict:
        group_name = request.get("ModelPackageGroupName")
        if not group_name:
            raise ValidationException("This local registry keeps versioned model packages: give ModelPackageGroupName")
        if not request.get("InferenceSpecification"):
            raise ValidationException("InferenceSpecification is required for a model package version")
        self.group(group_name)
        status = request.get("ModelApprovalStatus", "PendingManualApproval")
        with self._versions, self.store.lock:
            version = 1 + max((r["ModelPackageVersion"] for r in self._packages(group_name)), default=0)
            key = f"{group_name}.{version}"  # a group name has no dot
            created = now()
            optional = {k: request[k] for k in PACKAGE_FIELDS if k in request}
            record = {
                **optional,
                "ModelPackageName": group_name,
                "ModelPackageGroupName": group_name,
                "ModelPackageVersion": version,
                "ModelPackageArn": self._arn("model-package", f"{group_name}/{version}"),
                "ModelPackageRegistrationType": "Logged",
                "CreationTime": created,
                "LastModifiedTime": created,
                "ModelPackageStatus": "Completed",
                "ModelPackageStatusDetails": {"ValidationStatuses": [], "ImageScanStatuses": []},
                "ModelApprovalStatus": status,
                "CertifyForMarketplace": False,
                "CreatedBy": CREATED_BY,
                "Tags": request.get("Tags", []),
            }
            self.store.put(PACKAGES, key, record)
        return {"ModelPackageArn": record["ModelPackageArn"]}

    def _packages(self, group_name: str | None = None) -> list[dict]:
        records = self.store.items(PACKAGES)
        return [r for r in records if group_name is None or r["ModelPackageGroupName"] == group_name]

    def package(self, name_or_arn: str) -> dict:
        """A version by its ARN (``.../model-package/<group>/<version>``); a bare name is an unversioned package,
        which this registry does not keep."""
        match = PACKAGE_ARN.fullmatch(name_or_arn)
        record = None
        if match:
            group = next(
                (
                    r["ModelPackageGroupName"]
                    for r in self.store.items(GROUPS)
                    if r["ModelPackageGroupName"].lower() == match[1]
                ),
                None,
            )
            record = self.store.get(PACKAGES, f"{group}.{int(match[2])}") if group else None
        if record is None:
            raise ValidationException(f"ModelPackage {name_or_arn} does not exist.")
        return record

    def describe_package(self, name_or_arn: str) -> dict:
        return untagged(self.package(name_or_arn))

    def update_package(self, request: dict) -> dict:
        with self.store.lock:
            record = self.package(request["ModelPackageArn"])
            changes = {k: request[k] for k in ("ModelApprovalStatus", "ApprovalDescription") if k in request}
            metadata = {**record.get("CustomerMetadataProperties", {}), **request.get("CustomerMetadataProperties", {})}
            for key in request.get("CustomerMetadataPropertiesToRemove", []):
                metadata.pop(key, None)
            if metadata or "CustomerMetadataProperties" in record:
                changes["CustomerMetadataProperties"] = metadata
            if not changes:
                raise ValidationException("UpdateModelPackage: nothing to update")
            key = f"{record['ModelPackageGroupName']}.{record['ModelPackageVersion']}"
            self.store.update(PACKAGES, key, **changes, LastModifiedTime=now(), LastModifiedBy=CREATED_BY)
        return {"ModelPackageArn": record["ModelPackageArn"]}

    def list_packages(self, params: dict) -> dict:
        """As SageMaker lists them: a group's versions when a group is named, otherwise only the packages of
        ModelPackageType, which is Unversioned unless given (this registry keeps versions only)."""
        group = params.get("ModelPackageGroupName")
        kind = params.get("ModelPackageType") or ("Versioned" if group else "Unversioned")
        records = [] if kind == "Unversioned" else self._packages(group)
        if status := params.get("ModelApprovalStatus"):
            records = [r for r in records if r["ModelApprovalStatus"] == status]
        return PACKAGE_LISTING.answer(records, params)
