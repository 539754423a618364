"""The drift check's DAG as it parses (dags/mnist_drift.py), the settings that schedule it and retraining, and the
notes its runs and the runs it starts get. Its behaviour on real traffic: tests/test_drift.py (`make test-long`)."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from tests.conftest import ROOT
from tests.helpers.dag_runs import parse_dag

DRIFT_DAG_FILE = ROOT / "dags" / "mnist_drift.py"
SWEEP_DAG_FILE = ROOT / "dags" / "mnist_sweep.py"


@pytest.fixture(scope="module")
def dag():
    return parse_dag("mnist_drift")


def test_the_drift_dag_checks_then_alerts_each_task_bounded(dag):
    from airflow.sdk import Asset

    assert dag.dag_id == "mnist_drift" and dag.max_active_runs == 1 and dag.catchup is False
    assert dag.doc_md.lstrip().startswith("# MNIST drift check")
    assert [task.task_id for task in dag.topological_sort()] == ["configuration", "check_capture", "alert"]
    for task in dag.tasks:
        assert task.retries >= 2 and task.execution_timeout is not None, task.task_id
    alert = dag.get_task("alert")
    # It reads the drift asset's last event (for retrain_interval_hours) and emits the next.
    assert alert.outlets == [Asset(name="mnist_drift", uri="x-mnist-pipeline://monitoring/drift", group="mnist")]
    assert alert.inlets == alert.outlets
    assert dag.params["min_requests"] == 500 and dag.params["max_requests"] == 200_000
    for name in ("endpoint_name", "min_requests", "max_requests"):
        param = dag.params.get_param(name)
        assert param.schema.get("title") and param.description, name
        assert "pattern" in param.schema or {"minimum", "maximum"} <= set(param.schema), name


@pytest.mark.parametrize(
    ("conf", "param"),
    [
        ({"min_requests": 499}, "min_requests"),
        ({"max_requests": 1_000_001}, "max_requests"),
        ({"endpoint_name": "bad_name"}, "endpoint_name"),
    ],
)
def test_invalid_params_are_refused_naming_the_param(dag, conf, param):
    import copy

    from airflow.sdk.exceptions import ParamValidationError

    with pytest.raises(ParamValidationError, match=f"Invalid input for param {param}"):
        copy.deepcopy(dag.params).update(conf)


def _schedules(cases: list[tuple]) -> list[str]:
    """repr of the schedule of each (dag_file, settings) in ``cases`` (its ``sweep_schedule()`` or
    ``drift_schedule()``), the file parsed under the configuration the settings give (in one process: each parse
    costs Airflow's import once)."""
    code = (
        "import importlib.util, json, os, sys\n"
        "for path, settings in json.loads(sys.argv[1]):\n"
        "    os.environ.update({f'MNIST_PIPELINE_{k.upper()}': v for k, v in settings.items()})\n"
        "    spec = importlib.util.spec_from_file_location('dag', path)\n"
        "    module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
        "    schedule = getattr(module, 'sweep_schedule', None) or module.drift_schedule\n"
        "    print('SCHEDULE', repr(schedule()))\n"
        "    for k in settings: del os.environ[f'MNIST_PIPELINE_{k.upper()}']\n"
    )
    cases = json.dumps([(str(path), settings) for path, settings in cases])
    result = subprocess.run([sys.executable, "-c", code, cases], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    return [line.removeprefix("SCHEDULE ") for line in result.stdout.splitlines() if line.startswith("SCHEDULE ")]


def test_schedules_come_from_the_configuration():
    hourly, none, alone, on_drift, both = _schedules(
        [
            (DRIFT_DAG_FILE, {}),
            (DRIFT_DAG_FILE, {"drift_schedule": "none"}),
            (SWEEP_DAG_FILE, {"retrain_on_drift": "false"}),
            (SWEEP_DAG_FILE, {"retrain_on_drift": "true"}),
            (SWEEP_DAG_FILE, {"retrain_on_drift": "true", "schedule": "0 3 * * 1"}),
        ]
    )
    assert (hourly, none, alone) == ("'@hourly'", "None", "None")
    # retrain_on_drift: the sweep runs on the drift asset, and on its own schedule too when it has one.
    assert on_drift.startswith("Asset(name='mnist_drift'")
    assert both.startswith("AssetOrTimeSchedule(") and "0 3 * * 1" in both and "mnist_drift" in both


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"retrain_on_drift": "yes"}, "retrain_on_drift must be true or false, got 'yes'"),
        ({"retrain_interval_hours": 0}, "retrain_interval_hours must be 1-720, got 0"),
        ({"retrain_interval_hours": 721}, "retrain_interval_hours must be 1-720, got 721"),
    ],
)
def test_drift_settings_out_of_bounds_are_refused_naming_them(settings, message):
    from tasks.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config(**settings)


def test_retraining_is_due_once_per_interval():
    import datetime

    from tasks.config import load_config
    from tasks.drift import retraining_due

    config = load_config(retrain_interval_hours=24)
    now = datetime.datetime(2026, 12, 7, 12, tzinfo=datetime.UTC)
    assert retraining_due(config, None, now)
    assert not retraining_due(config, now - datetime.timedelta(hours=23, minutes=59), now)
    assert retraining_due(config, now - datetime.timedelta(hours=24), now)


def test_the_notes_say_what_the_check_found_and_why_a_sweep_retrains():
    from ui.run_note import drift_summary, retraining_reason

    found = {
        "verdict": "drift",
        "summary": "Drift in 600 requests to e: intensity_ratio is 5.9, above its maximum.",
        "report": "s3://b/p/drift-runs/r/report/report.html",
    }
    assert drift_summary({"check_capture": found, "alert": {"asset_event": True}}, "success") == (
        f"{found['summary']} Asked for retraining (an mnist_drift asset event). Report: {found['report']}."
    )
    assert "no retraining asked: one was asked within retrain_interval_hours" in drift_summary(
        {"check_capture": found}, "success"
    )
    assert drift_summary({}, "failed").startswith("Drift check failed: the capture was not read")
    event = SimpleNamespace(asset=SimpleNamespace(name="mnist_drift"), extra={"summary": found["summary"]})
    other = SimpleNamespace(asset=SimpleNamespace(name="mnist_dataset"), extra={"uri": "s3://b/d/"})
    assert retraining_reason([other, event]) == f"Retraining because of drift: {found['summary']} "
    assert retraining_reason([other]) == ""
