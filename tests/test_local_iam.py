"""Every call to the local stack is signed and authorized as on AWS: the local AWS (S3, CloudWatch, CloudWatch Logs,
SNS, STS, IAM) and the local SageMaker service, control plane and runtime, with the pipeline's shipped policies.

A local AWS and a SageMaker service of this module's own, with the principals a stack has: the administrator, the
pipeline's user (iam/airflow-policy.json for the bucket `mnist-pipeline`, prefix `mnist-sweep`), the execution role
(its shipped trust and permissions) and the SageMaker service's credential; the bucket with iam/bucket-policy.json.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import time
import urllib.request
from urllib.parse import urlsplit

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from cli.local_aws import Key, connection_uri, setup_bucket
from tests.conftest import KEYS
from tests.helpers.signing import raw_request, unsigned_control_plane_answer

BUCKET, PREFIX = "mnist-pipeline", "mnist-sweep"
ROLE = "arn:aws:iam::000000000000:role/mnist-pipeline-sagemaker"
PIPELINE = "arn:aws:iam::000000000000:user/mnist-pipeline"
NO_RETRIES = Config(retries={"total_max_attempts": 1}, signature_version="s3v4")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """The module's local AWS and SageMaker service, the bucket made and its policy set by the administrator."""
    import json as json_module

    from cli.iam import render
    from cli.local_aws import principals, stack_blanks, start_local_aws, write_private
    from local_sagemaker import launch
    from tasks.config import load_config

    directory = tmp_path_factory.mktemp("local-iam")
    blanks = stack_blanks(
        region="us-east-1", bucket=BUCKET, prefix=PREFIX, role_arn=ROLE, topic="mnist-pipeline-alerts"
    )
    spec = principals(KEYS, blanks)
    spec["roles"].append(
        {
            "name": "trusts-nobody",
            "trust": {
                "Version": "2012-10-17",
                "Statement": [
                    {
                        "Effect": "Allow",
                        "Principal": {"AWS": "arn:aws:iam::000000000000:root"},
                        "Action": "sts:AssumeRole",
                    }
                ],
            },
            "policies": {"all": render("sagemaker-execution-role-policy", blanks)},
        }
    )
    write_private(directory / "principals.json", spec)
    process, aws = start_local_aws(
        directory / "principals.json", log_path=directory / "local-aws.log", decision_log=directory / "decisions.jsonl"
    )
    try:
        setup_bucket(aws, KEYS.admin, load_config(bucket=BUCKET, prefix=PREFIX, role_arn=ROLE))
        started = launch.start(
            directory / "sagemaker", aws, credentials=KEYS.sagemaker.environment(), cpus=1, metrics_interval=1
        )
        try:
            yield {
                "aws": aws,
                "sagemaker": started.url,
                "runtime": started.runtime_url,
                "dir": directory,
                "bucket_policy": json_module.dumps(render("bucket-policy", blanks)),
            }
        finally:
            launch.stop(started.record)
    finally:
        process.terminate()
        process.wait()


def client(service: str, endpoint: str, key: Key = KEYS.pipeline, token: str | None = None):
    return boto3.client(
        service,
        endpoint_url=endpoint,
        region_name="us-east-1",
        config=NO_RETRIES,
        aws_access_key_id=key.access_key_id,
        aws_secret_access_key=key.secret_access_key,
        aws_session_token=token,
    )


def error(caught) -> tuple[str, str]:
    return caught.value.response["Error"]["Code"], caught.value.response["Error"]["Message"]


def role_session(stack) -> dict:
    """The execution role's credentials, as the SageMaker service gets them: STS as the service, for this account."""
    sts = client("sts", stack["aws"], KEYS.sagemaker)
    sts.meta.events.register(
        "before-sign.sts.AssumeRole",
        lambda request, **_: request.headers.__setitem__("x-amz-source-account", "000000000000"),
    )
    return sts.assume_role(RoleArn=ROLE, RoleSessionName="test")["Credentials"]


# -- authentication ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("service", "call", "code"),
    [
        ("s3", lambda c: c.list_objects_v2(Bucket=BUCKET, Prefix=f"{PREFIX}/"), "SignatureDoesNotMatch"),
        ("sts", lambda c: c.get_caller_identity(), "SignatureDoesNotMatch"),
        ("logs", lambda c: c.describe_log_groups(), "InvalidSignatureException"),
        ("cloudwatch", lambda c: c.list_metrics(), "SignatureDoesNotMatch"),
        ("sns", lambda c: c.list_topics(), "SignatureDoesNotMatch"),
        ("iam", lambda c: c.list_users(), "SignatureDoesNotMatch"),
        ("sagemaker", lambda c: c.list_endpoints(), "InvalidSignatureException"),
    ],
)
def test_a_wrong_secret_is_refused_in_each_services_own_words(stack, service, call, code):
    endpoint = stack["sagemaker"] if service == "sagemaker" else stack["aws"]
    with pytest.raises(ClientError) as caught:
        call(client(service, endpoint, Key(KEYS.pipeline.access_key_id, "not-the-secret")))
    assert error(caught)[0] == code
    assert "The request signature we calculated does not match the signature you provided" in error(caught)[1]


def test_an_unknown_key_is_refused(stack):
    stranger = Key("AKIAUNKNOWN000000000", "whatever")
    with pytest.raises(ClientError) as caught:
        client("s3", stack["aws"], stranger).list_buckets()
    assert error(caught)[0] == "InvalidAccessKeyId"
    with pytest.raises(ClientError) as caught:
        client("sagemaker", stack["sagemaker"], stranger).list_endpoints()
    assert error(caught) == ("UnrecognizedClientException", "The security token included in the request is invalid.")
    with pytest.raises(ClientError) as caught:
        client("sts", stack["aws"], stranger).get_caller_identity()
    assert error(caught)[0] == "InvalidClientTokenId"


def test_a_missing_signature_is_refused(stack):
    # Unsigned: the control plane answers MissingAuthenticationToken; S3 takes it as anonymous, and the bucket's
    # policy allows an anonymous caller nothing.
    assert unsigned_control_plane_answer(stack["sagemaker"]) == (403, "MissingAuthenticationTokenException")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{stack['aws']}/{BUCKET}/{PREFIX}/anything", timeout=10)
    assert refused.value.code == 403 and b"<Code>AccessDenied</Code>" in refused.value.read()


def test_the_runtime_refuses_what_is_not_signed_by_a_known_key(stack):
    target = urlsplit(stack["runtime"])
    headers = {"Host": target.netloc, "Content-Type": "application/json"}
    for request, code in (
        (
            b"POST /endpoints/x/invocations HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n{}",
            "MissingAuthenticationTokenException",
        ),
        (
            raw_request("POST", "/endpoints/x/invocations", headers, b"{}", key=Key("AKIAUNKNOWN000000000", "x")),
            "UnrecognizedClientException",
        ),
        (
            raw_request("POST", "/endpoints/x/invocations", headers, b"{}", key=Key(KEYS.pipeline.access_key_id, "x")),
            "InvalidSignatureException",
        ),
    ):
        connection = http.client.HTTPConnection(target.hostname, target.port, timeout=10)
        connection.sock = __import__("socket").create_connection((target.hostname, target.port), timeout=10)
        connection.sock.sendall(request)
        answer = http.client.HTTPResponse(connection.sock)
        answer.begin()
        assert (answer.status, answer.getheader("x-amzn-ErrorType")) == (403, f"{code}:"), answer.read()
        connection.close()


def test_a_body_other_than_the_one_signed_or_declared_is_refused_and_nothing_is_stored(stack):
    s3 = client("s3", stack["aws"])
    key = f"{PREFIX}/runs/checksums.json"
    wrong = base64.b64encode(hashlib.sha256(b"another body").digest()).decode()
    with pytest.raises(ClientError) as caught:
        s3.put_object(Bucket=BUCKET, Key=key, Body=b"the body", ChecksumSHA256=wrong)
    assert error(caught) == ("BadDigest", "The SHA256 you specified did not match the calculated checksum.")
    with pytest.raises(ClientError) as caught:
        s3.put_object(Bucket=BUCKET, Key=key, Body=b"the body", ContentMD5=base64.b64encode(b"0" * 16).decode())
    assert error(caught)[0] == "BadDigest"
    with pytest.raises(ClientError) as caught:
        s3.head_object(Bucket=BUCKET, Key=key)
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404


def test_presigned_urls_work_and_expire(stack):
    s3 = client("s3", stack["aws"])
    key = f"{PREFIX}/runs/presigned.txt"
    s3.put_object(Bucket=BUCKET, Key=key, Body=b"shared")
    url = s3.generate_presigned_url("get_object", Params={"Bucket": BUCKET, "Key": key}, ExpiresIn=60)
    assert urllib.request.urlopen(url, timeout=10).read() == b"shared"
    with pytest.raises(urllib.error.HTTPError) as tampered:
        urllib.request.urlopen(url.replace("presigned.txt", "presigned.txx"), timeout=10)
    assert tampered.value.code == 403 and b"SignatureDoesNotMatch" in tampered.value.read()
    expired = s3.generate_presigned_url("get_object", Params={"Bucket": BUCKET, "Key": key}, ExpiresIn=1)
    time.sleep(2)
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(expired, timeout=10)
    assert refused.value.code == 403 and b"Request has expired" in refused.value.read()


def test_a_session_signs_only_with_its_own_token(stack):
    credentials = role_session(stack)
    key = Key(credentials["AccessKeyId"], credentials["SecretAccessKey"])
    sts = client("sts", stack["aws"], key, credentials["SessionToken"])
    assert sts.get_caller_identity()["Arn"] == "arn:aws:sts::000000000000:assumed-role/mnist-pipeline-sagemaker/test"
    with pytest.raises(ClientError) as caught:
        client("sts", stack["aws"], key).get_caller_identity()
    assert error(caught)[0] == "InvalidClientTokenId"
    with pytest.raises(ClientError) as caught:
        client("s3", stack["aws"], key, "not-its-token").list_objects_v2(Bucket=BUCKET, Prefix=f"{PREFIX}/code/")
    assert error(caught)[0] == "InvalidToken"


# -- authorization -------------------------------------------------------------------------------------------------


def test_the_pipeline_reads_and_writes_only_under_its_prefix(stack):
    s3 = client("s3", stack["aws"])
    s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/runs/mine/report.md", Body=b"# report")
    assert s3.get_object(Bucket=BUCKET, Key=f"{PREFIX}/runs/mine/report.md")["Body"].read() == b"# report"
    assert s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{PREFIX}/runs/mine/")["KeyCount"] == 1
    client("s3", stack["aws"], KEYS.admin).put_object(Bucket=BUCKET, Key="elsewhere/secret", Body=b"not yours")
    with pytest.raises(ClientError) as caught:
        s3.get_object(Bucket=BUCKET, Key="elsewhere/secret")
    assert error(caught) == (
        "AccessDenied",
        f"User: {PIPELINE} is not authorized to perform: s3:GetObject on resource: "
        f'"arn:aws:s3:::{BUCKET}/elsewhere/secret" because no identity-based policy allows the '
        "s3:GetObject action",
    )
    with pytest.raises(ClientError) as caught:
        s3.list_objects_v2(Bucket=BUCKET, Prefix="elsewhere/")
    assert error(caught)[0] == "AccessDenied" and "s3:ListBucket" in error(caught)[1]


def test_the_pipeline_passes_only_the_execution_role_and_nothing_is_started_otherwise(stack):
    sagemaker = client("sagemaker", stack["sagemaker"])
    request = {
        "ModelName": "passes-another-role",
        "PrimaryContainer": {
            "Image": "pytorch-inference",
            "ModelDataUrl": f"s3://{BUCKET}/{PREFIX}/models/x/model.tar.gz",
        },
    }
    other = "arn:aws:iam::000000000000:role/trusts-nobody"
    with pytest.raises(ClientError) as caught:
        sagemaker.create_model(**request, ExecutionRoleArn=other)
    assert error(caught) == (
        "AccessDeniedException",
        f"User: {PIPELINE} is not authorized to perform: iam:PassRole on "
        f"resource: {other} because no identity-based policy allows the iam:PassRole action",
    )
    with pytest.raises(ClientError):
        sagemaker.describe_model(ModelName="passes-another-role")  # nothing was made

    # The administrator may pass any role, but SageMaker can assume only one that trusts it: refused at once.
    with pytest.raises(ClientError) as caught:
        client("sagemaker", stack["sagemaker"], KEYS.admin).create_model(**request, ExecutionRoleArn=other)
    assert error(caught)[0] == "ValidationException"
    assert f"Could not assume role {other}" in error(caught)[1] and "sagemaker.amazonaws.com" in error(caught)[1]

    sagemaker.create_model(**{**request, "ModelName": "passes-its-role"}, ExecutionRoleArn=ROLE)
    assert sagemaker.describe_model(ModelName="passes-its-role")["ExecutionRoleArn"] == ROLE


def test_nobody_assumes_the_execution_role_but_sagemaker_for_this_account(stack):
    with pytest.raises(ClientError) as caught:
        client("sts", stack["aws"], KEYS.admin).assume_role(RoleArn=ROLE, RoleSessionName="admin")
    assert error(caught)[0] == "AccessDenied" and "sts:AssumeRole" in error(caught)[1]
    sts = client("sts", stack["aws"], KEYS.sagemaker)
    sts.meta.events.register(
        "before-sign.sts.AssumeRole",
        lambda request, **_: request.headers.__setitem__("x-amz-source-account", "111111111111"),
    )
    with pytest.raises(ClientError) as caught:
        sts.assume_role(RoleArn=ROLE, RoleSessionName="another-account")
    assert error(caught)[0] == "AccessDenied" and "because no resource-based policy allows" in error(caught)[1]


def test_an_explicit_deny_wins_and_iam_changes_take_effect(stack):
    iam = client("iam", stack["aws"], KEYS.admin)
    deny = {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Deny", "Action": "s3:GetObject", "Resource": f"arn:aws:s3:::{BUCKET}/{PREFIX}/runs/*"}
        ],
    }
    s3 = client("s3", stack["aws"])
    s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/runs/denied.txt", Body=b"x")
    assert s3.get_object(Bucket=BUCKET, Key=f"{PREFIX}/runs/denied.txt")["Body"].read() == b"x"
    iam.put_user_policy(UserName="mnist-pipeline", PolicyName="deny-runs", PolicyDocument=json.dumps(deny))
    try:
        with pytest.raises(ClientError) as caught:
            s3.get_object(Bucket=BUCKET, Key=f"{PREFIX}/runs/denied.txt")
        assert error(caught)[1].endswith("with an explicit deny in an identity-based policy")
    finally:
        iam.delete_user_policy(UserName="mnist-pipeline", PolicyName="deny-runs")
    assert s3.get_object(Bucket=BUCKET, Key=f"{PREFIX}/runs/denied.txt")["Body"].read() == b"x"


# -- the bucket's policy ---------------------------------------------------------------------------------------------


def test_content_addressed_objects_are_written_once_never_replaced_or_deleted(stack):
    s3 = client("s3", stack["aws"])
    key = f"{PREFIX}/code/{'a' * 64}/sourcedir.tar.gz"
    with pytest.raises(ClientError) as caught:
        s3.put_object(Bucket=BUCKET, Key=key, Body=b"code")  # not conditional: refused
    assert error(caught)[1].endswith("with an explicit deny in a resource-based policy")
    s3.put_object(Bucket=BUCKET, Key=key, Body=b"code", IfNoneMatch="*")
    with pytest.raises(ClientError) as caught:
        s3.put_object(Bucket=BUCKET, Key=key, Body=b"other code", IfNoneMatch="*")
    assert error(caught)[0] == "PreconditionFailed"
    with pytest.raises(ClientError) as caught:
        s3.delete_object(Bucket=BUCKET, Key=key)
    assert error(caught)[0] == "AccessDenied"
    admin = client("s3", stack["aws"], KEYS.admin)
    with pytest.raises(ClientError):  # not even the account's administrator
        admin.delete_object(Bucket=BUCKET, Key=key)
    assert s3.get_object(Bucket=BUCKET, Key=key)["Body"].read() == b"code"


def test_only_the_role_writes_job_outputs_and_it_writes_nothing_else(stack):
    outputs = f"{PREFIX}/training-jobs/job/output/model.tar.gz"
    with pytest.raises(ClientError) as caught:
        client("s3", stack["aws"]).put_object(Bucket=BUCKET, Key=outputs, Body=b"planted")
    assert error(caught)[1].endswith("with an explicit deny in a resource-based policy")
    credentials = role_session(stack)
    role = client(
        "s3", stack["aws"], Key(credentials["AccessKeyId"], credentials["SecretAccessKey"]), credentials["SessionToken"]
    )
    role.put_object(Bucket=BUCKET, Key=outputs, Body=b"the job's model")
    with pytest.raises(ClientError) as caught:
        role.put_object(Bucket=BUCKET, Key=f"{PREFIX}/runs/r/report.md", Body=b"not the role's")
    assert error(caught)[0] == "AccessDenied"
    with pytest.raises(ClientError):  # the administrator writes nothing under the prefix either
        client("s3", stack["aws"], KEYS.admin).put_object(Bucket=BUCKET, Key=f"{PREFIX}/runs/x", Body=b"x")


def test_the_connection_the_stack_writes_signs_as_the_pipeline(stack):
    connection = json.loads(
        connection_uri(
            stack["aws"], KEYS.pipeline, sagemaker_endpoint=stack["sagemaker"], runtime_endpoint=stack["runtime"]
        )
    )
    assert (connection["login"], connection["password"]) == (
        KEYS.pipeline.access_key_id,
        KEYS.pipeline.secret_access_key,
    )


def test_moto_s_own_api_is_not_served(stack):
    for path in ("/moto-api/", "/moto-api/data.json", "/moto-api/reset"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(
                urllib.request.Request(f"{stack['aws']}{path}", method="POST" if "reset" in path else "GET"), timeout=10
            )
        assert refused.value.code == 404


def test_every_decision_is_logged_with_its_reasons(stack):
    decisions = [json.loads(line) for line in (stack["dir"] / "decisions.jsonl").read_text().splitlines()]
    refused = [d for d in decisions if d["result"] != "Allowed"]
    assert refused and all(d["denials"] for d in refused)
    allowed = [d for d in decisions if d["result"] == "Allowed" and d["principal"]["arn"] == PIPELINE]
    assert allowed and all(
        grant["policyIdentifier"] == "user/mnist-pipeline/airflow-policy" for d in allowed for grant in d["grants"]
    )


# -- IAM's policy simulator ------------------------------------------------------------------------------------------


def simulate(stack, key: Key = KEYS.admin, **request) -> list[dict]:
    answer = client("iam", stack["aws"], key).simulate_principal_policy(**request)
    assert answer["IsTruncated"] is False
    return answer["EvaluationResults"]


def test_the_policy_simulator_answers_with_the_policies_the_stack_enforces(stack):
    """What the SDK's ModelTrainer asks before it stages code: may the role put objects anywhere in the bucket? The
    name `bucket/*` is read as AWS reads it, literally: the execution role may write under its prefix only."""
    [result] = simulate(
        stack,
        PolicySourceArn=ROLE,
        ActionNames=["s3:PutObject"],
        ResourceArns=[
            f"arn:aws:s3:::{BUCKET}/*",
            f"arn:aws:s3:::{BUCKET}/{PREFIX}/training-jobs/job/output/model.tar.gz",
        ],
    )
    role_policy = {"SourcePolicyId": "sagemaker-execution-role-policy", "SourcePolicyType": "role"}
    assert (result["EvalActionName"], result["EvalResourceName"], result["EvalDecision"]) == (
        "s3:PutObject",
        "arn:${Partition}:s3:::${BucketName}/${ObjectName}",
        "implicitDeny",
    )
    assert [(r["EvalResourceDecision"], r["MatchedStatements"]) for r in result["ResourceSpecificResults"]] == [
        ("implicitDeny", []),
        ("allowed", [role_policy]),
    ]

    # The same reading where the stack enforces it: a key named `*` is not under the pipeline's prefix.
    [result] = simulate(
        stack,
        PolicySourceArn=PIPELINE,
        ActionNames=["s3:PutObject"],
        ResourceArns=[f"arn:aws:s3:::{BUCKET}/*", f"arn:aws:s3:::{BUCKET}/{PREFIX}/runs/a*b"],
    )
    assert [r["EvalResourceDecision"] for r in result["ResourceSpecificResults"]] == ["implicitDeny", "allowed"]
    s3 = client("s3", stack["aws"])
    with pytest.raises(ClientError) as caught:
        s3.put_object(Bucket=BUCKET, Key="*", Body=b"outside the prefix")
    assert error(caught)[0] == "AccessDenied"
    s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/runs/a*b", Body=b"inside it")

    # No resources: `*`, which only a statement on every resource matches; a condition's key the request does not
    # give is missing, and with it the statement applies.
    results = simulate(stack, PolicySourceArn=ROLE, ActionNames=["s3:GetObject", "cloudwatch:PutMetricData"])
    assert [(r["EvalResourceName"], r["EvalDecision"], r["MissingContextValues"]) for r in results] == [
        ("*", "implicitDeny", []),
        ("*", "implicitDeny", ["cloudwatch:namespace"]),
    ]
    namespace = {
        "ContextKeyName": "cloudwatch:namespace",
        "ContextKeyValues": ["AWS/SageMaker"],
        "ContextKeyType": "string",
    }
    [result] = simulate(
        stack, PolicySourceArn=ROLE, ActionNames=["cloudwatch:PutMetricData"], ContextEntries=[namespace]
    )
    assert (result["EvalDecision"], result["MatchedStatements"], result["MissingContextValues"]) == (
        "allowed",
        [role_policy],
        [],
    )


REPORT = f"arn:aws:s3:::{BUCKET}/{PREFIX}/runs/report.md"


def deny_reading_the_report(**principal) -> str:
    """A policy that denies getting REPORT (to ``principal``, where given: a resource policy names one)."""
    statement = {"Effect": "Deny", "Action": "s3:GetObject", "Resource": REPORT, **principal}
    return json.dumps({"Version": "2012-10-17", "Statement": [statement]})


def pipeline_reading_the_report(stack, **policies) -> dict:
    """The simulator's answer to whether the pipeline may get REPORT, weighing ``policies`` too."""
    [result] = simulate(
        stack, PolicySourceArn=PIPELINE, ActionNames=["s3:GetObject"], ResourceArns=[REPORT], **policies
    )
    return result


def test_the_policy_simulator_weighs_a_resource_policy(stack):
    result = pipeline_reading_the_report(stack, ResourcePolicy=deny_reading_the_report(Principal={"AWS": PIPELINE}))
    assert (result["EvalDecision"], result["MatchedStatements"]) == (
        "explicitDeny",
        [{"SourcePolicyId": "ResourcePolicy", "SourcePolicyType": "resource"}],
    )


def test_the_policy_simulator_weighs_given_policies(stack):
    result = pipeline_reading_the_report(stack, PolicyInputList=[deny_reading_the_report()])
    assert (result["EvalDecision"], result["MatchedStatements"]) == (
        "explicitDeny",
        [{"SourcePolicyId": "PolicyInputList.1", "SourcePolicyType": "none"}],
    )


def test_the_policy_simulator_weighs_permissions_boundaries(stack):
    # A permissions boundary that does not allow the action caps what the identity's policies allow.
    listing = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:ListBucket", "Resource": "*"}]}
    result = pipeline_reading_the_report(stack, PermissionsBoundaryPolicyInputList=[json.dumps(listing)])
    assert (result["EvalDecision"], result["PermissionsBoundaryDecisionDetail"]) == (
        "implicitDeny",
        {"AllowedByPermissionsBoundary": False},
    )


def test_the_policy_simulator_refuses_what_iam_refuses(stack):
    iam = client("iam", stack["aws"], KEYS.admin)
    for source, answer in (
        ("arn:aws:iam::000000000000:role/absent", ("NoSuchEntity", "The role with name absent cannot be found.")),
        (
            "arn:aws:sts::000000000000:assumed-role/mnist-pipeline-sagemaker/test",
            (
                "InvalidInput",
                "Invalid Entity Arn: arn:aws:sts::000000000000:assumed-role/mnist-pipeline-sagemaker/test",
            ),
        ),
    ):
        with pytest.raises(ClientError) as caught:
            iam.simulate_principal_policy(PolicySourceArn=source, ActionNames=["s3:GetObject"])
        assert error(caught) == answer
    with pytest.raises(ClientError) as caught:
        iam.simulate_principal_policy(
            PolicySourceArn=ROLE,
            ActionNames=["s3:GetObject"],
            ContextEntries=[
                {"ContextKeyName": "aws:SourceIp", "ContextKeyValues": ["not an address"], "ContextKeyType": "ip"}
            ],
        )
    assert error(caught)[0] == "InvalidInput" and "aws:SourceIp" in error(caught)[1]
    maybe = {"Version": "2012-10-17", "Statement": [{"Effect": "Maybe", "Action": "s3:*", "Resource": "*"}]}
    with pytest.raises(ClientError) as caught:
        iam.simulate_principal_policy(
            PolicySourceArn=ROLE, ActionNames=["s3:GetObject"], PolicyInputList=[json.dumps(maybe)]
        )
    assert error(caught)[0] == "InvalidInput" and "Statement[0].Effect" in error(caught)[1]

    # The caller must itself be allowed to simulate the principal's policies: the pipeline's user is not.
    with pytest.raises(ClientError) as caught:
        client("iam", stack["aws"]).simulate_principal_policy(PolicySourceArn=ROLE, ActionNames=["s3:GetObject"])
    assert error(caught) == (
        "AccessDenied",
        f"User: {PIPELINE} is not authorized to perform: iam:SimulatePrincipalPolicy on resource: {ROLE} because no "
        "identity-based policy allows the iam:SimulatePrincipalPolicy action",
    )


def test_the_sdks_role_check_is_answered_as_on_aws(stack, monkeypatch):
    """ModelTrainer(role=...) validates the role first (sagemaker.core's resolve_and_validate_role): it simulates the
    actions a training role needs on every resource. The shipped execution role lacks most (ECR, VPC networking, and
    PutMetricData outside a namespace), as it would on AWS; a role that has them passes; and a caller that may not
    simulate (the pipeline's user) gets the role back unverified."""
    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL_IAM", stack["aws"])
    from sagemaker.core.helper.iam_role_resolver import RoleValidationError, resolve_and_validate_role
    from sagemaker.core.helper.session_helper import Session

    def session(key: Key) -> Session:
        return Session(
            boto_session=boto3.Session(
                aws_access_key_id=key.access_key_id,
                aws_secret_access_key=key.secret_access_key,
                region_name="us-east-1",
            )
        )

    with pytest.raises(RoleValidationError, match="Missing permissions: cloudwatch:PutMetricData, ec2:"):
        resolve_and_validate_role(provided_role=ROLE, role_type="training", sagemaker_session=session(KEYS.admin))
    assert resolve_and_validate_role(provided_role=ROLE, sagemaker_session=session(KEYS.pipeline)) == ROLE

    iam = client("iam", stack["aws"], KEYS.admin)
    trust = {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Principal": {"Service": "sagemaker.amazonaws.com"}, "Action": "sts:AssumeRole"}
        ],
    }
    needs = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Resource": "*",
                "Action": [
                    "ecr:GetAuthorizationToken",
                    "cloudwatch:PutMetricData",
                    "ec2:CreateNetworkInterface*",
                    "ec2:DeleteNetworkInterface*",
                    "ec2:Describe*",
                ],
            }
        ],
    }
    arn = iam.create_role(RoleName="sdk-training", AssumeRolePolicyDocument=json.dumps(trust))["Role"]["Arn"]
    try:
        iam.put_role_policy(RoleName="sdk-training", PolicyName="training", PolicyDocument=json.dumps(needs))
        assert resolve_and_validate_role(provided_role=arn, sagemaker_session=session(KEYS.admin)) == arn
    finally:
        iam.delete_role_policy(RoleName="sdk-training", PolicyName="training")
        iam.delete_role(RoleName="sdk-training")
