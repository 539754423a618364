"""Endpoints on the local SageMaker service, through boto3: real model servers, blue/green under load, traffic
shifting guarded by alarms, failures that leave the old config serving, and a restart that keeps them all."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import socket
import sys
import threading
import time

import boto3
import numpy as np
import psutil
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from tests.conftest import EXECUTION_ROLE
from tests.helpers.endpoints import model_and_config, model_artifacts, pack
from tests.helpers.polling import wait_until
from tests.helpers.signing import raw_request
from training.mnist_idx import load_mnist

BUCKET = "service-endpoints"
ROLE = EXECUTION_ROLE


@pytest.fixture(scope="module")
def sagemaker(local_sagemaker, local_aws, small_mnist, tmp_path_factory):
    """Models in the service for a trained artifact, a wrong one, one whose handler raises, and one that is no
    archive; an endpoint config of each."""
    built = model_artifacts(small_mnist, tmp_path_factory.getbasetemp() / "model-artifacts")
    s3 = boto3.client("s3", endpoint_url=local_aws)
    s3.create_bucket(Bucket=BUCKET)
    client = boto3.client("sagemaker", endpoint_url=local_sagemaker)
    packed = tmp_path_factory.mktemp("service-endpoint-artifacts")
    for kind in ("good", "shuffled", "raising"):
        s3.upload_file(str(pack(built[kind], packed / f"{kind}.tar.gz")), BUCKET, f"{kind}/model.tar.gz")
    s3.put_object(Bucket=BUCKET, Key="broken/model.tar.gz", Body=b"not a tar archive")
    # Another model written where the good one's content address points: what someone with write access could do.
    good_sha256 = hashlib.sha256((packed / "good.tar.gz").read_bytes()).hexdigest()
    s3.upload_file(str(packed / "shuffled.tar.gz"), BUCKET, f"planted/{good_sha256}/model.tar.gz")
    for kind in ("good", "shuffled", "raising", "broken", "planted"):
        key = f"planted/{good_sha256}/model.tar.gz" if kind == "planted" else f"{kind}/model.tar.gz"
        client.create_model(
            ModelName=f"model-{kind}",
            ExecutionRoleArn=ROLE,
            PrimaryContainer={"Image": "pytorch-inference", "ModelDataUrl": f"s3://{BUCKET}/{key}"},
        )
        client.create_endpoint_config(
            EndpointConfigName=f"config-{kind}",
            ProductionVariants=[
                {
                    "VariantName": "AllTraffic",
                    "ModelName": f"model-{kind}",
                    "InitialInstanceCount": 1,
                    "InstanceType": "ml.m5.large",
                }
            ],
        )
    return client


@pytest.fixture(scope="module")
def body(small_mnist) -> bytes:
    return json.dumps({"instances": [load_mnist(small_mnist)["test_images"][0].tolist()]}).encode()


def runtime(url: str):
    # No retries: a request that fails must count as failed, not be sent again.
    return boto3.client("sagemaker-runtime", endpoint_url=url, config=Config(retries={"total_max_attempts": 1}))


def probabilities(client, name: str, body: bytes) -> list[float]:
    reply = client.invoke_endpoint(EndpointName=name, Body=body, ContentType="application/json")
    assert reply["InvokedProductionVariant"] == "AllTraffic"
    return json.loads(reply["Body"].read())["predictions"][0]["probabilities"]


def half_at_a_time(routing: str, wait_seconds: int, alarm: str, **policy) -> dict:
    """A blue/green DeploymentConfig that shifts half the capacity a step (CANARY: half, then the rest; LINEAR: steps
    of half), ``wait_seconds`` apart, and rolls back when ``alarm`` fires (``policy``: more of its update policy)."""
    step = "CanarySize" if routing == "CANARY" else "LinearStepSize"
    return {
        "BlueGreenUpdatePolicy": {
            "TrafficRoutingConfiguration": {
                "Type": routing,
                step: {"Type": "CAPACITY_PERCENT", "Value": 50},
                "WaitIntervalInSeconds": wait_seconds,
            },
            **policy,
        },
        "AutoRollbackConfiguration": {"Alarms": [{"AlarmName": alarm}]},
    }


def settled(sagemaker, name: str, timeout: float = 120) -> dict:
    return wait_until(
        lambda: sagemaker.describe_endpoint(EndpointName=name),
        lambda described: described["EndpointStatus"] not in ("Creating", "Updating", "RollingBack", "Deleting"),
        timeout=timeout,
    )


class Load:
    """Clients invoking an endpoint until stopped; every answer and every failure kept."""

    def __init__(self, url: str, name: str, body: bytes, clients: int = 3):
        self.answers, self.failures, self.stop = [], [], threading.Event()
        self.by_client: list[list] = [[] for _ in range(clients)]  # each client's answers, in its own order
        self.threads = [threading.Thread(target=self._run, args=(url, name, body, i)) for i in range(clients)]

    def _run(self, url, name, body, index):
        client = runtime(url)
        while not self.stop.is_set():
            try:
                answer = probabilities(client, name, body)
                self.answers.append(answer)
                self.by_client[index].append(answer)
            except Exception as error:
                self.failures.append(repr(error))

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for thread in self.threads:
            thread.join()


def server_pids(sagemaker_url: str, endpoint: str) -> set[int]:
    """The model servers of ``endpoint`` that the service at ``sagemaker_url`` started itself."""
    port = sagemaker_url.rsplit(":", 1)[1]
    service = next(
        p
        for p in psutil.process_iter(["cmdline"])
        if "local_sagemaker" in (p.info["cmdline"] or []) and port in (p.info["cmdline"] or [])
    )
    return {
        child.pid
        for child in service.children()
        if "inference.serve" in child.cmdline() and endpoint in child.cmdline()
    }


def test_create_serves_then_blue_green_under_load_loses_no_request(
    sagemaker, local_sagemaker, body, local_sagemaker_runtime
):
    sagemaker.create_endpoint(EndpointName="digits", EndpointConfigName="config-good")
    assert sagemaker.describe_endpoint(EndpointName="digits")["EndpointStatus"] == "Creating"
    sagemaker.get_waiter("endpoint_in_service").wait(EndpointName="digits", WaiterConfig={"Delay": 1})
    described = sagemaker.describe_endpoint(EndpointName="digits")
    assert described["EndpointConfigName"] == "config-good"
    assert described["ProductionVariants"][0]["CurrentInstanceCount"] == 1
    assert "digits" in {e["EndpointName"] for e in sagemaker.list_endpoints(StatusEquals="InService")["Endpoints"]}
    answer_good = probabilities(runtime(local_sagemaker_runtime), "digits", body)
    old_servers = server_pids(local_sagemaker, "digits")

    with Load(local_sagemaker_runtime, "digits", body) as load:
        time.sleep(0.5)
        sagemaker.update_endpoint(EndpointName="digits", EndpointConfigName="config-shuffled")
        assert sagemaker.describe_endpoint(EndpointName="digits")["EndpointStatus"] == "Updating"
        described = settled(sagemaker, "digits")
        time.sleep(0.5)
    assert load.failures == []
    assert described["EndpointStatus"] == "InService" and described["EndpointConfigName"] == "config-shuffled"
    # Which model answered: requests batched together differ from a lone one's answer in the last float bits.
    assert len(load.answers) > 20
    for answers in load.by_client:  # one client's requests follow each other: its answers show the switch in order
        by_good = [np.allclose(answer, answer_good, atol=1e-5) for answer in answers]
        assert by_good[0] and not by_good[-1]
        assert not any(by_good[by_good.index(False) :])  # once the new model answers it, the old never does again
    assert not any(psutil.pid_exists(pid) for pid in old_servers)  # the old fleet stopped once drained


def test_an_update_that_cannot_come_up_leaves_the_old_config_serving(
    sagemaker, local_sagemaker, body, local_sagemaker_runtime
):
    before = settled(sagemaker, "digits")
    answer = probabilities(runtime(local_sagemaker_runtime), "digits", body)
    sagemaker.update_endpoint(EndpointName="digits", EndpointConfigName="config-broken")
    after = settled(sagemaker, "digits")
    assert after["EndpointStatus"] == "InService" and after["EndpointConfigName"] == before["EndpointConfigName"]
    assert "config-broken" in after["FailureReason"] and "not a readable tar.gz archive" in after["FailureReason"]
    assert probabilities(runtime(local_sagemaker_runtime), "digits", body) == answer


def test_a_model_that_is_not_what_its_key_names_never_runs(sagemaker, local_sagemaker, local_aws):
    sagemaker.create_endpoint(EndpointName="planted", EndpointConfigName="config-planted")
    failed = settled(sagemaker, "planted")
    assert failed["EndpointStatus"] == "Failed"
    assert f"the model artifact s3://{BUCKET}/planted/" in failed["FailureReason"]
    assert "does not match the SHA-256 it is known by" in failed["FailureReason"]
    assert server_pids(local_sagemaker, "planted") == set(), "nothing of it was started"
    sagemaker.delete_endpoint(EndpointName="planted")


def test_a_canary_whose_alarm_fires_rolls_back_by_itself(
    sagemaker, local_sagemaker, local_aws, body, local_sagemaker_runtime
):
    """The pipeline's own errors alarm (tasks.alarms): metric math, the minute's 5XX rate over a minimum of
    invocations, evaluated by the service over the canary's answers."""
    from tasks.alarms import alarm_requests

    cloudwatch = boto3.client("cloudwatch", endpoint_url=local_aws)
    requests = alarm_requests("digits", max_5xx_rate=0.05, min_rate_requests=10, alarm_p99_model_latency_ms=60_000)
    cloudwatch.put_metric_alarm(**requests["digits-invocation-5xx-errors"])
    serving = settled(sagemaker, "digits")["EndpointConfigName"]
    canary = half_at_a_time(
        "CANARY", 30, "digits-invocation-5xx-errors", TerminationWaitInSeconds=0, MaximumExecutionTimeoutInSeconds=600
    )
    with Load(local_sagemaker_runtime, "digits", body) as load:
        sagemaker.update_endpoint(EndpointName="digits", EndpointConfigName="config-raising", DeploymentConfig=canary)
        described = settled(sagemaker, "digits")
    assert described["EndpointConfigName"] == serving
    fired = re.search(
        r"Alarm digits-invocation-5xx-errors fired: 5XX error rate \(IF\(invocations >= 10, "
        r"FILL\(errors, 0\) / invocations, 0\); errors (\d+), invocations (\d+)\) 1 "
        r"GreaterThanThreshold 0\.05",
        described["FailureReason"],
    )
    assert fired and fired[1] == fired[2] and int(fired[2]) >= 10, described["FailureReason"]  # not under 10
    assert load.failures and all("ModelError" in failure for failure in load.failures)  # the canary's share only
    assert len(load.answers) > len(load.failures)
    [alarm] = cloudwatch.describe_alarms(AlarmNames=["digits-invocation-5xx-errors"])["MetricAlarms"]
    assert alarm["StateValue"] == "ALARM"
    # Back on the old fleet alone: every request succeeds again.
    assert probabilities(runtime(local_sagemaker_runtime), "digits", body)


def test_a_linear_shift_whose_alarm_stays_quiet_completes(
    sagemaker, local_sagemaker, local_aws, body, local_sagemaker_runtime
):
    cloudwatch = boto3.client("cloudwatch", endpoint_url=local_aws)
    cloudwatch.put_metric_alarm(
        AlarmName="digits-latency",
        Namespace="AWS/SageMaker",
        MetricName="ModelLatency",
        ExtendedStatistic="p99",
        Dimensions=[{"Name": "EndpointName", "Value": "digits"}, {"Name": "VariantName", "Value": "AllTraffic"}],
        Period=60,
        EvaluationPeriods=1,
        Threshold=60_000_000,
        ComparisonOperator="GreaterThanThreshold",
    )
    linear = half_at_a_time("LINEAR", 1, "digits-latency", TerminationWaitInSeconds=1)
    with Load(local_sagemaker_runtime, "digits", body, clients=2) as load:
        sagemaker.update_endpoint(EndpointName="digits", EndpointConfigName="config-good", DeploymentConfig=linear)
        described = settled(sagemaker, "digits")
    assert load.failures == []
    assert described["EndpointConfigName"] == "config-good" and "FailureReason" not in described
    assert described["LastDeploymentConfig"]["BlueGreenUpdatePolicy"]["TrafficRoutingConfiguration"]["Type"] == "LINEAR"


def test_metric_math_is_parsed_strictly_and_evaluated_as_cloudwatch_would():
    """The service's evaluator of metric-math alarms, on the pipeline's own errors alarm: a rate only from its
    minimum of invocations, no data where there were none; and every expression it cannot evaluate refused, naming
    what, never run as code."""
    from local_sagemaker.alarms import (
        MetricMathError,
        evaluate,
        evaluate_expression,
        math_value,
        metric_math,
        parse_expression,
    )
    from local_sagemaker.protocol import ValidationException
    from local_sagemaker.routing import Sample
    from tasks.alarms import alarm_requests

    alarm = alarm_requests("digits", max_5xx_rate=0.05, min_rate_requests=20, alarm_p99_model_latency_ms=100)
    alarm = alarm["digits-invocation-5xx-errors"]
    now = time.time()

    def answered(ok: int, failed: int, refused: int = 0):
        samples = [Sample(now, 200, 1.0, 1.0)] * ok + [Sample(now, 500, 1.0, 1.0)] * failed
        return lambda start: samples + [Sample(now, 400, None, 1.0)] * refused

    # A few bad requests among few: not a rate yet. A handful among many: under the threshold. No traffic: no data.
    assert evaluate(alarm, "digits", answered(ok=2, failed=5, refused=10), now - 60) is None
    assert math_value(alarm, "digits", answered(ok=95, failed=3, refused=30), now - 60)[0] == 3 / 128
    assert evaluate(alarm, "digits", answered(ok=95, failed=3, refused=30), now - 60) is None
    assert evaluate(alarm, "digits", answered(ok=0, failed=0), now - 60) is None
    value, described = math_value(alarm, "digits", answered(ok=15, failed=15), now - 60)
    assert value == 0.5 and described.endswith("errors 15, invocations 30)")

    tree = parse_expression("IF(m2 >= 20, FILL(m1, 0) / m2, -1 * 2 + 3)")
    assert evaluate_expression(tree, {"m1": None, "m2": 40.0}.get) == 0
    assert evaluate_expression(tree, {"m1": 4.0, "m2": 10.0}.get) == 1
    assert evaluate_expression(tree, {"m1": 4.0, "m2": None}.get) is None
    assert evaluate_expression(parse_expression("m1 / m2"), {"m1": 1.0, "m2": 0.0}.get) is None
    for expression, refusal in (
        ("SUM(METRICS())", "function SUM is not evaluated by this service (only IF, FILL)"),
        ("m1 ^ 2", "'^' at position 3 is not metric math this service evaluates"),
        ("m1 > 1 AND m2 > 1", "the logical operator AND is not evaluated by this service"),
        ("m1 || m2", "'|' at position 3 is not metric math"),
        ("__import__('os').system('x')", '"\'" at position 11 is not metric math'),
        ("IF(m1, 2)", "IF takes 3 arguments, not 2"),
        ("m1 < m2 < 3", "comparisons do not chain"),
        ("(m1 + 2", "the expression ends too early"),
        ("m1 m2", "unexpected 'm2' at position 3"),
        ("", "the expression is empty"),
    ):
        with pytest.raises(MetricMathError) as caught:
            parse_expression(expression)
        assert refusal in str(caught.value), expression

    def with_queries(*queries) -> dict:
        return {**alarm, "Metrics": [*alarm["Metrics"][:2], *queries]}

    for queries, refusal in (
        (
            [{"Id": "e1", "Expression": "STDDEV(errors)", "ReturnData": True}],
            "expression e1 (STDDEV(errors)): function STDDEV is not evaluated",
        ),
        (
            [{"Id": "e1", "Expression": "errors / calls", "ReturnData": True}],
            "expression e1 names calls, which no metric query of the alarm is",
        ),
        (
            [
                {"Id": "e1", "Expression": "e2", "ReturnData": True},
                {"Id": "e2", "Expression": "e1 + 1", "ReturnData": False},
            ],
            "its expressions refer to each other in a cycle: e1 -> e2 -> e1",
        ),
        (
            [{"Id": "e1", "Expression": "errors", "ReturnData": True}, {"Id": "e2", "Expression": "errors"}],
            "exactly one metric query must have ReturnData true, not 2",
        ),
        (
            [
                {"Id": "e1", "Expression": "errors", "ReturnData": True},
                {"Id": "m3", "MetricStat": {**alarm["Metrics"][0]["MetricStat"], "Stat": "IQM"}, "ReturnData": False},
            ],
            "metric query m3: statistic 'IQM' is not evaluated",
        ),
    ):
        with pytest.raises(ValidationException, match=re.escape(refusal)):
            metric_math(with_queries(*queries))


def test_an_alarm_the_service_cannot_evaluate_is_refused_when_the_update_is_asked(sagemaker, local_aws):
    cloudwatch = boto3.client("cloudwatch", endpoint_url=local_aws)
    metric = {
        "Namespace": "AWS/SageMaker",
        "MetricName": "Invocations",
        "Dimensions": [{"Name": "EndpointName", "Value": "digits"}],
    }
    cloudwatch.put_metric_alarm(
        AlarmName="digits-anomaly",
        EvaluationPeriods=1,
        Threshold=0,
        ComparisonOperator="GreaterThanThreshold",
        Metrics=[
            {"Id": "m1", "MetricStat": {"Metric": metric, "Period": 60, "Stat": "Sum"}, "ReturnData": False},
            {"Id": "e1", "Expression": "ANOMALY_DETECTION_BAND(m1, 2)", "ReturnData": True},
        ],
    )
    serving = settled(sagemaker, "digits")["EndpointConfigName"]
    with pytest.raises(ClientError) as caught:
        sagemaker.update_endpoint(
            EndpointName="digits",
            EndpointConfigName="config-shuffled",
            DeploymentConfig={"AutoRollbackConfiguration": {"Alarms": [{"AlarmName": "digits-anomaly"}]}},
        )
    assert caught.value.response["Error"]["Code"] == "ValidationException"
    assert caught.value.response["Error"]["Message"] == (
        "Alarm digits-anomaly: expression e1 (ANOMALY_DETECTION_BAND(m1, 2)): function ANOMALY_DETECTION_BAND is not "
        "evaluated by this service (only IF, FILL)"
    )
    described = sagemaker.describe_endpoint(EndpointName="digits")
    assert (described["EndpointStatus"], described["EndpointConfigName"]) == ("InService", serving)
    cloudwatch.delete_alarms(AlarmNames=["digits-anomaly"])


def test_errors_are_sagemakers(sagemaker, local_sagemaker, body, local_sagemaker_runtime):
    for call, kwargs, message in (
        (sagemaker.describe_endpoint, {"EndpointName": "absent"}, 'Could not find endpoint "arn:aws:sagemaker:'),
        (sagemaker.describe_model, {"ModelName": "absent"}, 'Could not find model "arn:aws:sagemaker:'),
        (
            sagemaker.create_endpoint,
            {"EndpointName": "digits", "EndpointConfigName": "config-good"},
            "Cannot create already existing endpoint",
        ),
        (
            sagemaker.create_endpoint,
            {"EndpointName": "other", "EndpointConfigName": "absent"},
            "Could not find endpoint configuration",
        ),
    ):
        with pytest.raises(ClientError) as caught:
            call(**kwargs)
        assert caught.value.response["Error"]["Code"] == "ValidationException"
        assert message in caught.value.response["Error"]["Message"]
    with pytest.raises(ClientError) as caught:
        runtime(local_sagemaker_runtime).invoke_endpoint(
            EndpointName="absent", Body=body, ContentType="application/json"
        )
    assert caught.value.response["Error"]["Code"] == "ValidationError"


def test_delete_stops_the_servers(sagemaker, local_sagemaker, body, local_sagemaker_runtime):
    sagemaker.create_endpoint(EndpointName="short-lived", EndpointConfigName="config-good")
    sagemaker.get_waiter("endpoint_in_service").wait(EndpointName="short-lived", WaiterConfig={"Delay": 1})
    before = server_pids(local_sagemaker, "short-lived")
    sagemaker.delete_endpoint(EndpointName="short-lived")
    sagemaker.get_waiter("endpoint_deleted").wait(EndpointName="short-lived", WaiterConfig={"Delay": 1})
    assert len(before) == 1 and not any(psutil.pid_exists(pid) for pid in before)
    assert server_pids(local_sagemaker, "short-lived") == set()
    with pytest.raises(ClientError, match="Endpoint short-lived of account"):
        runtime(local_sagemaker_runtime).invoke_endpoint(
            EndpointName="short-lived", Body=body, ContentType="application/json"
        )


def test_a_restarted_service_keeps_its_records_and_serves_again(local_aws, sagemaker, body, tmp_path):
    """A service of its own on a state directory of its own: stopped cleanly, then killed, then started again."""
    from local_sagemaker import launch, processes
    from tests.conftest import KEYS

    def start():
        return launch.start(
            tmp_path / "state", local_aws, credentials=KEYS.sagemaker.environment(), cpus=1, metrics_interval=1
        )

    started = start()
    client = boto3.client("sagemaker", endpoint_url=started.url)
    try:
        model_and_config(client, "kept", f"s3://{BUCKET}/good/model.tar.gz")
        client.create_endpoint(EndpointName="kept", EndpointConfigName="kept")
        client.get_waiter("endpoint_in_service").wait(EndpointName="kept", WaiterConfig={"Delay": 1})
        answer = probabilities(runtime(started.runtime_url), "kept", body)

        launch.stop(started.record)  # a clean stop stops the model servers; the next start starts them again
        # Records a power cut tore, or a hand damaged, while the service was down: each is set aside, named in the
        # log, and the service starts and serves everything else.
        state = tmp_path / "state"
        damaged = {
            state / "training-jobs" / "torn.json": b'{"TrainingJobName": "torn", "TrainingJobStatus": "InPr',
            state / "models" / "not-an-object.json": b'["a", "list"]',
            state / "endpoint-configs" / "not-utf8.json": b"\xff\xfe{}",
        }
        for path, content in damaged.items():
            path.write_bytes(content)
        started = start()
        client = boto3.client("sagemaker", endpoint_url=started.url)
        assert client.describe_endpoint(EndpointName="kept")["EndpointStatus"] == "InService"
        for path, content in damaged.items():
            [aside] = path.parent.glob(f"{path.name}.unreadable-*")
            assert aside.read_bytes() == content and not path.exists()  # renamed, never deleted
            assert f"{path} cannot be read" in (state / "logs" / "local-sagemaker.log").read_text()
        with pytest.raises(ClientError, match="Requested resource not found"):
            client.describe_training_job(TrainingJobName="torn")
        assert probabilities(runtime(started.runtime_url), "kept", body) == answer
        assert client.describe_model(ModelName="kept")["PrimaryContainer"]["ModelDataUrl"].endswith("good/model.tar.gz")

        servers = server_pids(started.url, "kept")
        processes.live(started.record).kill()  # a crash leaves the servers running: the next start adopts them
        psutil.wait_procs([psutil.Process(started.record["pid"])], timeout=10)
        # A server the crash kept out of the records (started, and killed before it was written down).
        fleets = tmp_path / "state" / "endpoint-fleets"
        lost_dir = fleets / "lost" / "lost-config" / "AllTraffic"
        shutil.copytree(next(fleets.glob("kept/models/*")), lost_dir)
        port = processes.free_port()
        lost, _ = processes.spawn(
            [sys.executable, "-m", "inference.serve", "--model-dir", str(lost_dir), "--port", str(port)],
            env=processes.allowed_env(),
        )
        assert processes.wait_until(lambda: processes.healthy(f"http://127.0.0.1:{port}"), 60)
        started = start()
        assert server_pids(started.url, "kept") == set() and all(psutil.pid_exists(pid) for pid in servers)
        assert lost.wait(timeout=30) is not None, "the server no record names is stopped at the start"
        assert probabilities(runtime(started.runtime_url), "kept", body) == answer
        client = boto3.client("sagemaker", endpoint_url=started.url)
        client.delete_endpoint(EndpointName="kept")
        client.get_waiter("endpoint_deleted").wait(EndpointName="kept", WaiterConfig={"Delay": 1})
        assert not any(psutil.pid_exists(pid) for pid in servers)
    finally:
        launch.stop(started.record)
        # A failure between the crash and the next start leaves servers no running service knows: none outlives it.
        strays = [p for p in psutil.process_iter(["cmdline"]) if str(tmp_path) in " ".join(p.info["cmdline"] or [])]
        for stray in strays:
            stray.kill()
        psutil.wait_procs(strays, timeout=10)


def test_large_bodies_arrive_whole_and_too_large_ones_are_refused(
    sagemaker, local_sagemaker, small_mnist, local_sagemaker_runtime
):
    """A body of many TCP segments is forwarded whole; over InvokeEndpoint's 6 MB it is refused before the model."""
    images = load_mnist(small_mnist)["test_images"]
    batch = json.dumps({"instances": np.concatenate([images] * 10).tolist()}).encode()  # 1,000 images, ~2.5 MB
    client = runtime(local_sagemaker_runtime)
    reply = client.invoke_endpoint(EndpointName="digits", Body=batch, ContentType="application/json")
    assert len(json.loads(reply["Body"].read())["predictions"]) == 10 * len(images)
    with pytest.raises(ClientError) as caught:
        client.invoke_endpoint(EndpointName="digits", Body=b" " * (6 * 1024 * 1024 + 1), ContentType="application/json")
    assert caught.value.response["Error"]["Code"] == "ValidationError"
    assert "exceeds the maximum of 6291456 bytes" in caught.value.response["Error"]["Message"]


class Raw:
    """A raw HTTP/1.1 connection to the runtime: what a client that is not boto3 may send."""

    def __init__(self, url: str):
        host, port = url.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=30)
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.buffer:
            self._read()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {name.lower(): value.strip() for name, value in (line.split(":", 1) for line in lines)}
        while len(self.buffer) < int(headers["content-length"]):
            self._read()
        size = int(headers["content-length"])
        body, self.buffer = self.buffer[:size], self.buffer[size:]
        return int(status_line.split()[1]), headers, body

    def closed(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def _read(self) -> None:
        data = self.sock.recv(65536)
        assert data, "the runtime closed the connection without an answer"
        self.buffer += data


def invocation(name: str, body: bytes, extra: dict[str, str] | None = None) -> bytes:
    """A signed InvokeEndpoint request, as bytes."""
    headers = {"Host": "runtime", "Content-Type": "application/json", "Content-Length": str(len(body)), **(extra or {})}
    return raw_request("POST", f"/endpoints/{name}/invocations", headers, body)


def test_the_runtime_answers_any_http_client_and_refuses_what_is_wrong(sagemaker, local_sagemaker_runtime, body):
    """Pipelined requests are answered in order; a bad request gets a 4xx naming what is wrong, a malformed one
    closes its connection, and the runtime serves on."""
    raw = Raw(local_sagemaker_runtime)
    raw.send(invocation("digits", body) * 3)  # pipelined: three answers, in order, on one connection
    for _ in range(3):
        status, headers, answer = raw.reply()
        assert status == 200 and headers["x-amzn-invoked-production-variant"] == "AllTraffic"
        assert len(json.loads(answer)["predictions"]) == 1 and headers["x-amzn-requestid"]

    # Over 6 MB by its declared length: refused, and the connection still serves the next request.
    raw.send(invocation("digits", b" " * (6 * 1024 * 1024 + 1)))
    status, headers, answer = raw.reply()
    assert (status, headers["x-amzn-errortype"]) == (413, "ValidationError:")
    assert "exceeds the maximum of 6291456 bytes" in json.loads(answer)["message"]
    raw.send(invocation("digits", body))
    assert raw.reply()[0] == 200

    # Chunked past the limit: refused as soon as it passes it.
    chunk = b" " * (1024 * 1024)
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(7)) + b"0\r\n\r\n"
    raw.send(
        b"POST /endpoints/digits/invocations HTTP/1.1\r\nHost: runtime\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + chunked
    )
    assert raw.reply()[0] == 413

    for request, status, code, message in (
        (invocation("no_such!name", body), 400, "ValidationError", "failed to satisfy constraint"),
        (invocation("absent", body), 400, "ValidationError", "Endpoint absent of account"),
        (
            raw_request("GET", "/endpoints/digits/invocations", {"Host": "runtime"}, b""),
            404,
            "UnknownOperationException",
            "POST /endpoints/{EndpointName}/invocations",
        ),
        (
            invocation("digits", body, {"X-Amzn-SageMaker-Target-Variant": "Absent"}),
            400,
            "ValidationError",
            "Variant Absent not found for endpoint digits",
        ),
    ):
        raw.send(request)
        answered, headers, answer = raw.reply()
        assert (answered, headers["x-amzn-errortype"]) == (status, f"{code}:"), answer
        assert message in json.loads(answer)["message"]

    raw.send(b"POST /endpoints/digits/invocations HTTP/1.1\r\nContent-Length: x\r\n\r\n")  # malformed
    status, headers, answer = raw.reply()
    assert status == 400 and "Malformed HTTP request" in json.loads(answer)["message"]
    assert raw.closed()

    closing = Raw(local_sagemaker_runtime)  # Connection: close is honoured
    closing.send(invocation("digits", body, {"Connection": "close"}))
    assert closing.reply()[0] == 200 and closing.closed()
    assert probabilities(runtime(local_sagemaker_runtime), "digits", body)  # and the runtime serves on


def test_a_config_made_again_under_its_old_name_serves_its_new_model(
    sagemaker, local_sagemaker, local_aws, body, local_sagemaker_runtime
):
    """The model directory is named by its archive's SHA-256, not by the endpoint config: a config (and model)
    deleted and made again under the old name with another artifact serves that artifact, and the same artifact is
    unpacked once for the endpoint (the directory the previous fleet used is kept, the others go)."""
    from pathlib import Path

    client = runtime(local_sagemaker_runtime)

    def make(artifact: str) -> None:
        model_and_config(sagemaker, "recycled", f"s3://{BUCKET}/{artifact}/model.tar.gz")

    make("good")
    sagemaker.create_endpoint(EndpointName="recycled", EndpointConfigName="recycled")
    assert settled(sagemaker, "recycled")["EndpointStatus"] == "InService"
    answer_good = probabilities(client, "recycled", body)
    sagemaker.update_endpoint(EndpointName="recycled", EndpointConfigName="config-shuffled")
    assert settled(sagemaker, "recycled")["EndpointConfigName"] == "config-shuffled"
    answer_shuffled = probabilities(client, "recycled", body)
    assert not np.allclose(answer_shuffled, answer_good, atol=1e-5)

    sagemaker.delete_endpoint_config(EndpointConfigName="recycled")
    sagemaker.delete_model(ModelName="recycled")
    make("shuffled")
    sagemaker.update_endpoint(EndpointName="recycled", EndpointConfigName="recycled")
    described = settled(sagemaker, "recycled")
    assert (described["EndpointConfigName"], described.get("FailureReason")) == ("recycled", None)
    assert np.allclose(probabilities(client, "recycled", body), answer_shuffled, atol=1e-5)

    [server] = [psutil.Process(pid) for pid in server_pids(local_sagemaker, "recycled")]
    command = server.cmdline()
    served = Path(command[command.index("--model-dir") + 1])
    shuffled = boto3.client("s3", endpoint_url=local_aws).get_object(Bucket=BUCKET, Key="shuffled/model.tar.gz")
    assert served.name == hashlib.sha256(shuffled["Body"].read()).hexdigest()
    assert [path.name for path in served.parent.iterdir()] == [served.name]  # the good model's directory is gone
    sagemaker.delete_endpoint(EndpointName="recycled")


def test_a_model_directory_is_named_by_its_archives_bytes_and_unpacked_whole(local_aws, tmp_path):
    """Another archive put where one was never reaches the directory of the first; an archive that cannot be
    unpacked leaves nothing a later start could serve; prune keeps only the directories in use."""
    from pathlib import Path

    from local_sagemaker import model_servers
    from tests.test_local_aws import tarball

    s3 = boto3.client("s3", endpoint_url=local_aws)
    s3.create_bucket(Bucket="service-model-dirs")
    url, endpoint = "s3://service-model-dirs/recycled/model.tar.gz", tmp_path / "endpoint"

    def unpacked(body: bytes) -> Path:
        s3.put_object(Bucket="service-model-dirs", Key="recycled/model.tar.gz", Body=body)
        return model_servers.model_dir(endpoint / "models", url, s3)

    # One archive of the bytes, kept: gzip stamps the second it was made, so two packings may differ.
    first_archive = tarball(b"first")
    first = unpacked(first_archive)
    assert first.name == hashlib.sha256(first_archive).hexdigest()
    inode = (first / "model.pth").stat().st_ino
    assert unpacked(first_archive) == first and (first / "model.pth").stat().st_ino == inode  # unpacked once
    second = unpacked(tarball(b"second"))
    assert second != first and (second / "model.pth").read_bytes() == b"second"
    assert (first / "model.pth").read_bytes() == b"first"
    with pytest.raises(model_servers.LaunchFailed, match=r"not a readable tar\.gz archive"):
        unpacked(b"not a tar archive")
    assert sorted(path.name for path in (endpoint / "models").iterdir()) == sorted([first.name, second.name])

    (endpoint / "models" / f".{first.name}.cut-short.unpacking").mkdir()  # what a crash mid-unpack leaves
    old_layout = endpoint / "a-config" / "AllTraffic"  # a directory of before, that a recorded server still uses
    shutil.copytree(first, old_layout)
    shutil.copytree(first, endpoint / "another-config" / "AllTraffic")
    model_servers.prune(endpoint, [second, str(old_layout)])
    assert sorted(str(path.relative_to(endpoint)) for path in endpoint.rglob("*") if path.is_dir()) == [
        "a-config",
        "a-config/AllTraffic",
        "models",
        f"models/{second.name}",
    ]
