"""Tags: AddTags, ListTags and DeleteTags on any resource the service keeps, found by its ARN.

Create* requests keep their ``Tags`` in the record (Describe* leaves them out, as SageMaker does); these calls
read and change them. A tag is metadata in SageMaker itself: changing it takes ``sagemaker:AddTags`` on the
resource, not write access to a bucket.
"""

from __future__ import annotations

from local_sagemaker.listing import page
from local_sagemaker.protocol import ValidationException
from local_sagemaker.store import Store

# The field that holds each kind's ARN.
ARN_FIELDS = {
    "training-jobs": "TrainingJobArn",
    "models": "ModelArn",
    "endpoint-configs": "EndpointConfigArn",
    "endpoints": "EndpointArn",
    "experiments": "ExperimentArn",
    "trials": "TrialArn",
    "trial-components": "TrialComponentArn",
    "model-package-groups": "ModelPackageGroupArn",
    "model-packages": "ModelPackageArn",
    "transform-jobs": "TransformJobArn",
    "hyper-parameter-tuning-jobs": "HyperParameterTuningJobArn",
}
MAX_TAGS = 50


def untagged(record: dict) -> dict:
    """``record`` as Describe* answers it: without its tags, which ListTags answers."""
    record.pop("Tags", None)
    return record


class Tags:
    def __init__(self, store: Store):
        self.store = store

    def _find(self, arn: str) -> tuple[str, str, dict]:
        """(kind, record key, record) of the resource ``arn`` names; SageMaker's error when there is none."""
        wanted = arn.lower()
        for kind, field in ARN_FIELDS.items():
            for key in self.store.names(kind):
                record = self.store.get(kind, key)
                if record is not None and str(record.get(field, "")).lower() == wanted:
                    return kind, key, record
        raise ValidationException(f"Resource {arn} does not exist.")

    def add(self, request: dict) -> dict:
        new = request["Tags"]
        with self.store.lock:
            kind, key, record = self._find(request["ResourceArn"])
            tags = {tag["Key"]: tag["Value"] for tag in record.get("Tags") or []}
            tags.update({tag["Key"]: tag.get("Value", "") for tag in new})
            if len(tags) > MAX_TAGS:
                raise ValidationException(f"A resource may have at most {MAX_TAGS} tags; this would have {len(tags)}")
            self.store.update(kind, key, Tags=[{"Key": k, "Value": v} for k, v in tags.items()])
        return {"Tags": new}

    def list(self, params: dict) -> dict:
        _, _, record = self._find(params["ResourceArn"])
        tags = [{**tag, "Index": index} for index, tag in enumerate(record.get("Tags") or [])]
        params = {**params, "MaxResults": params.get("MaxResults") or MAX_TAGS}
        shown, token = page(tags, params, {"Index": "Index"}, default_sort="Index")
        return {"Tags": [{"Key": t["Key"], "Value": t["Value"]} for t in shown]} | (
            {"NextToken": token} if token else {}
        )

    def delete(self, request: dict) -> dict:
        with self.store.lock:
            kind, key, record = self._find(request["ResourceArn"])
            gone = set(request["TagKeys"])
            self.store.update(kind, key, Tags=[tag for tag in record.get("Tags") or [] if tag["Key"] not in gone])
        return {}
