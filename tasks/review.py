"""Approval in the Airflow UI: with approval `manual`, the run registers its version, then asks a person.

The `review` task (tasks.operators.ReviewOperator, the standard provider's human-in-the-loop operator) writes a
request, in the words this module makes, that shows what a reviewer needs (the candidate's and the champion's test
accuracy and per-digit accuracy, the hyperparameters, the version's ARN, a link to the run's report) and waits in `awaiting_input`, holding no worker slot, for an answer
under Browse → Required Actions or on the task's page:
- **Approve**: the version is Approved, the reviewer's name, the time and their comment its ApprovalDescription; the
  run then deploys and checks it as with approval `auto` (tasks.registry.choose_model);
- **Reject**: the version is Rejected, the comment as the reason; the champion keeps serving;
- **no answer** within the run's `approval_timeout`: the version stays PendingManualApproval and the task ends
  skipped, saying so: the run is neither failed nor deployed. `mnist-pipeline approve VERSION` (or the registry on
  AWS) and a deploy-only run serve it later, as before.

A version decided outside the UI (the command line, AWS's console) before the request is made is not asked about
again: a retry of the task, or a person who was quicker, finds it decided.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping
from urllib.parse import quote

from tasks.names import DAG_ID
from tasks.report import REPORT_VIEW_PREFIX

APPROVE, REJECT = "Approve", "Reject"  # the answers, as the request's buttons show them
COMMENT = "comment"  # the request's one form field


def minutes(count: int) -> str:
    return f"{count} minute{'' if count == 1 else 's'}"


def _percent(fraction: float | None) -> str:
    return "—" if fraction is None else f"{100 * fraction:.2f}%"


def _points(candidate: float | None, champion: float | None) -> str:
    """The difference in percentage points, signed."""
    return "—" if candidate is None or champion is None else f"{100 * (candidate - champion):+.2f}"


def version_metadata(description: Mapping | None) -> dict:
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
    ours, theirs = version_metadata(candidate), version_metadata(champion)
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
