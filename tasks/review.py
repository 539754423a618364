"""Approval in the Airflow UI: with approval `manual`, the run registers its version, then asks a person.

The `review` task is the standard provider's human-in-the-loop operator. It writes a request that shows what a
reviewer needs (the candidate's and the champion's test accuracy and per-digit accuracy, the hyperparameters, the
version's ARN, a link to the run's report) and waits in `awaiting_input`, holding no worker slot, for an answer
under Browse → Required Actions or on the task's page:
- **Approve**: the version is Approved, the reviewer's name, the time and their comment its ApprovalDescription; the
  run then deploys and checks it as with approval `auto` (tasks.registry.choose_model);
- **Reject**: the version is Rejected, the comment as the reason; the champion keeps serving;
- **no answer** within the run's `approval_timeout`: the version stays PendingManualApproval and the task ends
  skipped, saying so: the run is neither failed nor deployed. `mnist-pipeline approve VERSION` (or the registry on
  AWS) and a deploy-only run serve it later, as before.

A version decided outside the UI (the command line, AWS's console) before the request is made is not asked about
again: a retry of the task, or a person who was quicker, finds it decided. Imported by the DAG at parse time: light,
the provider's operator aside.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping
from urllib.parse import quote

from airflow.providers.standard.operators.hitl import HITLOperator
from airflow.sdk import Param
from airflow.sdk.configuration import conf
from airflow.sdk.definitions.param import ParamsDict
from airflow.sdk.exceptions import AirflowSkipException
from airflow.sdk.timezone import utcnow

from tasks import registry
from tasks.dag_tasks import config_of
from tasks.names import DAG_ID
from tasks.report import REPORT_VIEW_PREFIX, build_report

APPROVE, REJECT = "Approve", "Reject"  # the answers, as the request's buttons show them
COMMENT = "comment"  # the request's one form field
# The form's approval_timeout (minutes): how long a run waits for an answer. The run's own timeout makes room for
# the longest wait (dags/mnist_sweep.py).
DEFAULT_TIMEOUT_MINUTES, MAX_TIMEOUT_MINUTES = 24 * 60, 7 * 24 * 60


def minutes(count: int) -> str:
    return f"{count} minute{'' if count == 1 else 's'}"


def _percent(fraction: float | None) -> str:
    return "—" if fraction is None else f"{100 * fraction:.2f}%"


def _points(candidate: float | None, champion: float | None) -> str:
    """The difference in percentage points, signed."""
    return "—" if candidate is None or champion is None else f"{100 * (candidate - champion):+.2f}"


def _metadata(description: Mapping | None) -> dict:
    """What the version's CustomerMetadataProperties say of it (tasks.registry.registration wrote them)."""
    metadata = (description or {}).get("CustomerMetadataProperties") or {}
    try:
        per_class = json.loads(metadata.get("per_class_accuracy") or "null") or []
    except ValueError:  # cut at the registry's 256 characters
        per_class = []
    return {
        "test_accuracy": float(metadata["test_accuracy"]) if metadata.get("test_accuracy") else None,
        "per_class": per_class,
        "hidden_channels": metadata.get("hidden_channels", "—"),
        "parameters": f"{int(metadata['parameters']):,}" if metadata.get("parameters", "").isdigit() else "—",
    }


def report_link(run_id: str, base_url: str = "") -> str:
    """The run's report in the project's report view (ui/report_view.py), under the UI's address when known."""
    return f"{base_url.rstrip('/')}{REPORT_VIEW_PREFIX}/{DAG_ID}/{quote(run_id, safe='')}/report/report.html"


def request_text(
    candidate: Mapping,
    champion: Mapping | None,
    hyperparameters: Mapping,
    params: Mapping,
    *,
    run_id: str,
    link: str,
    deadline: datetime.datetime,
) -> tuple[str, str]:
    """The request's subject and Markdown body, from the candidate's and the champion's registry descriptions
    (``champion`` None: the endpoint has none) and the run's params."""
    endpoint, number = params["endpoint_name"], candidate["ModelPackageVersion"]
    ours, theirs = _metadata(candidate), _metadata(champion)
    versus = (
        f"champion version {champion['ModelPackageVersion']}: {_percent(theirs['test_accuracy'])}"
        if champion
        else "no champion"
    )
    subject = f"Approve version {number} of {endpoint}? Test accuracy {_percent(ours['test_accuracy'])} ({versus})"
    header = "champion" + (f" (version {champion['ModelPackageVersion']})" if champion else "")
    rows = [
        [
            "**all digits (test accuracy)**",
            _percent(ours["test_accuracy"]),
            _percent(theirs["test_accuracy"]),
            _points(ours["test_accuracy"], theirs["test_accuracy"]),
        ]
    ]
    for digit in range(10):
        mine = ours["per_class"][digit] if digit < len(ours["per_class"]) else None
        other = theirs["per_class"][digit] if digit < len(theirs["per_class"]) else None
        rows.append([f"digit {digit}", _percent(mine), _percent(other), _points(mine, other)])
    rows += [
        ["hidden_channels", str(ours["hidden_channels"]), str(theirs["hidden_channels"]) if champion else "—", ""],
        ["parameters", str(ours["parameters"]), str(theirs["parameters"]) if champion else "—", ""],
    ]
    table = [f"| | candidate (version {number}) | {header} | difference (points) |", "| --- | ---: | ---: | ---: |"]
    table += ["| " + " | ".join(row) + " |" for row in rows]
    settings = ", ".join(f"`{key}={value}`" for key, value in sorted(hyperparameters.items()))
    deploys = (
        f"deployed to endpoint `{endpoint}` ({params['traffic_shift'].replace('_', ' ')}, baked "
        f"{params['bake_seconds']} s) and checked; a failed check rolls it back and rejects it"
        if params["deploy"]
        else "not deployed by this run (its deploy param is off): the next run, or a deploy-only run, serves it"
    )
    lines = [
        f"Run `{run_id}` trained **version {number}** of model package group `{endpoint}`; it waits for your "
        "approval before it serves.",
        "",
        *table,
        "",
        f"- **Hyperparameters**: {settings or '—'}",
        f"- **Version ARN**: `{candidate['ModelPackageArn']}`",
        f"- **Model**: `{candidate['InferenceSpecification']['Containers'][0]['ModelDataUrl']}`",
        f"- **Sweep report** (every trial, learning curves, confusion matrix, misclassified digits): [open]({link})",
        "",
        f"**{APPROVE}**: version {number} is Approved (your name, the time and your comment are recorded on it), "
        f"then {deploys}.",
        "",
        f"**{REJECT}**: version {number} is Rejected, your comment recorded as the reason; what serves now keeps "
        "serving.",
        "",
        f"**No answer by {deadline:%Y-%m-%d %H:%M} UTC** (approval_timeout, {minutes(params['approval_timeout'])}): "
        f"version {number} stays PendingManualApproval and the run ends without deploying it; `mnist-pipeline "
        f"approve {number}` and a deploy-only run can serve it later.",
    ]
    return subject[:200], "\n".join(lines)


class ReviewOperator(HITLOperator):
    """Asks a person to approve or reject the version this run registered (``model_package_arn``), records the
    answer on the version, and returns what happened (``outcome``). ``best``, ``validation`` and ``gate`` are the
    run's, for the report the request links to: written before the request, rewritten when the run ends."""

    template_fields = (*HITLOperator.template_fields, "settings", "model_package_arn", "best", "validation", "gate")

    def __init__(self, *, settings, model_package_arn, best, validation, gate, params=None, **kwargs):
        # Airflow hands every task the DAG's params; the request's form is the provider's pick of the task's own.
        form = params if isinstance(params, ParamsDict) else ParamsDict(params or {})
        form[COMMENT] = Param(
            None,
            source="task",
            type=["null", "string"],
            title="Comment",
            description="Why you approve or reject this version: recorded on it in the model registry "
            "(ApprovalDescription), with your name and the time.",
        )
        super().__init__(
            subject="Approve the version this run registered?",  # the request's own is written as it is made
            options=[APPROVE, REJECT],
            params=form,
            # The form's approval_timeout replaces this as the request is made.
            response_timeout=datetime.timedelta(minutes=DEFAULT_TIMEOUT_MINUTES),
            **kwargs,
        )
        self.settings, self.model_package_arn = settings, model_package_arn
        self.best, self.validation, self.gate = best, validation, gate
        self.request: dict = {}  # what the notifiers tell of the request (tasks.notifications)

    def _config(self):
        return config_of(self.settings)

    def execute(self, context):
        config, params, run_id = self._config(), context["params"], context["run_id"]
        candidate = registry.describe(config, self.model_package_arn)
        number = candidate["ModelPackageVersion"]
        if candidate["ModelApprovalStatus"] != registry.PENDING:
            # Decided already, outside the UI or by an earlier try of this task: asking again would only confuse.
            return outcome(
                candidate,
                summary=f"Version {number} was {candidate['ModelApprovalStatus']} before the "
                f"request was made: {candidate.get('ApprovalDescription') or 'no description'}.",
            )
        current = registry.champion(config, params["endpoint_name"])
        champion = registry.describe(config, current["model_package_arn"]) if current else None
        self.response_timeout = datetime.timedelta(minutes=params["approval_timeout"])
        deadline = utcnow() + self.response_timeout
        link = report_link(run_id, conf.get("api", "base_url", fallback="") or "")
        self.subject, self.body = request_text(
            candidate,
            champion,
            (self.best or {}).get("hyperparameters") or {},
            params,
            run_id=run_id,
            link=link,
            deadline=deadline,
        )
        waiting = outcome(
            candidate,
            waiting=True,
            deadline=deadline.isoformat(),
            summary=(
                f"Version {number} waits for a reviewer in the Airflow UI (Browse → Required Actions, or this run's "
                f"`review` task) until {deadline:%Y-%m-%d %H:%M} UTC; this report is written again when the run "
                "ends."
            ),
        )
        # The report the request links to, there before anyone opens it; the run's last task writes it again.
        build_report(run_id, self.best, validation=self.validation, gate=self.gate, approval=waiting, config=config)
        self.request = {
            **waiting,
            "subject": self.subject,
            "endpoint_name": params["endpoint_name"],
            "test_accuracy": _metadata(candidate)["test_accuracy"],
            "champion_accuracy": _metadata(champion)["test_accuracy"] if champion else None,
        }
        return super().execute(context)

    def execute_complete(self, context, event: dict):
        config, run_id = self._config(), context["run_id"]
        if event.get("error_type") == "timeout":
            candidate = registry.describe(config, self.model_package_arn)
            number, status = candidate["ModelPackageVersion"], candidate["ModelApprovalStatus"]
            waited = minutes(context["params"]["approval_timeout"])
            if status != registry.PENDING:  # decided meanwhile outside the UI (the command line, AWS's console)
                return outcome(
                    candidate,
                    summary=f"No answer in the Airflow UI within {waited}; meanwhile version "
                    f"{number} was {status}: {candidate.get('ApprovalDescription') or ''}.",
                )
            timed_out = outcome(
                candidate,
                timed_out=True,
                summary=(
                    f"No answer within {waited} (approval_timeout): version {number} stays PendingManualApproval and "
                    f"is not deployed; `mnist-pipeline approve {number}` and a deploy-only run can serve it."
                ),
            )
            context["ti"].xcom_push("return_value", timed_out)  # for the report: the task ends skipped
            raise AirflowSkipException(timed_out["summary"])
        answered = super().execute_complete(context, event)  # the provider's checks of the answer
        answer = answered["chosen_options"][0]
        comment = " ".join(str(answered["params_input"].get(COMMENT) or "").split())
        who = (answered.get("responded_by_user") or {}).get("name") or "an unknown user"
        when = answered["responded_at"].astimezone(datetime.UTC)
        status = registry.APPROVED if answer == APPROVE else registry.REJECTED
        said = f": {comment}" if comment else " (no comment)"
        description = (
            f"{status} by {who} in the Airflow UI at {when:%Y-%m-%d %H:%M:%S} UTC ({DAG_ID} run {run_id}){said}"
        )
        registry.set_approval(config, self.model_package_arn, status, description)
        return outcome(
            registry.describe(config, self.model_package_arn),
            answer=answer,
            by=who,
            at=when.isoformat(),
            comment=comment,
            summary=description,
        )


def outcome(description: Mapping, **found) -> dict:
    """What the review returns (and the report shows): the version, where it stands, and ``found`` (the answer,
    ``by``, ``at``, ``comment``; ``waiting`` and ``deadline`` while it waits; ``timed_out``; ``summary``, a
    sentence)."""
    return {
        "version": description["ModelPackageVersion"],
        "model_package_arn": description["ModelPackageArn"],
        "status": description["ModelApprovalStatus"],
        "answer": None,
        "waiting": False,
        "timed_out": False,
        **found,
    }
