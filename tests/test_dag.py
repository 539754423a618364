"""The sweep DAG parses light and right: settings, params, wiring. Its runs are tests/test_safe_deploy.py's."""

from __future__ import annotations

import datetime
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.helpers.dag_runs import DAG_FILE, parse_dag, run_sweep, states, xcoms

PARAMS = (
    "search",
    "tune_strategy",
    "tune_max_jobs",
    "tune_max_parallel",
    "tune_lr",
    "tune_dropout",
    "tune_epochs",
    "tune_batch_size",
    "tune_early_stopping",
    "tune_target_accuracy",
    "deploy_only",
    "approval",
    "approval_timeout",
    "hidden_channels",
    "epochs",
    "preset",
    "optimizer",
    "lr",
    "batch_size",
    "dropout",
    "kernel_size",
    "instance_type",
    "instance_count",
    "mnist_mirror",
    "deploy",
    "endpoint_name",
    "capture_percentage",
    "traffic_shift",
    "traffic_percent",
    "traffic_wait_seconds",
    "bake_seconds",
    "min_test_accuracy",
    "accuracy_tolerance",
    "smoke_requests",
    "metrics_timeout",
    "min_live_accuracy",
    "max_accuracy_drop",
    "max_error_rate",
    "max_p99_latency_ms",
    "max_model_latency_ms",
    "max_5xx_rate",
    "min_rate_requests",
    "max_cpu_utilization",
    "max_memory_utilization",
    "alarm_p99_model_latency_ms",
)


@pytest.fixture(scope="module")
def dag():
    return parse_dag()


def test_dag_parses_with_its_settings(dag):
    assert dag.tags == {"mnist", "sagemaker", "training", "sweep"}
    assert dag.max_active_runs == 1 and dag.catchup is False
    assert dag.schedule is None  # no schedule configured
    assert dag.doc_md.lstrip().startswith("# MNIST sweep: train, select, gate, register, deploy, check")
    for task in dag.tasks:
        assert task.retries >= 2 and task.retry_delay >= datetime.timedelta(seconds=30), task.task_id
        assert task.execution_timeout is not None, task.task_id  # every wait has a bound
    assert dag.dagrun_timeout is not None
    assert dag.get_task("train").execution_timeout > datetime.timedelta(hours=2)  # the jobs' MaxRuntimeInSeconds
    # Training is the provider's operator, mapped over the requests: the same on AWS and on a laptop.
    train = dag.get_task("train")
    from airflow.providers.amazon.aws.operators.sagemaker import SageMakerTrainingOperator

    assert type(train).__name__ == "MappedOperator" and issubclass(train.operator_class, SageMakerTrainingOperator)
    assert train.partial_kwargs["print_log"] is True  # each job's log in its task's log
    # So is tuning: one tuning job, through the provider's operator (made to stop its job when killed).
    from airflow.providers.amazon.aws.operators.sagemaker import SageMakerTuningOperator

    assert isinstance(dag.get_task("tune"), SageMakerTuningOperator)
    assert dag.get_task("tune").execution_timeout < dag.dagrun_timeout
    params = dag.params
    assert params["hidden_channels"] == [2, 5, 10, 20, 32]
    assert set(params.keys()) == set(PARAMS)
    for name in PARAMS:
        param = params.get_param(name)
        assert param.schema.get("title") and param.description, name
        kinds = param.schema["type"] if isinstance(param.schema["type"], list) else [param.schema["type"]]
        if {"number", "integer"} & set(kinds):  # bounded: by a range or a list of values
            assert {"minimum", "maximum"} <= param.schema.keys() or "enum" in param.schema, name
        if "array" in kinds:  # so are a list's values, and its length
            assert {"minimum", "maximum"} <= param.schema["items"].keys() and "maxItems" in param.schema, name
    # The gate's default lets the seed preset's sweep deploy, whose jobs reach 96% on MNIST
    # (test_seed_settings_reach_96_percent_on_mnist). The check's defaults come from its Thresholds.
    assert params["min_test_accuracy"] == 0.9 and params["accuracy_tolerance"] == 0.005
    assert params["min_live_accuracy"] == 0.9 and params["max_cpu_utilization"] is None


def test_the_chain_gates_deploys_checks_and_reports_whatever_happened(dag):
    def upstream(task_id: str) -> set[str]:
        return dag.get_task(task_id).upstream_task_ids - {"configuration"}

    # No branch task: a deploy-only run skips the download, and with it everything up to the registry; the form's
    # search picks the sweep's mapped jobs (none with tune) or the tuning job (skipped with sweep).
    assert not [task.task_id for task in dag.tasks if task.task_type.endswith("BranchDecoratedOperator")]
    assert upstream("download") == set()
    assert upstream("validate") == upstream("upload") == {"download"}
    assert upstream("training_requests") == {"upload"}
    assert upstream("train") == {"training_requests"}
    assert upstream("tune") == {"upload"}
    assert upstream("select_best") == {"train", "tune"}
    assert dag.get_task("select_best").trigger_rule == "none_failed_min_one_success"
    assert upstream("gate") == {"select_best"}
    # What the gate lets through is registered (a model package version); the registry says what to deploy.
    assert upstream("register") == {"gate", "select_best", "upload"}
    # Approval manual: a person answers in the UI before anything is chosen; auto: the review skips itself.
    assert upstream("review") == {"register", "select_best", "validate", "gate"}
    assert upstream("candidate") == {"register", "review"}
    assert dag.get_task("candidate").trigger_rule == "none_failed"  # after a refusal or a deploy-only run too
    assert upstream("deploy") == {"candidate"}
    assert upstream("monitor") == {"deploy", "candidate"}
    # Whatever happened, a deployment left unchecked is undone, then the run is reported: two teardowns, which run
    # after their upstream whatever their state and leave the run's state to them: the monitoring check is what a
    # run ends with.
    assert upstream("undo_unchecked") == {"candidate", "deploy", "monitor"}
    assert upstream("report") == {
        "validate",
        "select_best",
        "gate",
        "review",
        "candidate",
        "deploy",
        "monitor",
        "undo_unchecked",
    }
    for task_id in ("undo_unchecked", "report"):
        teardown = dag.get_task(task_id)
        assert teardown.is_teardown and not teardown.on_failure_fail_dagrun, task_id
    assert [task.task_id for task in dag.tasks if not task.downstream_list] == ["report"]
    # The uploaded dataset and the champion are Assets: their lineage shows in the Assets view, and the champion
    # schedules the batch predictions.
    assert [asset.name for asset in dag.get_task("upload").outlets] == ["mnist_dataset"]
    assert [asset.name for asset in dag.get_task("monitor").outlets] == ["mnist_champion"]


def test_the_longest_update_the_form_allows_fits_the_deploy_task_s_timeout(dag):
    """A deploy the task's timeout ended mid-update would leave the update running unwatched: the traffic fields'
    own bounds (each shift, every step size, the longest wait and bake) keep the longest deploy inside it, the form
    says so, and a form that did not would not load."""
    from airflow.sdk import Param

    from tasks.params import PARAMS, check_traffic_bounds, longest_deploy_seconds
    from tasks.policy import DEPLOY_TIMEOUT_SECONDS, deploy_seconds, traffic_of, update_seconds

    timeout = dag.get_task("deploy").execution_timeout.total_seconds()
    assert timeout == DEPLOY_TIMEOUT_SECONDS == 3 * 3600
    # The worst case: ten linear steps of 10%, nine waits of 600 s and a 1800 s bake after the fleet's launch (600),
    # waited for after an earlier update settles (1800), with a poll's margin (600).
    worst = {"traffic_shift": "linear", "traffic_percent": 10, "traffic_wait_seconds": 600, "bake_seconds": 1800}
    assert update_seconds(**traffic_of(worst)) == 600 + 9 * 600 + 1800 == 7800
    assert longest_deploy_seconds() == deploy_seconds(worst) == 1800 + 7800 + 600 <= timeout
    for name in ("traffic_wait_seconds", "bake_seconds"):
        assert "fits the deploy task's 3 h timeout" in dag.params.get_param(name).description, name
    # The run's teardown, which undoes what a failed deploy left, may wait for the update to end.
    assert dag.get_task("undo_unchecked").execution_timeout.total_seconds() >= update_seconds(**traffic_of(worst))

    # Wider bounds would not fit, and the form would not load.
    check_traffic_bounds()
    wider = {**PARAMS, "traffic_wait_seconds": Param(10, type="integer", minimum=0, maximum=3600)}
    # 34,800 s of update, capped at SageMaker's 28,800, between the same 1800 s and 600 s.
    with pytest.raises(ValueError, match=r"allow a deploy of 31200 s, longer than the deploy task's timeout of 10800"):
        check_traffic_bounds(wider)
    finer = {**PARAMS, "traffic_percent": Param(20, type="integer", minimum=1, maximum=100)}
    assert longest_deploy_seconds(finer) == 31200 > timeout  # 100 steps of 1%


def test_the_review_is_the_providers_human_in_the_loop_operator_and_the_run_outlasts_its_wait(dag):
    """Approve or Reject, a comment, the alert topic told; the form's longest approval_timeout fits in the run's
    timeout, so that a run nobody answers ends by the review's timeout (skipped), not by the run's (failed)."""
    from airflow.providers.standard.operators.hitl import HITLOperator

    from tasks.notifications import PipelineNotifier

    review = dag.get_task("review")
    assert isinstance(review, HITLOperator) and review.options == ["Approve", "Reject"] and not review.multiple
    assert review.defaults is None  # no answer is no approval: a timeout leaves the version pending
    assert list(review.serialized_params) == ["comment"]  # the form's own fields stay off the request
    [notifier] = review.notifiers
    assert isinstance(notifier, PipelineNotifier) and notifier.event == "approval_waiting"
    longest = datetime.timedelta(minutes=dag.params.get_param("approval_timeout").schema["maximum"])
    assert longest == datetime.timedelta(days=7) and dag.dagrun_timeout >= longest + datetime.timedelta(hours=12)
    assert "stays PendingManualApproval" in dag.params.get_param("approval_timeout").description


def test_failures_and_late_runs_are_told_to_the_alert_topic():
    """As the DAG file defines it (the dag fixture drops the deadline, for dag.test()): SNS on a failed run, a failed
    check, a failed deployment, and a deadline alert well before the run's timeout."""
    from airflow.dag_processing.dagbag import DagBag

    from tasks.notifications import PipelineNotifier

    written = DagBag(str(DAG_FILE.parent)).dags["mnist_sweep"]
    assert (
        isinstance(written.on_failure_callback, PipelineNotifier) and written.on_failure_callback.event == "run_failed"
    )
    for task_id, event in (("monitor", "check_failed"), ("deploy", "deploy_failed")):
        [callback] = written.get_task(task_id).on_failure_callback
        assert isinstance(callback, PipelineNotifier) and callback.event == event, task_id
    [deadline] = written.deadline
    assert deadline.interval == datetime.timedelta(hours=4) < written.dagrun_timeout
    assert deadline.callback.path == "tasks.notifications.deadline_missed"
    with pytest.raises(ValueError, match="unknown notification event 'oops'"):
        PipelineNotifier("oops")


def test_schedule_comes_from_configuration(monkeypatch):
    monkeypatch.setenv("MNIST_PIPELINE_SCHEDULE", "0 3 * * 1")
    code = (
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('mnist_sweep', {str(DAG_FILE)!r})\n"
        "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
        "print(module.sweep_schedule())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert result.stdout.strip().splitlines()[-1] == "0 3 * * 1"


@pytest.mark.parametrize(
    ("conf", "param"),
    [
        ({"hidden_channels": [0, 5]}, "hidden_channels"),
        ({"hidden_channels": []}, "hidden_channels"),
        ({"hidden_channels": [4, 4]}, "hidden_channels"),
        ({"hidden_channels": list(range(1, 18))}, "hidden_channels"),
        ({"epochs": 0}, "epochs"),
        ({"optimizer": "rmsprop"}, "optimizer"),
        ({"instance_type": "m5.xlarge"}, "instance_type"),
        ({"endpoint_name": "bad_name"}, "endpoint_name"),
        ({"endpoint_name": "mnist-classifier\n"}, "endpoint_name"),  # the pattern is matched whole
        ({"instance_type": "ml.m5.xlarge\n"}, "instance_type"),
        ({"min_test_accuracy": 97}, "min_test_accuracy"),  # a percentage, not a fraction
        ({"accuracy_tolerance": -0.01}, "accuracy_tolerance"),
        ({"smoke_requests": 0}, "smoke_requests"),
        ({"max_error_rate": 1.5}, "max_error_rate"),
        ({"max_5xx_rate": 1.5}, "max_5xx_rate"),
        ({"min_rate_requests": 0}, "min_rate_requests"),
        ({"traffic_percent": 5}, "traffic_percent"),  # SageMaker's linear steps are 10-50% of the fleet
        ({"traffic_wait_seconds": 601}, "traffic_wait_seconds"),
        ({"bake_seconds": 1801}, "bake_seconds"),
        ({"search": "grid"}, "search"),
        ({"tune_strategy": "Annealing"}, "tune_strategy"),
        ({"tune_lr": [0.1]}, "tune_lr"),  # a range is [low, high]
        ({"tune_dropout": [0.1, 0.95]}, "tune_dropout"),
        ({"tune_max_parallel": 0}, "tune_max_parallel"),
        ({"approval": "sometimes"}, "approval"),
        ({"approval_timeout": 0}, "approval_timeout"),
        ({"capture_percentage": 101}, "capture_percentage"),
        ({"capture_percentage": -1}, "capture_percentage"),
        ({"approval_timeout": 7 * 24 * 60 + 1}, "approval_timeout"),  # a week at most
    ],
)
def test_invalid_params_are_refused_naming_the_param(dag, conf, param):
    """Each field's schema, as the trigger form and a run's creation apply it (ParamsDict.update validates)."""
    import copy

    from airflow.sdk.exceptions import ParamValidationError

    with pytest.raises(ParamValidationError, match=f"Invalid input for param {param}"):
        copy.deepcopy(dag.params).update(conf)


def test_a_run_with_an_invalid_param_is_refused_before_it_starts(dag, airflow_db):
    """The same check stops a run created with the bad value (here dag.test, as the REST API would create it)."""
    from airflow.sdk.exceptions import ParamValidationError

    with pytest.raises(ParamValidationError, match="Invalid input for param hidden_channels"):
        dag.test(run_conf={"hidden_channels": [0, 5]})


@pytest.mark.aws
@pytest.mark.skipif(
    not (os.environ.get("AIRFLOW_CONN_AWS_DEFAULT") and os.environ.get("MNIST_PIPELINE_ROLE_ARN")),
    reason="needs AIRFLOW_CONN_AWS_DEFAULT with AWS credentials, MNIST_PIPELINE_ROLE_ARN and MNIST_PIPELINE_BUCKET",
)
def test_sagemaker_sweep_on_aws(airflow_db, real_mnist, monkeypatch):
    """Opt in with `-m aws`: AIRFLOW_CONN_AWS_DEFAULT (real credentials), MNIST_PIPELINE_ROLE_ARN and
    MNIST_PIPELINE_BUCKET (existing) set. One real 1-epoch job on SageMaker, no deployment: ~10 minutes, cents."""
    conf = {"hidden_channels": [4], "epochs": 1, "deploy": False, "mnist_mirror": str(real_mnist)}
    run = run_sweep(conf)
    assert str(run.state) == "success", states(run)
    [best] = xcoms(run.run_id, "select_best")
    assert best["hidden_channels"] == 4 and best["test_accuracy"] > 0.9
    assert best["model_data_url"].endswith("/output/model.tar.gz")


def test_nothing_branches_on_where_it_runs():
    """One code path: no backend setting, no local-only module is left for the DAG or the pipeline code to reach."""
    result = subprocess.run(
        ["grep", "-rnE", r"backend[]\"']{0,2} *(==|!=)|train_\{", "dags", "tasks"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.stdout == ""
