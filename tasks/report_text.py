"""The text of a run's report: its Markdown (the verdict, the trial table, the best model, the data validation, the
gate, the approval, the deployment and the monitoring check) and that Markdown as a standalone HTML page, which the
drift check's report uses too."""

from __future__ import annotations

import html
from collections.abc import Mapping


def trial_label(trial: Mapping) -> str:
    """How the report and its curves name a trial: a sweep's by its hidden_channels, a tuner's by its number (the
    NNN of SageMaker's `<tuning job>-NNN-xxxxxxxx`)."""
    if "tuned" in trial:
        return trial["training_job_name"].rsplit("-", 2)[-2]
    return str(trial["hidden_channels"])


def _percent(fraction: float | None) -> str:
    return "—" if fraction is None else f"{100 * fraction:.2f}%"


def _number(value, spec: str = "") -> str:
    return "—" if value is None else format(value, spec)


def _figure(value: float) -> str:
    """A measured figure, readable whatever its size: 23,912 rather than 2.391e+04."""
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _deployment_verdict(choice: Mapping | None, deployment: Mapping | None, monitoring: Mapping | None) -> str:
    if choice is None:
        return "no deployment was chosen (a task before it failed)."
    if not choice["deploy"]:
        return f"nothing deployed: {choice['reason']}."
    model = choice["model"]
    what = f"version {model['version']} ({_percent(model['test_accuracy'])} test accuracy; {choice['reason']})"
    if deployment is None:
        return f"{what} was to be deployed; the deployment did not finish."
    where = f"endpoint `{deployment['endpoint_name']}` (config `{deployment['endpoint_config_name']}`)"
    if update := deployment.get("deployment_config"):
        policy = update["BlueGreenUpdatePolicy"]
        shift = policy["TrafficRoutingConfiguration"]["Type"].lower().replace("_", " ")
        where += f" blue/green, {shift}, baked {policy['TerminationWaitInSeconds']} s under its alarms"
    if monitoring is None:
        return f"{what} deployed to {where}; no monitoring check ran."
    if monitoring.get("passed"):
        return f"{what} deployed to {where} and passed its monitoring check: it serves now, Approved (the champion)."
    rollback = (monitoring.get("rollback") or {}).get("action", "none")
    return f"{what} deployed to {where}, **failed its monitoring check** and was rolled back ({rollback}); Rejected."


def _verdict(
    best: Mapping | None,
    gate: Mapping | None,
    choice: Mapping | None,
    deployment: Mapping | None,
    monitoring: Mapping | None,
    approval: Mapping | None = None,
) -> str:
    if approval and approval.get("waiting"):
        deployed = f"version {approval['version']} waits for a reviewer's approval in the Airflow UI."
    else:
        deployed = _deployment_verdict(choice, deployment, monitoring)
    if best is None:
        return f"Deploy-only run: {deployed}"
    winner = f"**hidden_channels {best['hidden_channels']}** won with {_percent(best['test_accuracy'])} test accuracy"
    if gate is not None and not gate["deploy"]:
        return f"{winner}; the gate refused it ({gate['reason']}): not registered. Deployment: {deployed}"
    return f"{winner}; registered past the gate. Deployment: {deployed}"


def _validation_lines(validation: Mapping | None, data_docs_link: str | None) -> list[str]:
    if validation is None:
        return ["No validation summary was passed to the report."]
    counts, expected = validation["counts"], validation["expected_counts"]
    lines = [
        f"**{'Passed' if validation['success'] else 'Failed'}**: {validation['expectations']} expectations on "
        f"{counts['train']} training and {counts['test']} test images (expected {expected['train']} and "
        f"{expected['test']}), in {validation['seconds']:.2f} s."
    ]
    lines += [f"- {failure}" for failure in validation.get("failures", [])]
    if data_docs_link:
        lines.append(f"\nFull results: [the Data Docs]({data_docs_link}).")
    return lines


def _gate_lines(gate: Mapping | None) -> list[str]:
    if gate is None:
        return ["No gate ran for this run."]
    lines = [f"**{'Deploy' if gate['deploy'] else 'Skip deployment'}**: {gate['reason']}.", ""]
    champion = gate.get("champion_model_data_url")
    rows = [
        ["min_test_accuracy", _percent(gate.get("min_test_accuracy"))],
        ["champion's test accuracy", _percent(gate.get("champion_accuracy"))],
        ["tolerance", _percent(gate.get("tolerance"))],
        ["champion model", f"`{champion}`" if champion else "—"],
        ["champion version", f"`{gate['champion_version']}`" if gate.get("champion_version") else "—"],
    ]
    return lines + _table(["gate input", "value"], rows)


def _monitoring_lines(monitoring: Mapping | None) -> list[str]:
    if monitoring is None:
        return ["No monitoring check ran for this run."]
    lines = [f"**{'Passed' if monitoring.get('passed') else 'Failed'}** (endpoint `{monitoring['endpoint_name']}`)."]
    lines += [f"- failed: {failure}" for failure in monitoring.get("failures", [])]
    # Figures the verdict leaves out, and why: others' client errors, a 5XX rate over too few invocations.
    lines += [f"- reported, not judged: {note}" for note in monitoring.get("notes", [])]
    if monitoring.get("rollback"):
        rollback = monitoring["rollback"]
        lines.append(f"- rollback: {rollback['action']}, serving now: `{rollback.get('endpoint_config_name')}`")
    load, cloudwatch = monitoring.get("load") or {}, monitoring.get("cloudwatch") or {}
    latency = f"{_number(load.get('p50_ms'), '.1f')} / {_number(load.get('p99_ms'), '.1f')}"
    figures = [
        ["smoke requests", _number(load.get("requests"))],
        ["errors", _number(load.get("errors"))],
        ["live accuracy", _percent(load.get("live_accuracy"))],
        ["latency p50 / p99 (ms, client)", latency],
    ]
    figures += [
        [name.replace("_", " "), _figure(value)] for name, value in cloudwatch.items() if isinstance(value, int | float)
    ]
    lines += ["", *_table(["figure", "observed"], figures)]
    if monitoring.get("alarms"):
        lines.append(f"\nAlarms: {', '.join(f'`{alarm}`' for alarm in monitoring['alarms'])}")
    return lines


def _trial_table(trials: list[Mapping], best_job: str) -> list[str]:
    """The selection's trial rows (tasks.trials.summarize_trial, plus the job; a tuner's with what it saw of each),
    the best one in bold."""
    tuning = any("tuned" in trial for trial in trials)
    header = ["trial", "tuned hyperparameters", "objective", "status"] if tuning else []
    header += [
        "hidden_channels",
        "min acc",
        "max acc",
        "avg acc",
        "last acc",
        "train loss",
        "test loss",
        "seconds",
        "parameters",
    ]
    cells = []
    for trial in trials:
        label = trial_label(trial)
        row = []
        if tuning:
            status = "stopped early" if trial.get("stopped_early") else trial.get("status", "")
            if trial.get("failure"):
                status += f": {trial['failure'][:120]}"
            tuned = ", ".join(f"{key}={value}" for key, value in sorted((trial.get("tuned") or {}).items()))
            row = [label, tuned or "—", _percent(trial.get("objective")), status]
        accuracies = [_percent(trial.get(key)) for key in ("accuracy_min", "accuracy_max", "accuracy_avg")]
        row += [
            str(trial["hidden_channels"]),
            *accuracies,
            _percent(trial["test_accuracy"]),
            _number(trial.get("train_loss"), ".4f"),
            _number(trial.get("test_loss"), ".4f"),
            _number(trial.get("seconds"), ".1f"),
            _number(trial.get("parameters"), ","),
        ]
        if trial["training_job_name"] == best_job:
            row[0] = f"**{row[0]}**"
        cells.append(row)
    return _table(header, cells)


def _approval_lines(approval: Mapping) -> list[str]:
    """A person's review in the Airflow UI (tasks/review.py's outcome): waiting, their answer, or none in time."""
    if approval.get("waiting"):
        title = "Awaiting approval"
    elif approval.get("timed_out"):
        title = "No answer"
    else:
        title = {"Approve": "Approved", "Reject": "Rejected"}.get(approval.get("answer"), approval["status"])
    lines = [f"**{title}**: {approval['summary']}", ""]
    rows = [
        ["version", f"{approval['version']} (`{approval['model_package_arn']}`)"],
        ["status in the registry", approval["status"]],
    ]
    rows += [
        [name, str(approval[key])]
        for name, key in (("answered by", "by"), ("at", "at"), ("comment", "comment"), ("waits until", "deadline"))
        if approval.get(key)
    ]
    return lines + _table(["review", "value"], rows)


def _choice_lines(choice: Mapping | None) -> list[str]:
    if choice is None:
        return ["No deployment was chosen (a task before it failed)."]
    lines = [f"**{'Deploy' if choice['deploy'] else 'Nothing to deploy'}**: {choice['reason']}."]
    if model := choice.get("model"):
        lines += [
            "",
            *_table(
                ["version", "value"],
                [
                    ["model package", f"`{model['model_package_arn']}`"],
                    ["status before the check", model["approval"]],
                    ["test accuracy", _percent(model["test_accuracy"])],
                    ["training job", f"`{model['training_job_name']}`"],
                    ["from run", f"`{model['run_id']}`"],
                ],
            ),
        ]
    return lines


def render_markdown(context: Mapping, files: Mapping[str, str]) -> str:
    """The report's Markdown; ``files``: the names of its figures' files, which it links to."""
    best = context["best"]
    kind = "Deployment" if best is None else ("Tuning" if best.get("tuning_job_name") else "Sweep")
    lines = [f"# {kind} report: {context['dag_id']} / {context['run_id']}", ""]
    if best is not None:
        jobs = f"{len(best['trials'])} training jobs"
        if best.get("tuning_job_name"):
            early = sum(1 for trial in best["trials"] if trial.get("stopped_early"))
            jobs += f" of tuning job `{best['tuning_job_name']}` ({early} stopped early)"
        lines += [f"{jobs} · best job `{best['training_job_name']}`", ""]
    lines += [
        _verdict(
            best,
            context["gate"],
            context["choice"],
            context["deployment"],
            context["monitoring"],
            context.get("approval"),
        )
    ]
    if best is not None:
        lines += [
            "",
            "## Trials",
            "",
            *_trial_table(best["trials"], best["training_job_name"]),
            "",
            f"Best model: `{best['model_data_url']}`",
        ]
    if context["curves"]:
        lines += ["", "## Learning curves", "", f"![loss and accuracy per epoch]({files['curves']})"]
    if context["best_metrics"]:
        per_class = context["best_metrics"].get("per_class_accuracy") or []
        lines += ["", f"## The best model (hidden_channels {best['hidden_channels']})", ""]
        if per_class:
            lines += _table([str(digit) for digit in range(10)], [[_percent(a) for a in per_class]])
            lines.append("")
        lines.append(f"![confusion matrix]({files['confusion_matrix']})")
        if context["misclassified_shown"]:
            total = context["misclassified_total"]
            lines += [
                "",
                f"{context['misclassified_shown']} of its {total} misclassified test digits (true→predicted):",
                "",
                f"![misclassified digits]({files['misclassified']})",
            ]
    if best is not None:
        lines += ["", "## Data validation", "", *_validation_lines(context["validation"], context["data_docs_link"])]
        lines += ["", "## Gate", "", *_gate_lines(context["gate"])]
    if context.get("approval"):
        lines += ["", "## Approval", "", *_approval_lines(context["approval"])]
    if (context.get("approval") or {}).get("waiting"):
        lines += ["", "## Deployment", "", "Decided once the review above is answered."]
        return "\n".join(lines) + "\n"
    lines += ["", "## Deployment", "", *_choice_lines(context["choice"])]
    lines += ["", "## Monitoring check", "", *_monitoring_lines(context["monitoring"])]
    return "\n".join(lines) + "\n"


HTML_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 70rem; margin: 2rem auto; padding: 0 1rem; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5rem 0; }}
th, td {{ border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: right; }}
th {{ background: #f3f3f3; }}
img {{ max-width: 100%; }}
code {{ background: #f3f3f3; padding: 0 0.2rem; }}
</style></head>
<body>
{body}
</body></html>
"""


def render_html(markdown_text: str, title: str) -> str:
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(markdown_text)
    return HTML_PAGE.format(title=html.escape(title), body=body)
