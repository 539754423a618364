"""Models and endpoint configs: CreateModel, DescribeModel, DeleteModel, ListModels; CreateEndpointConfig,
DescribeEndpointConfig, DeleteEndpointConfig, ListEndpointConfigs. Records only: what they name runs when an
endpoint serves them (local_sagemaker.endpoints)."""

from __future__ import annotations

from collections.abc import Callable

from local_sagemaker import capture
from local_sagemaker.listing import Listing
from local_sagemaker.protocol import ValidationException, arn, not_found
from local_sagemaker.roles import Roles
from local_sagemaker.store import Store, now
from local_sagemaker.tags import untagged

MODELS, CONFIGS = "models", "endpoint-configs"
# Each kind's noun in SageMaker's messages, its ARN's resource type, and its ARN's member.
RESOURCES = {
    MODELS: ("model", "model", "ModelArn"),
    CONFIGS: ("endpoint configuration", "endpoint-config", "EndpointConfigArn"),
}
MODEL_LISTING = Listing(
    "Models", "ModelName", keys=("ModelName", "ModelArn", "CreationTime"), default_order="Descending"
)
CONFIG_LISTING = Listing(
    "EndpointConfigs",
    "EndpointConfigName",
    keys=("EndpointConfigName", "EndpointConfigArn", "CreationTime"),
    default_order="Descending",
)


class Models:
    def __init__(
        self, store: Store, region: str, account: str, *, roles: Roles, packages: Callable[[str], dict] | None = None
    ):
        """``roles``: the execution roles models name, checked when a model is created; ``packages``: a model
        package version's record by its ARN (the registry's), for containers that name one (ModelPackageName)
        instead of an image and an artifact."""
        self.store, self.region, self.account, self.roles = store, region, account, roles
        self.packages = packages

    def _arn(self, kind: str, name: str) -> str:
        return arn(kind, name, region=self.region, account=self.account)

    # -- either kind of record ---------------------------------------------------------------------------------------

    def _put_new(self, kind: str, name: str, request: dict) -> dict:
        """``request`` recorded under ``name`` with its ARN and CreationTime; the answer names the ARN. A name taken
        already is a ValidationException, in SageMaker's words."""
        noun, arn_type, arn_key = RESOURCES[kind]
        resource_arn = self._arn(arn_type, name)
        self.store.put_new(
            kind,
            name,
            {**request, arn_key: resource_arn, "CreationTime": now()},
            ValidationException(f'Cannot create already existing {noun} "{resource_arn}".'),
        )
        return {arn_key: resource_arn}

    def _record(self, kind: str, name: str) -> dict:
        noun, arn_type, _ = RESOURCES[kind]
        return self.store.require(kind, name, not_found(noun, name, self._arn(arn_type, name)))

    def _delete(self, kind: str, name: str) -> dict:
        self._record(kind, name)
        self.store.delete(kind, name)
        return {}

    # -- models ----------------------------------------------------------------------------------------------------

    def create_model(self, request: dict) -> dict:
        name = request["ModelName"]
        container = request.get("PrimaryContainer") or (request.get("Containers") or [None])[0]
        if container is None:
            raise ValidationException("Either PrimaryContainer or Containers must be given")
        if container.get("ModelPackageName"):
            container.update(self._from_package(container["ModelPackageName"]))
        if not container.get("ModelDataUrl"):
            raise ValidationException(
                f"Model {name}: its container has no ModelDataUrl (this local service serves model.tar.gz artifacts)"
            )
        if not request.get("ExecutionRoleArn"):
            raise ValidationException(f"Model {name}: ExecutionRoleArn is required (its servers act as that role)")
        self.roles.check(request["ExecutionRoleArn"], self._arn("model", name))
        return self._put_new(MODELS, name, request)

    def _from_package(self, arn: str) -> dict:
        """What a container that names a model package version runs: the version's own container (its image,
        artifact and environment), as SageMaker resolves it."""
        if self.packages is None:
            raise ValidationException("This service keeps no model registry to resolve ModelPackageName from")
        package = self.packages(arn)  # ValidationException "ModelPackage ... does not exist." otherwise
        inner = package["InferenceSpecification"]["Containers"][0]
        return {key: inner[key] for key in ("Image", "ModelDataUrl", "Environment") if key in inner}

    def model(self, name: str) -> dict:
        return self._record(MODELS, name)

    def describe_model(self, name: str) -> dict:
        return untagged(self.model(name))

    def delete_model(self, name: str) -> dict:
        return self._delete(MODELS, name)

    def list_models(self, params: dict) -> dict:
        return MODEL_LISTING.answer(self.store.items(MODELS), params)

    # -- endpoint configs --------------------------------------------------------------------------------------------

    def create_endpoint_config(self, request: dict) -> dict:
        name = request["EndpointConfigName"]
        for variant in request["ProductionVariants"]:
            if variant.get("ModelName"):
                self.model(variant["ModelName"])
        variants = [variant["VariantName"] for variant in request["ProductionVariants"]]
        if len(set(variants)) != len(variants):
            raise ValidationException(f"Endpoint config {name}: variant names must be unique, got {variants}")
        if request.get("DataCaptureConfig"):
            capture.check(request["DataCaptureConfig"])
        return self._put_new(CONFIGS, name, request)

    def endpoint_config(self, name: str) -> dict:
        return self._record(CONFIGS, name)

    def describe_endpoint_config(self, name: str) -> dict:
        return untagged(self.endpoint_config(name))

    def delete_endpoint_config(self, name: str) -> dict:
        return self._delete(CONFIGS, name)

    def list_endpoint_configs(self, params: dict) -> dict:
        return CONFIG_LISTING.answer(self.store.items(CONFIGS), params)
