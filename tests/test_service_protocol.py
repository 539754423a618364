"""local_sagemaker.protocol against the real botocore: boto3 serializes the requests and parses the answers.

A ``before-send`` hook stands in for the HTTP server (no network): it hands the request botocore built to
``parse_request`` and returns what ``serialize_response`` / ``error_response`` make of the handler's answer, so both
ends of the contract are botocore's own code.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime

import boto3
import pytest
from botocore.awsrequest import AWSResponse, HeadersDict
from botocore.config import Config
from botocore.exceptions import ClientError
from botocore.parsers import create_parser

from local_sagemaker import protocol
from tests.helpers.jobs import s3_channel

ROLE = "arn:aws:iam::123456789012:role/SageMakerRole"
NAME_PATTERN = "[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}"
LONG_URI = "s3://mnist-bucket/" + "k" * 1009  # 1025 characters
CREATED = datetime(2024, 5, 6, 7, 8, 9, 123000, tzinfo=UTC)

TRAINING_REQUEST = {
    "TrainingJobName": "mnist-2024-05-06-07-08-09",
    "AlgorithmSpecification": {
        "TrainingImage": "763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch-training:2.3-cpu-py311",
        "TrainingInputMode": "File",
        "MetricDefinitions": [
            {"Name": "validation:accuracy", "Regex": r"val_accuracy=([0-9\.]+)"},
            {"Name": "train:loss", "Regex": r"loss=([0-9\.]+)"},
        ],
        "EnableSageMakerMetricsTimeSeries": True,
    },
    "HyperParameters": {"epochs": "3", "sagemaker_program": "train.py", "sagemaker_submit_directory": "s3://b/src.tgz"},
    "RoleArn": ROLE,
    "InputDataConfig": [
        s3_channel("train", "s3://mnist-bucket/data/train/", ContentType="application/x-npy", CompressionType="None")
    ],
    "OutputDataConfig": {"S3OutputPath": "s3://mnist-bucket/models/"},
    "ResourceConfig": {"InstanceType": "ml.m5.large", "InstanceCount": 1, "VolumeSizeInGB": 10},
    "StoppingCondition": {"MaxRuntimeInSeconds": 3600},
    "ExperimentConfig": {"ExperimentName": "mnist", "TrialName": "mnist-trial-1", "RunName": "run-1"},
    "Tags": [{"Key": "project", "Value": "mnist"}],
}


class _Raw:
    """The raw stream botocore's AWSResponse reads a body from."""

    def __init__(self, body: bytes):
        self.body = body

    def stream(self, **_):
        yield self.body


class FakeServer:
    """What an HTTP server in front of protocol.py does, as a botocore ``before-send`` handler."""

    def __init__(self, handler=None, implemented=None):
        self.handler = handler or (lambda operation, params: {})
        self.implemented = implemented
        self.requests: list[tuple[str, dict]] = []
        self.request_ids: list[str] = []

    def __call__(self, request, **_):
        headers = protocol.response_headers()
        self.request_ids.append(headers["x-amzn-RequestId"])
        try:
            target = request.headers.get("X-Amz-Target")
            operation, params = protocol.parse_request(target, request.body or b"", self.implemented)
            self.requests.append((operation, params))
            status, body = 200, protocol.serialize_response(operation, self.handler(operation, params), strict=True)
        except Exception as error:
            status, headers, body = protocol.error_response(error, headers["x-amzn-RequestId"])
        return AWSResponse(request.url, status, headers, _Raw(body))


def make_client(server: FakeServer, validate: bool = True):
    session = boto3.session.Session(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
    )
    config = Config(parameter_validation=validate, retries={"total_max_attempts": 1})
    client = session.client("sagemaker", endpoint_url="http://127.0.0.1:1", config=config)
    client.meta.events.register("before-send.sagemaker.*", server)
    return client


def client_error(call, **params) -> dict:
    with pytest.raises(ClientError) as caught:
        call(**params)
    return caught.value.response


# -- requests boto3 really sends ---------------------------------------------------------------------------------


def test_create_training_job_request_from_boto3_parses_and_validates():
    server = FakeServer(lambda op, params: {"TrainingJobArn": protocol.arn("training job", params["TrainingJobName"])})
    answer = make_client(server).create_training_job(**TRAINING_REQUEST)
    assert server.requests == [("CreateTrainingJob", TRAINING_REQUEST)]
    expected = "arn:aws:sagemaker:us-east-1:000000000000:training-job/mnist-2024-05-06-07-08-09"
    assert answer["TrainingJobArn"] == expected
    assert answer["ResponseMetadata"]["RequestId"] == server.request_ids[-1]


@pytest.mark.parametrize(
    ("method", "params"),
    [
        (
            "create_model",
            {
                "ModelName": "mnist",
                "ExecutionRoleArn": ROLE,
                "PrimaryContainer": {
                    "Image": "img:1",
                    "ModelDataUrl": "s3://b/model.tar.gz",
                    "Environment": {"SAGEMAKER_PROGRAM": "inference.py"},
                },
            },
        ),
        (
            "create_endpoint_config",
            {
                "EndpointConfigName": "mnist-cfg",
                "ProductionVariants": [
                    {
                        "VariantName": "AllTraffic",
                        "ModelName": "mnist",
                        "InitialInstanceCount": 1,
                        "InstanceType": "ml.m5.large",
                        "InitialVariantWeight": 1.0,
                    }
                ],
            },
        ),
        ("create_endpoint", {"EndpointName": "mnist", "EndpointConfigName": "mnist-cfg", "Tags": []}),
        ("update_endpoint", {"EndpointName": "mnist", "EndpointConfigName": "mnist-cfg-2"}),
        ("describe_endpoint", {"EndpointName": "mnist"}),
        ("list_endpoints", {"SortBy": "CreationTime", "SortOrder": "Descending", "MaxResults": 100}),
        ("stop_training_job", {"TrainingJobName": "mnist-1"}),
        ("delete_endpoint", {"EndpointName": "mnist"}),
    ],
)
def test_other_boto3_requests_pass_validation(method, params):
    server = FakeServer()
    getattr(make_client(server), method)(**params)
    assert server.requests[0][1] == params


def test_timestamps_in_a_request_arrive_as_utc_datetimes():
    server = FakeServer(lambda op, params: {"TrainingJobSummaries": []})
    make_client(server).list_training_jobs(CreationTimeAfter=CREATED, StatusEquals="Completed")
    params = server.requests[0][1]
    assert params == {"CreationTimeAfter": CREATED, "StatusEquals": "Completed"}
    assert params["CreationTimeAfter"].tzinfo is UTC


def test_describe_training_job_timestamps_reach_the_client_as_datetimes():
    described = {
        "TrainingJobName": "mnist-1",
        "TrainingJobArn": protocol.arn("training-job", "mnist-1"),
        "ModelArtifacts": {"S3ModelArtifacts": "s3://b/models/mnist-1/output/model.tar.gz"},
        "TrainingJobStatus": "Completed",
        "SecondaryStatus": "Completed",
        "AlgorithmSpecification": TRAINING_REQUEST["AlgorithmSpecification"],
        "StoppingCondition": {"MaxRuntimeInSeconds": 3600},
        "CreationTime": CREATED,
        "TrainingStartTime": "2024-05-06T07:09:00Z",  # an ISO string is a timestamp too
        "TrainingEndTime": datetime(2024, 5, 6, 7, 20),  # naive: UTC
        "FailureReason": None,  # dropped
        "SecondaryStatusTransitions": [{"Status": "Completed", "StartTime": CREATED, "StatusMessage": "done"}],
        "FinalMetricDataList": [{"MetricName": "validation:accuracy", "Value": 0.98, "Timestamp": CREATED}],
    }
    protocol.validate_response("DescribeTrainingJob", described)
    answer = make_client(FakeServer(lambda op, params: described)).describe_training_job(TrainingJobName="mnist-1")
    assert answer["CreationTime"] == CREATED
    assert answer["TrainingStartTime"] == datetime(2024, 5, 6, 7, 9, tzinfo=UTC)
    assert answer["TrainingEndTime"] == datetime(2024, 5, 6, 7, 20, tzinfo=UTC)
    assert answer["SecondaryStatusTransitions"][0]["StartTime"] == CREATED
    assert answer["FinalMetricDataList"][0]["Value"] == 0.98
    assert "FailureReason" not in answer


# -- server-side validation, in SageMaker's words ----------------------------------------------------------------


@pytest.fixture(scope="module")
def unchecked():
    """A client that skips botocore's own parameter validation, so invalid requests reach the server."""
    return make_client(FakeServer(lambda op, params: {"TrainingJobArn": "unused"}), validate=False)


def _with(path: str, value) -> dict:
    request = json.loads(json.dumps(TRAINING_REQUEST))
    *parents, last = path.split(".")
    node = request
    for key in parents:
        node = node[key]
    node[last] = value
    return request


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (
            "TrainingJobName",
            "bad name!",
            "Value 'bad name!' at 'trainingJobName' failed to satisfy constraint: "
            f"Member must satisfy regular expression pattern: {NAME_PATTERN}",
        ),
        # the model gives InstanceCount min 0 (it is 0 with InstanceGroups), so -1 is the first value out of range
        (
            "ResourceConfig.InstanceCount",
            -1,
            "Value '-1' at 'resourceConfig.instanceCount' failed to satisfy "
            "constraint: Member must have value greater than or equal to 0",
        ),
        (
            "StoppingCondition.MaxRuntimeInSeconds",
            0,
            "Value '0' at 'stoppingCondition.maxRuntimeInSeconds' failed "
            "to satisfy constraint: Member must have value greater than or equal to 1",
        ),
        (
            "AlgorithmSpecification.TrainingInputMode",
            "Nope",
            "Value 'Nope' at "
            "'algorithmSpecification.trainingInputMode' failed to satisfy constraint: Member must satisfy enum value "
            "set: [Pipe, File, FastFile]",
        ),
        (
            "OutputDataConfig.S3OutputPath",
            LONG_URI,
            f"Value '{LONG_URI}' at 'outputDataConfig.s3OutputPath' failed "
            "to satisfy constraint: Member must have length less than or equal to 1024",
        ),
    ],
)
def test_one_invalid_member_is_a_validation_exception_naming_it(unchecked, path, value, message):
    response = client_error(unchecked.create_training_job, **_with(path, value))
    assert response["Error"] == {"Code": "ValidationException", "Message": f"1 validation error detected: {message}"}
    assert response["ResponseMetadata"]["HTTPStatusCode"] == 400


def test_every_problem_is_named(unchecked):
    request = _with("InputDataConfig", [{"ChannelName": "no spaces", "DataSource": {}}])
    request["HyperParameters"] = {"epochs": "3" * 2501}
    request["ResourceConfig"]["InstanceType"] = "ml.nope"
    del request["RoleArn"]
    message = client_error(unchecked.create_training_job, **request)["Error"]["Message"]
    problems = message.removeprefix("4 validation errors detected: ").split("; ")
    assert [re.search(r" at '([^']*)' failed", problem).group(1) for problem in problems] == [
        "roleArn",
        "hyperParameters",
        "inputDataConfig.1.member.channelName",
        "resourceConfig.instanceType",
    ]
    assert problems[0] == "Value null at 'roleArn' failed to satisfy constraint: Member must not be null"
    assert problems[1].endswith(
        "Map value must satisfy constraint: [Member must have length less than or equal to 2500]"
    )


def test_type_errors_and_unknown_members_are_reported():
    body = json.dumps({"TrainingJobName": 7, "Bogus": True}).encode()
    with pytest.raises(protocol.ValidationException) as caught:
        protocol.parse_request("SageMaker.DescribeTrainingJob", body)
    assert caught.value.message.startswith("2 validation errors detected: ")
    assert 'Unknown parameter in input: "Bogus"' in caught.value.message
    assert "Invalid type for parameter TrainingJobName, value: 7" in caught.value.message


def test_json_nulls_are_absent_members():
    with pytest.raises(protocol.ValidationException, match="Value null at 'trainingJobName'"):
        protocol.parse_request("SageMaker.DescribeTrainingJob", b'{"TrainingJobName": null}')


@pytest.mark.parametrize(
    "target",
    [
        None,
        "",
        "SageMaker",
        "SageMaker.",
        "SageMaker.NoSuchThing",
        "sagemaker.ListEndpoints",
        "DynamoDB_20120810.ListTables",
    ],
)
def test_an_unknown_target_is_an_unknown_operation(target):
    with pytest.raises(protocol.UnknownOperationException) as caught:
        protocol.parse_request(target, b"{}")
    assert (caught.value.code, caught.value.status) == ("UnknownOperationException", 400)


@pytest.mark.parametrize("body", [b"{nope", b"[]", b'"text"', b"\xff\xfe", "{"])
def test_a_body_not_a_json_object_is_a_serialization_exception(body):
    with pytest.raises(protocol.SerializationException) as caught:
        protocol.parse_request("SageMaker.ListEndpoints", body)
    assert caught.value.status == 400


def test_an_empty_body_is_no_params():
    assert protocol.parse_request("SageMaker.ListEndpoints", b"") == ("ListEndpoints", {})


def test_an_operation_the_service_does_not_implement_is_named():
    server = FakeServer(implemented={"CreateTrainingJob", "DescribeTrainingJob"})
    response = client_error(make_client(server).describe_endpoint, EndpointName="mnist")
    assert response["Error"]["Code"] == "UnknownOperationException"
    assert "DescribeEndpoint is not supported by this local SageMaker service" in response["Error"]["Message"]


# -- errors ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "name", "message"),
    [
        ("training job", "Mnist-1", "Requested resource not found."),
        ("model", "Mnist", 'Could not find model "arn:aws:sagemaker:us-east-1:000000000000:model/mnist".'),
        (
            "endpoint config",
            "Mnist-Cfg",
            "Could not find endpoint configuration "
            '"arn:aws:sagemaker:us-east-1:000000000000:endpoint-config/mnist-cfg".',
        ),
        ("endpoint", "Mnist", 'Could not find endpoint "arn:aws:sagemaker:us-east-1:000000000000:endpoint/mnist".'),
    ],
)
def test_not_found_is_what_sagemaker_answers(kind, name, message):
    error = protocol.not_found(kind, name)
    assert (error.code, error.message, error.status) == ("ValidationException", message, 400)


def test_not_found_takes_the_services_own_arn():
    error = protocol.not_found("endpoint configuration", "Cfg", "arn:aws:sagemaker:eu-west-1:1:endpoint-config/cfg")
    assert error.message == 'Could not find endpoint configuration "arn:aws:sagemaker:eu-west-1:1:endpoint-config/cfg".'


def test_not_found_reaches_the_client_as_the_provider_expects():
    def handler(operation, params):
        raise protocol.not_found("endpoint", params["EndpointName"], region="eu-west-1", account="123456789012")

    server = FakeServer(handler)
    response = client_error(make_client(server).describe_endpoint, EndpointName="mnist")
    assert response["Error"]["Code"] == "ValidationException"  # the Amazon provider's and the SDK's check
    assert "Could not find" in response["Error"]["Message"]
    assert (
        response["Error"]["Message"]
        == 'Could not find endpoint "arn:aws:sagemaker:eu-west-1:123456789012:endpoint/mnist".'
    )
    assert response["ResponseMetadata"]["RequestId"] == server.request_ids[-1]


@pytest.mark.parametrize(
    ("error", "code", "status"),
    [
        (protocol.ResourceInUse("in use"), "ResourceInUse", 400),
        (protocol.ResourceLimitExceeded("too many"), "ResourceLimitExceeded", 400),
        (protocol.ResourceNotFound("gone"), "ResourceNotFound", 400),
        (protocol.ThrottlingException("slow down"), "ThrottlingException", 400),
        (protocol.InternalFailure("oops"), "InternalFailure", 500),
        (protocol.SageMakerError("busy", code="ConflictException"), "ConflictException", 400),
        (RuntimeError("a handler bug"), "InternalFailure", 500),
    ],
)
def test_error_response_is_what_botocores_json_parser_reads(error, code, status):
    status_code, headers, body = protocol.error_response(error, "req-1")
    assert status_code == status
    assert headers == {
        "Content-Type": "application/x-amz-json-1.1",
        "x-amzn-RequestId": "req-1",
        "x-amzn-ErrorType": code,
    }
    output_shape = protocol.operation_model("DescribeEndpoint").output_shape
    raw = {"status_code": status, "headers": HeadersDict(headers), "body": body}  # as botocore hands it over
    parsed = create_parser("json").parse(raw, output_shape)
    assert parsed["Error"]["Code"] == code
    assert parsed["Error"]["Message"] == getattr(error, "message", "RuntimeError: a handler bug")
    assert parsed["ResponseMetadata"]["RequestId"] == "req-1"


def test_a_modelled_error_is_raised_as_the_clients_exception_class():
    def handler(operation, params):
        raise protocol.ResourceLimitExceeded(
            "The account-level service limit 'ml.m5.large for training job usage' is 0"
        )

    client = make_client(FakeServer(handler))
    with pytest.raises(client.exceptions.ResourceLimitExceeded, match="service limit"):
        client.create_training_job(**TRAINING_REQUEST)


# -- responses ---------------------------------------------------------------------------------------------------


def test_serialize_response_keeps_only_model_members_and_strict_names_the_stray_one():
    answer = {
        "EndpointName": "mnist",
        "EndpointStatus": "InService",
        "Internal": {"pid": 1},
        "ProductionVariants": [{"VariantName": "AllTraffic", "CurrentWeight": 1.0, "Process": 7}],
    }
    body = json.loads(protocol.serialize_response("DescribeEndpoint", answer))
    assert body == {
        "EndpointName": "mnist",
        "EndpointStatus": "InService",
        "ProductionVariants": [{"VariantName": "AllTraffic", "CurrentWeight": 1.0}],
    }
    with pytest.raises(ValueError, match=r"^Internal: not a member of DescribeEndpointOutput"):
        protocol.serialize_response("DescribeEndpoint", answer, strict=True)
    del answer["Internal"]
    with pytest.raises(
        ValueError, match=r"^ProductionVariants\[0\]\.Process: not a member of ProductionVariantSummary"
    ):
        protocol.serialize_response("DescribeEndpoint", answer, strict=True)


def test_serialize_response_writes_timestamps_as_epoch_seconds():
    body = protocol.serialize_response("CreateTrainingJob", {"TrainingJobArn": "a"})
    assert body == b'{"TrainingJobArn":"a"}'
    summary = {"TrainingJobName": "a", "TrainingJobArn": "b", "TrainingJobStatus": "Completed", "CreationTime": CREATED}
    listed = json.loads(protocol.serialize_response("ListTrainingJobs", {"TrainingJobSummaries": [summary]}))
    assert listed["TrainingJobSummaries"][0]["CreationTime"] == CREATED.timestamp()


def test_validate_response_catches_what_the_model_forbids():
    valid = {
        "EndpointName": "mnist",
        "EndpointArn": protocol.arn("endpoint", "mnist"),
        "EndpointStatus": "InService",
        "CreationTime": CREATED,
        "LastModifiedTime": CREATED,
    }
    protocol.validate_response("DescribeEndpoint", valid)
    with pytest.raises(ValueError, match=r"Value null at 'endpointArn'"):
        protocol.validate_response("DescribeEndpoint", {**valid, "EndpointArn": None})
    with pytest.raises(ValueError, match=r"Value 'Running' at 'endpointStatus' .* enum value set"):
        protocol.validate_response("DescribeEndpoint", {**valid, "EndpointStatus": "Running"})
    with pytest.raises(ValueError, match=r"Pid: not a member"):
        protocol.validate_response("DescribeEndpoint", {**valid, "Pid": 1})


def test_the_model():
    assert {"CreateTrainingJob", "DescribeEndpoint", "ListTrainingJobs"} <= protocol.operation_names()
    assert protocol.operation_model("CreateTrainingJob").input_shape.name == "CreateTrainingJobRequest"
    with pytest.raises(protocol.UnknownOperationException):
        protocol.operation_model("InvokeEndpoint")  # the runtime's, not the control plane's
