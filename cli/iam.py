"""The IAM policies the pipeline ships (``iam/``), filled in for one account: what `mnist-pipeline iam render` prints
for AWS and what the local stack makes its principals and its bucket with.

    mnist-pipeline iam render --account ID --region R --bucket B --prefix P --role NAME [--principal ARN]
        [--topic NAME] [--policy FILE]

Each template names its blanks as ``${Name}``: the account, region, bucket, prefix, the execution role's name, the
principal Airflow runs as, the notifications' topic. A template with a blank no value fills is an error, naming it.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

IAM_DIR = Path(__file__).resolve().parents[1] / "iam"
# The shipped policies, in the order the README's AWS setup applies them.
POLICIES = {
    "sagemaker-execution-role-trust": "the execution role's trust policy (aws iam create-role --assume-role-policy-document)",
    "sagemaker-execution-role-policy": "the execution role's permissions (aws iam put-role-policy)",
    "airflow-policy": "the permissions of the principal Airflow runs as (aws iam put-user-policy or put-role-policy)",
    "bucket-policy": "the bucket's policy (aws s3api put-bucket-policy)",
}
DEFAULT_PRINCIPAL_NAME = "mnist-pipeline"
DEFAULT_TOPIC = "mnist-pipeline-alerts"
_BLANK = re.compile(r"\$\{([A-Za-z]+)\}")


@dataclasses.dataclass(frozen=True)
class Blanks:
    """What fills the templates' blanks."""

    account: str
    region: str
    bucket: str
    prefix: str
    role: str  # the execution role's name
    principal: str  # the ARN of the principal Airflow runs as
    topic: str = DEFAULT_TOPIC

    def values(self) -> dict[str, str]:
        return {
            "AccountId": self.account,
            "Region": self.region,
            "Bucket": self.bucket,
            "Prefix": self.prefix.strip("/"),
            "ExecutionRoleName": self.role,
            "PipelinePrincipalArn": self.principal,
            "AlertTopicName": self.topic,
        }


def render(name: str, blanks: Blanks) -> dict:
    """The policy ``iam/<name>.json`` with its blanks filled; ValueError naming a blank that has no value."""
    text = (IAM_DIR / f"{name}.json").read_text()
    values = blanks.values()
    unfilled = sorted({blank for blank in _BLANK.findall(text) if blank not in values})
    if unfilled:
        raise ValueError(f"iam/{name}.json: no value for {', '.join('${' + b + '}' for b in unfilled)}")
    return json.loads(_BLANK.sub(lambda match: values[match[1]], text))


def render_command(args) -> int:
    import sys

    principal = args.principal or f"arn:aws:iam::{args.account}:user/{DEFAULT_PRINCIPAL_NAME}"
    blanks = Blanks(args.account, args.region, args.bucket, args.prefix, args.role, principal, args.topic)
    try:
        if not re.fullmatch(r"\d{12}", args.account):
            raise ValueError(f"--account must be a 12-digit AWS account id, not {args.account!r}")
        names = [args.policy] if args.policy else list(POLICIES)
        unknown = [name for name in names if name not in POLICIES]
        if unknown:
            raise ValueError(f"--policy {unknown[0]!r} is not one of {', '.join(POLICIES)}")
        rendered = {name: render(name, blanks) for name in names}
    except ValueError as error:
        print(f"mnist-pipeline iam render: {error}", file=sys.stderr)
        return 2
    if args.policy:
        print(json.dumps(rendered[args.policy], indent=2))
    else:
        for name, policy in rendered.items():
            print(f"# {name}.json: {POLICIES[name]}")
            print(json.dumps(policy, indent=2))
    return 0
