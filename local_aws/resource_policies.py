"""The resource-based policies IAM weighs beside the principal's own: a bucket's policy, a role's trust policy, a
topic's access policy, read from moto's backends where they are kept."""

from __future__ import annotations

import json

from local_aws.identities import Identities


class ResourcePolicies:
    def __init__(self, identities: Identities):
        self.identities = identities

    def get(self, kind: str, name: str) -> dict | None:
        """The policy of the ``kind`` (bucket, role, topic) resource ``name`` (a bucket's name, a role's or a topic's
        ARN); None when the resource or its policy does not exist."""
        if kind == "role":
            return self.identities.trust_policy(name)
        if kind == "bucket":
            return self._bucket(name)
        if kind == "topic":
            return self._topic(name)
        raise ValueError(f"no resource policies of kind {kind!r}")

    def _bucket(self, name: str) -> dict | None:
        from moto.s3.models import s3_backends

        bucket = s3_backends[self.identities.account]["aws"].buckets.get(name)
        if bucket is None or not bucket.policy:
            return None
        return json.loads(bucket.policy)

    def _topic(self, arn: str) -> dict | None:
        from moto.sns.models import sns_backends

        region = arn.split(":")[3] if arn.count(":") >= 5 else self.identities.region
        topic = sns_backends[self.identities.account][region].topics.get(arn)
        return topic._policy_json if topic is not None else None
