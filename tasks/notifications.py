"""Telling people: a failed run, a failed monitoring check with its rollback, a rollback during the traffic shift,
a run past its deadline, and a version waiting for a person's approval go to an SNS topic through the Amazon
provider's SnsNotifier.

The topic is the configuration's `alert_topic_arn` (read when the notification is sent; empty: none is sent), on
the pipeline's AWS connection: on AWS a topic people subscribe to (e-mail, chat, a pager); on this machine a
topic in the local AWS. Each message names the run, what failed (or what waits, with the link that answers it in
the Airflow UI), its figures and where the report is.

Imported by the DAG at parse time: light, the provider's notifier aside.
"""

from __future__ import annotations

import logging

from airflow.providers.amazon.aws.notifications.sns import SnsNotifier

from tasks.config import PipelineConfig, load_config
from tasks.names import DAG_ID

log = logging.getLogger(__name__)

EVENTS = ("run_failed", "check_failed", "deploy_failed", "deadline_missed", "approval_waiting")


def report_location(config: PipelineConfig, run_id: str) -> str:
    """Where the run's report is (or will be: the report task runs whatever happened)."""
    from tasks.report import run_s3_uri

    return f"{run_s3_uri(config, run_id)}/report/report.html"


def _ui_link(run_id: str) -> str:
    from urllib.parse import quote

    from airflow.sdk.configuration import conf

    base = conf.get("api", "base_url", fallback="").rstrip("/")
    return f"{base}/dags/{DAG_ID}/runs/{quote(run_id, safe='')}" if base else ""


def _answer_link(context) -> str:
    """Where a person answers the human-in-the-loop task of ``context`` in the Airflow UI ("" without the UI's
    address, [api] base_url)."""
    from airflow.providers.standard.operators.hitl import HITLOperator

    try:
        return HITLOperator.generate_link_to_ui_from_context(context=context)
    except ValueError:  # no base_url configured: the message says where to look instead
        return ""


def _when(moment: str | None) -> str:
    import datetime

    return datetime.datetime.fromisoformat(moment).strftime("%Y-%m-%d %H:%M UTC") if moment else "its deadline"


def _pulled(context, task_id: str):
    """A task's XCom from a task's callback context; None where the context cannot give one."""
    try:
        return context["ti"].xcom_pull(task_ids=task_id)
    except Exception:  # a DAG-level callback's context may have no task instance to ask through
        return None


def compose(event: str, context, config: PipelineConfig) -> tuple[str, str]:
    """(subject, message) of ``event`` for the run in ``context``."""
    run = context.get("dag_run")
    run_id = context.get("run_id") or (run.get("dag_run_id") if isinstance(run, dict) else getattr(run, "run_id", ""))
    where = [f"Report: {report_location(config, run_id)}"] + ([f"Run: {link}"] if (link := _ui_link(run_id)) else [])
    if event == "check_failed":
        checked = _pulled(context, "monitor") or {}
        endpoint = checked.get("endpoint_name", "?")
        rollback = checked.get("rollback") or {}
        load = checked.get("load") or {}
        figures = ", ".join(
            f"{name} {round(load[key], 3)}"
            for name, key in (
                ("live accuracy", "live_accuracy"),
                ("p99 ms", "p99_ms"),
                ("errors", "errors"),
                ("requests", "requests"),
            )
            if key in load
        )
        lines = [
            f"The monitoring check of endpoint {endpoint} (config {checked.get('endpoint_config_name', '?')}) failed "
            f"in {DAG_ID} run {run_id}.",
            *(f"- {failure}" for failure in checked.get("failures") or ["(no detail: see the monitor task's log)"]),
            f"Smoke load: {figures}." if figures else "",
            f"Rollback: {rollback.get('action', 'unknown')}"
            + (f" to {rollback['endpoint_config_name']}" if rollback.get("endpoint_config_name") else "")
            + (f" ({rollback['error']})" if rollback.get("error") else "")
            + ".",
        ]
        subject = f"MNIST: check failed on {endpoint}, rolled back"
    elif event == "deploy_failed":
        error = context.get("exception")
        lines = [f"The deployment of {DAG_ID} run {run_id} failed: {type(error).__name__ if error else ''}: {error}"]
        subject = "MNIST: deployment failed"
    elif event == "approval_waiting":
        request = getattr(context.get("task"), "request", None) or {}  # tasks.review.ReviewOperator's
        endpoint, version = request.get("endpoint_name", "?"), request.get("version", "?")
        champion = request.get("champion_accuracy")
        figures = f"test accuracy {100 * request['test_accuracy']:.2f}%" if request.get("test_accuracy") else ""
        figures += f" (the champion's: {100 * champion:.2f}%)" if champion is not None else " (no champion)"
        link = _answer_link(context)
        answer = (
            f"Approve or reject it: {link}"
            if link
            else "Approve or reject it in the Airflow UI: Browse → Required Actions."
        )
        lines = [
            f"Version {version} of {endpoint}, from {DAG_ID} run {run_id}, waits for a person's approval: {figures}.",
            answer,
            f"No answer by {_when(request.get('deadline'))}: it stays PendingManualApproval and is not deployed.",
        ]
        subject = f"MNIST: version {version} of {endpoint} awaits approval"
    elif event == "deadline_missed":
        deadline = context.get("deadline") or {}
        state = run.get("state", "running") if isinstance(run, dict) else "running"
        lines = [
            f"{DAG_ID} run {run_id} is still {state} at its deadline ({deadline.get('deadline_time', '?')}); "
            f"queued at {run.get('queued_at', '?') if isinstance(run, dict) else '?'}. dagrun_timeout ends it "
            "later if it does not finish."
        ]
        subject = f"MNIST: {DAG_ID} run past its deadline"
    else:
        ti = context.get("ti")
        failed = getattr(ti, "task_id", None)
        lines = [
            f"{DAG_ID} run {run_id} failed" + (f" (last task: {failed})" if failed else "") + ".",
            f"Reason: {context.get('reason') or 'see the run in the UI'}",
        ]
        subject = f"MNIST: {DAG_ID} run failed"
    message = "\n".join(line for line in [*lines, *where] if line)
    return subject[:100], message


class PipelineNotifier(SnsNotifier):
    """The provider's SnsNotifier, its topic, connection and message from the pipeline at the moment it is sent."""

    template_fields = ()  # composes its own message: nothing of it is a template

    def __init__(self, event: str):
        if event not in EVENTS:
            raise ValueError(f"unknown notification event {event!r} (one of {', '.join(EVENTS)})")
        super().__init__(target_arn="", message="")
        self.event = event

    def _prepare(self, context) -> bool:
        config = load_config()
        if not config.alert_topic_arn:
            log.info("No alert_topic_arn configured: the %s notification is not sent", self.event)
            return False
        self.aws_conn_id, self.region_name, self.target_arn = config.aws_conn_id, config.region, config.alert_topic_arn
        self.subject, self.message = compose(self.event, context, config)
        self.message_attributes = {"event": self.event}
        return True

    def notify(self, context):
        if self._prepare(context):
            super().notify(context)
            log.info("Sent the %s notification to %s", self.event, self.target_arn)

    async def async_notify(self, context):
        import asyncio

        # The configuration may come from an Airflow Variable: read it off the event loop.
        if await asyncio.to_thread(self._prepare, context):
            await super().async_notify(context)
            log.info("Sent the %s notification to %s", self.event, self.target_arn)


async def deadline_missed(context: dict, **kwargs) -> None:
    """The deadline alert's callback (run by the triggerer): the same notifier, asynchronously."""
    await PipelineNotifier("deadline_missed").async_notify(context)
