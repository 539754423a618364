"""The shipped IAM policies, proven both ways on a real local stack (`mnist-pipeline up`), which enforces exactly them:
its connection signs as the pipeline's user (iam/airflow-policy.json), its jobs and model servers act as the execution
role (iam/sagemaker-execution-role-*.json), its bucket has iam/bucket-policy.json.

1. Whole runs succeed and nothing anywhere was refused: a sweep that deploys (its champion's asset event has the
   batch DAG classify the digits waiting in its input), a tuning run, a canary whose monitoring check fails and rolls
   it back, a run that registers for a person's approval, `mnist-pipeline approve`, a deploy-only run, and a drift
   check of what the endpoint captured meanwhile.
2. Every statement of the identity and trust policies is needed: each of the stack's recorded authorization requests
   is evaluated again by the same evaluator with that one statement taken out, and some request a named step made
   must then be refused, naming its action.
"""

from __future__ import annotations

import datetime
import io
import json
import re
from pathlib import Path
from typing import NamedTuple

import pytest

from tests.helpers.dag_runs import SMALL_TUNE
from tests.helpers.local_stack import Stack, start_stack
from tests.helpers.signing import unsigned_control_plane_answer

pytestmark = [pytest.mark.policies, pytest.mark.slow]

QUICK = {"epochs": 2, "optimizer": "adam", "lr": 0.005, "batch_size": 32, "hidden_channels": [4], "smoke_requests": 50}
ROLE_POLICIES = ("sagemaker-execution-role-policy", "sagemaker-execution-role-trust")


@pytest.fixture(scope="module")
def stack(request, small_mnist) -> Stack:
    """A stack of this module's own (the runs below change its registry), stopped at the end."""
    stack = start_stack(request, small_mnist)
    yield stack
    stack.down()


class Run(NamedTuple):
    """One command of the `mnist-pipeline` CLI: what it printed, and when it ran."""

    output: str
    started: datetime.datetime
    ended: datetime.datetime


@pytest.fixture(scope="module")
def runs(stack, small_mnist) -> dict[str, Run]:
    """Every kind of run, one after another."""
    import numpy as np

    from tasks.batch import default_input_uri
    from tasks.config import load_config
    from training.mnist_idx import MNIST_FILES, read_idx

    array = io.BytesIO()
    np.save(array, read_idx(small_mnist / MNIST_FILES["test_images"])[:20])
    bucket, prefix = default_input_uri(load_config()).removeprefix("s3://").split("/", 1)
    stack.client("s3").put_object(Bucket=bucket, Key=f"{prefix}waiting.npy", Body=array.getvalue())
    mirror = {"mnist_mirror": str(small_mnist)}

    def cli(*arguments: str) -> Run:
        started = datetime.datetime.now(datetime.UTC)
        result = stack.cli(*arguments, timeout=600)
        return Run(result.stdout + result.stderr, started, datetime.datetime.now(datetime.UTC))

    def run(conf: dict) -> Run:
        return cli("run", "--conf", json.dumps({**mirror, **conf}))

    outputs = {"sweep": run(QUICK)}
    outputs["tune"] = run({**QUICK, **SMALL_TUNE, "hidden_channels": [4, 8]})
    outputs["canary"] = run(
        {
            "epochs": 1,
            "lr": 0.00001,
            "hidden_channels": [2],
            "min_test_accuracy": 0.0,
            "accuracy_tolerance": 1.0,
            "smoke_requests": 50,
            "bake_seconds": 600,
            "traffic_shift": "canary",
            "traffic_percent": 50,
            "traffic_wait_seconds": 0,
        }
    )
    # Nobody answers its review in the UI: it waits the shortest approval_timeout (a minute), then leaves it pending.
    outputs["manual"] = run(
        {**QUICK, "approval": "manual", "min_test_accuracy": 0.0, "accuracy_tolerance": 1.0, "approval_timeout": 1}
    )
    version = re.search(r"version (\d+) awaits a person's approval", outputs["manual"].output)
    outputs["approve"] = cli("approve", version.group(1) if version else "0", "--reason", "reviewed by the policy test")
    outputs["deploy_only"] = run({"deploy_only": True, "bake_seconds": 0})
    # The endpoint captured every invocation above (as the execution role), and these digits, enough for a window
    # that is judged: the drift check reads them, judges them and publishes its figures.
    stack.invoke_all(np.concatenate([read_idx(small_mnist / MNIST_FILES["test_images"])] * 5))
    outputs["drift"] = cli("drift")
    return outputs


def test_whole_runs_succeed_under_exactly_the_shipped_policies(stack, runs):
    from tests.test_stack import wait_for_run

    assert re.search(r"Run \S+ success in", runs["sweep"].output), runs["sweep"].output[-3000:]
    assert re.search(r"Run \S+ success in", runs["tune"].output), runs["tune"].output[-3000:]
    assert "✓ tune success" in runs["tune"].output
    # The canary's model is the worst there is: its live check fails, the alarm rolls the update back.
    assert re.search(r"Run \S+ failed in", runs["canary"].output), runs["canary"].output[-3000:]
    assert "rolls back from" in runs["canary"].output and "Rejected" in runs["canary"].output
    assert "awaits a person's approval" in runs["manual"].output, runs["manual"].output[-3000:]
    assert "PendingManualApproval → Approved" in runs["approve"].output, runs["approve"].output
    assert re.search(r"Run \S+ success in", runs["deploy_only"].output), runs["deploy_only"].output[-3000:]
    assert re.search(r"^(no )?drift: ", runs["drift"].output, re.MULTILINE), runs["drift"].output[-3000:]
    with stack.api() as api:
        batch = wait_for_run(api, "mnist_batch_predict", run_type="asset_triggered", timeout=240)
        assert batch["state"] == "success", batch


def test_nothing_anywhere_was_refused(stack, runs):
    decisions = [json.loads(line) for line in stack.paths.decisions.read_text().splitlines()]
    assert decisions, "the local AWS logs every decision"
    refused = [(d["principal"]["arn"], d["action"], d["resource"]) for d in decisions if d["result"] != "Allowed"]
    assert refused == []
    logs = [
        stack.paths.logs,
        stack.paths.airflow_home / "logs",
        stack.paths.sagemaker / "logs",
        stack.paths.sagemaker / "job-dirs",
    ]
    mentions = [
        str(path)
        for root in logs
        for path in Path(root).rglob("*")
        if path.is_file()
        and path.name != stack.paths.decisions.name
        and re.search(rb"AccessDenied|not authorized to perform", path.read_bytes())
    ]
    assert mentions == []


class Step(NamedTuple):
    """A task instance of a DAG run, or a CLI command that is not one (`approve`), and when it ran."""

    name: str
    started: datetime.datetime
    ended: datetime.datetime


@pytest.fixture(scope="module")
def steps(stack, runs) -> list[Step]:
    """Every task instance of every run above (the batch DAG's included), and the `approve` command."""
    from tests.test_stack import wait_for_run

    tasks = []
    with stack.api() as api:
        wait_for_run(api, "mnist_batch_predict", run_type="asset_triggered", timeout=240)
        while True:  # a page at a time: the API caps its pages at [api] maximum_page_limit
            page = api.get("/dags/~/dagRuns/~/taskInstances", params={"offset": len(tasks)}).json()
            tasks += page["task_instances"]
            if not page["task_instances"] or len(tasks) >= page["total_entries"]:
                break
    found = [Step("mnist-pipeline approve", runs["approve"].started, runs["approve"].ended)]
    for task in tasks:
        if task["start_date"] and task["end_date"]:
            index = f"[{task['map_index']}]" if task["map_index"] >= 0 else ""
            found.append(
                Step(
                    f"{task['dag_id']}.{task['task_id']}{index}",
                    datetime.datetime.fromisoformat(task["start_date"]),
                    datetime.datetime.fromisoformat(task["end_date"]),
                )
            )
    return found


def test_each_statement_of_the_identity_and_trust_policies_is_needed(stack, runs, steps):
    from cli.iam import render
    from cli.local_aws import config_blanks
    from local_aws.evaluator import Evaluator
    from tasks.config import load_config

    blanks = config_blanks(load_config())
    decisions = [json.loads(line) for line in stack.paths.decisions.read_text().splitlines()]
    evaluator = Evaluator()
    try:
        refusals = {}
        for name in ("airflow-policy", *ROLE_POLICIES):
            policy = render(name, blanks)
            for index, statement in enumerate(policy["Statement"]):
                without = {**policy, "Statement": [s for i, s in enumerate(policy["Statement"]) if i != index]}
                refusals[(name, statement.get("Sid", index))] = refused_without(
                    decisions, name, without, blanks, evaluator
                )
    finally:
        evaluator.close()
    failing = {}
    for statement, refused in refusals.items():
        failing[statement] = {}
        for decision in refused:
            for step in steps_at(datetime.datetime.fromisoformat(decision["time"]), steps, runs):
                failing[statement].setdefault(step, set()).add(decision["action"])
    unneeded = [statement for statement, named in failing.items() if not named]
    assert unneeded == [], f"statements that no step needs: {unneeded}"
    for (name, sid), named in sorted(failing.items()):
        # A step is named by when it ran: a request of a job or a model server is named after every step that was
        # running then, the one that started it among them. The stack evaluates a request once and caches the
        # decision: the step named is the first that made it.
        print(f"{name} {sid}: without it, refused")
        for step, actions in sorted(named.items()):
            print(f"    while {step} ran: {', '.join(sorted(actions))}")


def steps_at(at: datetime.datetime, steps: list[Step], runs: dict[str, Run]) -> list[str]:
    """The steps that were running at ``at``. A request while no task ran is a callback's (the triggerer's deadline
    alert, a failure notification), named after the run that it came during or after."""
    named = [step.name for step in steps if step.started <= at <= step.ended]
    if named:
        return named
    if during := [kind for kind, run in runs.items() if run.started <= at <= run.ended]:
        return [f"the {during[0]} run, outside its tasks (a callback)"]
    before = [(run.ended, kind) for kind, run in runs.items() if run.ended <= at]
    return [f"after the {max(before)[1]} run (a callback)"] if before else []


def refused_without(decisions: list[dict], name: str, policy: dict, blanks, evaluator) -> list[dict]:
    """The recorded requests that ``policy`` (iam/<name> with a statement taken out) refuses."""
    from cli.iam import render

    refused = []
    seen = {}
    for decision in decisions:
        principal = decision["principal"]
        if name == "sagemaker-execution-role-trust":
            if not decision["as_service"]:
                continue
            simulation = {
                "identityPolicies": [],
                "resourcePolicy": policy,
                "request": request_of(decision, principal["service"]),
            }
        elif name == "sagemaker-execution-role-policy":
            if principal["kind"] != "AssumedRole" or principal["role_name"] != blanks.role:
                continue
            simulation = {"identityPolicies": [{"name": name, "policy": policy}], "request": request_of(decision)}
        else:
            if principal["kind"] != "User" or principal["principal_arn"] != blanks.principal:
                continue
            simulation = {"identityPolicies": [{"name": name, "policy": policy}], "request": request_of(decision)}
        if decision["resource_policy"] and decision["resource_policy"][0] == "bucket":
            simulation["resourcePolicy"] = render("bucket-policy", blanks)
        key = json.dumps(simulation, sort_keys=True)
        if key not in seen:
            seen[key] = evaluator.evaluate(simulation).allowed
        if not seen[key]:
            refused.append(decision)
    return refused


def request_of(decision: dict, principal: str | None = None) -> dict:
    return {
        "principal": principal or decision["principal"]["arn"],
        "action": decision["action"],
        "resource": {"resource": decision["resource"], "accountId": decision["principal"]["account"] or "000000000000"},
        "contextVariables": decision["context"],
    }


def test_with_only_the_connections_keys_the_stack_refuses_what_aws_would(stack, runs):
    """The stack `up` started, asked with the keys its Airflow connection carries (and a wrong secret, or none)."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import ClientError

    connection = json.loads(stack.state["connection"])
    key, secret = connection["login"], connection["password"]
    assert (key, secret) == (stack.keys.pipeline.access_key_id, stack.keys.pipeline.secret_access_key)

    def client(service: str, secret_key: str = secret):
        url = stack.state["sagemaker_endpoint"] if service == "sagemaker" else stack.state["aws_endpoint"]
        return boto3.client(
            service,
            endpoint_url=url,
            region_name="us-east-1",
            aws_access_key_id=key,
            aws_secret_access_key=secret_key,
            config=Config(retries={"total_max_attempts": 1}),
        )

    from tasks.config import load_config

    config = load_config()
    for service, call in (
        ("sagemaker", lambda c: c.list_endpoints()),
        ("s3", lambda c: c.list_objects_v2(Bucket=config.bucket, Prefix=f"{config.prefix}/")),
    ):
        with pytest.raises(ClientError) as wrong:
            call(client(service, "not-the-secret"))
        assert wrong.value.response["Error"]["Code"] in ("InvalidSignatureException", "SignatureDoesNotMatch")
        call(client(service))  # the right secret
    assert unsigned_control_plane_answer(stack.state["sagemaker_endpoint"]) == (
        403,
        "MissingAuthenticationTokenException",
    )
    stack.client("s3", stack.keys.admin).put_object(Bucket=config.bucket, Key="not-the-pipelines/file", Body=b"x")
    with pytest.raises(ClientError) as outside:
        client("s3").get_object(Bucket=config.bucket, Key="not-the-pipelines/file")
    assert outside.value.response["Error"]["Code"] == "AccessDenied"
    [job] = client("sagemaker").list_training_jobs(MaxResults=1)["TrainingJobSummaries"]
    request = client("sagemaker").describe_training_job(TrainingJobName=job["TrainingJobName"])
    passing = {
        name: request[name]
        for name in (
            "AlgorithmSpecification",
            "HyperParameters",
            "InputDataConfig",
            "OutputDataConfig",
            "ResourceConfig",
            "StoppingCondition",
        )
    }
    another = "arn:aws:iam::000000000000:role/someone-elses"
    with pytest.raises(ClientError) as refused:
        client("sagemaker").create_training_job(TrainingJobName="passes-another-role", RoleArn=another, **passing)
    assert refused.value.response["Error"]["Code"] == "AccessDeniedException"
    assert f"iam:PassRole on resource: {another}" in refused.value.response["Error"]["Message"]
