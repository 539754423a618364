"""The run's note: when a sweep or drift check run ends, one paragraph on it where ops teams look first, the run's
page.

The Task SDK gives a task no call that writes the note, so a listener does it, in the scheduler, as it records the
run's end: the winner and its accuracy, whether it was deployed and why not, the monitoring check's result, and
where the report is. It reads the run's XComs in the scheduler's own session and writes the note in it.
"""

from __future__ import annotations

import logging

from airflow.listeners import hookimpl

from tasks.names import DAG_ID, DRIFT_DAG_ID

log = logging.getLogger(__name__)

TASKS = ("select_best", "gate", "candidate", "deploy", "monitor", "undo_unchecked", "report")
DRIFT_TASKS = ("check_capture", "alert")
NOTE_LIMIT = 1000  # the note column's size


def summary(results: dict, state: str) -> str:
    """The paragraph for a run that ended in ``state``, from its tasks' return values (absent: did not return)."""
    best, gate, choice, deployment, check, undone, report = (results.get(task) for task in TASKS)
    check = undone or check  # a deployment left unchecked, undone by the teardown as a failed check is
    if not best and not choice:
        return f"Run {state}: no model was selected (a task before the selection failed; see the failed task)."
    parts = []
    if best:
        parts.append(
            f"Winner: hidden_channels {best['hidden_channels']} ({best['training_job_name']}), test accuracy "
            f"{100 * best['test_accuracy']:.2f}%."
        )
        if gate and not gate.get("deploy"):
            parts.append(f"Refused by the gate: {gate.get('reason')}.")
    else:
        parts.append("Deploy-only run.")
    if choice and not choice.get("deploy"):
        parts.append(f"Not deployed: {choice.get('reason')}.")
    elif not deployment:
        parts.append("Not deployed: the deployment did not finish." if choice else "Not deployed.")
    elif check and check.get("passed"):
        load = check.get("load") or {}
        figures = ", ".join(
            [f"live accuracy {100 * load['live_accuracy']:.1f}%"] * ("live_accuracy" in load)
            + [f"p99 {load['p99_ms']:.1f} ms"] * ("p99_ms" in load)
        )
        parts.append(
            f"Deployed version {choice['model']['version']} to {deployment['endpoint_name']} "
            f"({deployment['endpoint_config_name']}); it passed its monitoring check "
            f"({figures or 'no figures'}) and serves now."
        )
    elif check:
        rollback = (check.get("rollback") or {}).get("action", "unknown")
        parts.append(
            f"Deployed to {deployment['endpoint_name']}, then FAILED its monitoring check "
            f"({'; '.join(check.get('failures') or [])}); rollback: {rollback}."
        )
    else:
        parts.append(f"Deployed to {deployment['endpoint_name']}; its monitoring check did not finish.")
    if report:
        parts.append(f"Report: {report.get('html_s3_uri')} (on this machine: {report.get('html')}).")
    return _bounded(" ".join(parts))


def drift_summary(results: dict, state: str) -> str:
    """The paragraph for a drift check's run: its verdict and figures, what it did about a drift, its report."""
    result, alerted = results.get("check_capture"), results.get("alert")
    if not result:
        return f"Drift check {state}: the capture was not read (see the failed task)."
    parts = [result["summary"]]
    if result["verdict"] == "drift":
        parts.append(
            "Asked for retraining (an mnist_drift asset event)."
            if alerted
            else "Told the topic; no retraining asked: one was asked within retrain_interval_hours."
        )
    parts.append(f"Report: {result['report']}.")
    return _bounded(" ".join(parts))


def retraining_reason(events) -> str:
    """Why a sweep run started, when drift did: the drift check's summary of the window that asked for it."""
    for event in events:
        if event.asset.name == "mnist_drift" and (event.extra or {}).get("summary"):
            return f"Retraining because of drift: {event.extra['summary']} "
    return ""


def _bounded(text: str) -> str:
    return text if len(text) <= NOTE_LIMIT else text[: NOTE_LIMIT - 1] + "…"


def _results(dag_run, session, tasks: tuple[str, ...] = TASKS) -> dict:
    from airflow.models.xcom import XComModel
    from sqlalchemy import select

    rows = session.scalars(
        select(XComModel).where(
            XComModel.dag_id == dag_run.dag_id,
            XComModel.run_id == dag_run.run_id,
            XComModel.key == "return_value",
            XComModel.task_id.in_(tasks),
            XComModel.map_index == -1,
        )
    )
    return {row.task_id: XComModel.deserialize_value(row) for row in rows}


def _write(dag_run) -> None:
    from sqlalchemy.orm import object_session

    if dag_run.dag_id not in (DAG_ID, DRIFT_DAG_ID):
        return
    session = object_session(dag_run)
    if session is None:  # not the scheduler's own object: nothing to write it through
        return
    try:
        if dag_run.dag_id == DRIFT_DAG_ID:
            dag_run.note = drift_summary(_results(dag_run, session, DRIFT_TASKS), str(dag_run.state))
        else:
            reason = retraining_reason(dag_run.consumed_asset_events)
            dag_run.note = _bounded(reason + summary(_results(dag_run, session), str(dag_run.state)))
    except Exception:  # a note is a courtesy: it must never break the scheduler's handling of the run
        log.exception("Could not write the note of %s %s", dag_run.dag_id, dag_run.run_id)


@hookimpl
def on_dag_run_success(dag_run, msg: str) -> None:
    _write(dag_run)


@hookimpl
def on_dag_run_failed(dag_run, msg: str) -> None:
    _write(dag_run)
