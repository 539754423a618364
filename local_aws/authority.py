"""How a local stand-in for another AWS service asks the local AWS's IAM about its own callers: the two calls the
gateway answers beside the AWS APIs, and the signing name those calls are signed for. Both sides import these names
from here, a module that needs nothing but the standard library, so the local SageMaker service reaches IAM without
importing moto."""

from __future__ import annotations

SERVICE = "iam"  # the signing name of the calls below
PREFIX = "/_local/iam/"
SIGNING_KEY_PATH = PREFIX + "signing-key"  # the key derived for one day, region and service, never the secret
AUTHORIZE_PATH = PREFIX + "authorize"  # a decision on a principal's requirements, with AWS's message
