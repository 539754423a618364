"""Which SageMaker PyTorch image a training job or an endpoint runs: its ECR URI, as the SageMaker Python SDK's
``image_uris.retrieve(framework="pytorch", ...)`` names it.

The URI is read from the SDK's own image table (``sagemaker/core/image_uri_config/pytorch.json``) and botocore's
endpoint data, without importing the SDK: importing it costs a task process seconds, and three tasks of every run
name an image. Only what the pipeline asks for is answered (the PyTorch framework, training or inference, one
version and Python version); anything the table does not hold is refused in the SDK's words.
tests/test_training_jobs.py holds the answers to the SDK's own for every region and kind of instance.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

# The newest PyTorch with both a training and an inference image in the SDK's registry: train and serve alike.
FRAMEWORK_VERSION = "2.6"
PY_VERSION = "py312"
ECR_URI_TEMPLATE = "{registry}.dkr.{hostname}/{repository}:{tag}"  # the SDK's, with the tag


@functools.cache
def _table() -> dict:
    """The SDK's PyTorch image table, found without running the SDK's package (find_spec imports nothing)."""
    spec = importlib.util.find_spec("sagemaker")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the SageMaker Python SDK (the sagemaker package) is not installed: its image table is")
    path = Path(spec.submodule_search_locations[0]) / "core" / "image_uri_config" / "pytorch.json"
    return json.loads(path.read_text())


@functools.cache
def _ecr_hostname(region: str) -> str:
    import botocore.loaders
    import botocore.regions

    resolver = botocore.regions.EndpointResolver(botocore.loaders.create_loader().load_data("endpoints"))
    endpoint = resolver.construct_endpoint("ecr", region)
    if region == "il-central-1" and not endpoint:  # as the SDK has it: botocore's data lacks the region
        endpoint = {"hostname": f"ecr.{region}.amazonaws.com"}
    if not endpoint:
        raise ValueError(f"Unsupported region: {region}: botocore knows no ECR endpoint there.")
    return endpoint["hostname"]


def _supported(value: str, options, what: str) -> None:
    if value not in options:
        raise ValueError(f"Unsupported {what}: {value}. Supported {what}(s): {', '.join(options)}.")


def _processor(instance_type: str, processors: list[str]) -> str:
    """cpu or gpu (or an image's own family) for ``ml.<family>.<size>``, as the SDK's ``_processor`` decides."""
    parts = instance_type.split(".")
    if len(parts) != 3 or parts[0] != "ml" or not parts[1]:
        raise ValueError(
            f"Invalid SageMaker instance type: {instance_type}. For options, see: "
            "https://aws.amazon.com/sagemaker/pricing/instance-types"
        )
    family = parts[1]
    if family in processors:
        processor = family
    elif family.startswith(("inf", "trn")):
        processor = family[:3]
    elif family[0] in ("g", "p"):
        processor = "gpu"
    else:
        processor = "cpu"
    _supported(processor, processors, "processor")
    return processor


def pytorch_image_uri(region: str, instance_type: str, scope: str = "training") -> str:
    """The SageMaker PyTorch image for ``scope`` (training or inference) on ``instance_type`` in ``region``."""
    _supported(scope, ("training", "inference"), "image scope")
    config = _table()[scope]
    version = config.get("version_aliases", {}).get(FRAMEWORK_VERSION, FRAMEWORK_VERSION)
    _supported(version, list(config["versions"]), "pytorch version")
    version_config = config["versions"][version]
    _supported(PY_VERSION, version_config["py_versions"], "Python version")
    _supported(region, list(version_config["registries"]), "region")
    processor = _processor(instance_type, config.get("processors") or version_config["processors"])
    container_version = (version_config.get("container_version") or {}).get(processor)
    tag_prefix = version_config.get("tag_prefix", FRAMEWORK_VERSION)
    if not version_config.get("processor_in_tag", True):
        processor = None
    tag = "-".join(part for part in (tag_prefix, processor, PY_VERSION, container_version) if part)
    return ECR_URI_TEMPLATE.format(
        registry=version_config["registries"][region],
        hostname=_ecr_hostname(region),
        repository=version_config["repository"],
        tag=tag,
    )
