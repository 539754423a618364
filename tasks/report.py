"""The report of one DAG run, in Markdown and HTML: what was trained, what won, and whether it now serves.

Sections: the verdict; the trial table (hidden_channels, min / max / avg / last test accuracy over the epochs,
final losses, seconds, parameters; for a tuning job also each trial's tuned hyperparameters, its objective and
whether the tuner stopped it early); per-epoch loss and accuracy curves; the best model's confusion matrix and a
grid of the test digits it got wrong; the data validation summary with a link to its Data Docs; the gate and the
monitoring check. Figures come from each job's `metrics.json` and `misclassified.npz`, read from the job's
`output.tar.gz` beside its `model.tar.gz` (SageMaker uploads SM_OUTPUT_DATA_DIR there).

Written to `<state_dir>/runs/<run>/report/` and uploaded to `<s3_root>/runs/<run>/report/`, beside the run's
Data Docs (`../validation/`), so the same relative links work on disk and in S3.

Imported by the DAG at parse time: matplotlib, numpy and airflow are imported inside the functions.
"""

from __future__ import annotations

import html
import io
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

from tasks.config import PipelineConfig, load_config
from tasks.hooks import s3_hook
from tasks.names import DAG_ID

log = logging.getLogger(__name__)

MISCLASSIFIED_SHOWN = 40
# Where the project's Airflow plugin serves each run's report (ui/report_view.py): <prefix>/<dag_id>/<run_id>/report/.
REPORT_VIEW_PREFIX = "/mnist-reports"
# The files of a run's report, by what each holds: write_report writes these, and the report view (ui/report_view.py)
# serves these and nothing else of a run's report/, whatever else may have been put there.
REPORT_FILES = {
    "markdown": "report.md",
    "html": "report.html",
    "summary": "summary.json",
    "curves": "curves.png",
    "confusion_matrix": "confusion_matrix.png",
    "misclassified": "misclassified.png",
}
CONTENT_TYPES = {
    ".md": "text/markdown; charset=utf-8",
    ".html": "text/html; charset=utf-8",
    ".png": "image/png",
    ".json": "application/json",
    ".css": "text/css",
    ".js": "text/javascript",
}


def run_name(run_id: str) -> str:
    """The run's directory name: the one its validation task writes the Data Docs under."""
    from tasks.training_jobs import sagemaker_name

    return sagemaker_name(run_id, unique_by=run_id)


def run_directory(config: PipelineConfig, run_id: str) -> Path:
    """Where the run keeps its artifacts on this machine: `report/` and the Data Docs in `validation/`."""
    return Path(config.state_dir) / "runs" / run_name(run_id)


def run_s3_uri(config: PipelineConfig, run_id: str) -> str:
    """Where the run's artifacts are in S3: the same `report/` and `validation/`."""
    return f"{config.s3_root}/runs/{run_name(run_id)}"


# --- inputs ------------------------------------------------------------------------------------------------------


def job_outputs(model_data_url: str, config: PipelineConfig) -> dict:
    """metrics.json (a dict) and misclassified.npz (arrays) from the job's output.tar.gz; None for what is missing."""
    import numpy as np
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    from tasks.archives import members, read_archive

    bucket, key = S3Hook.parse_s3_url(f"{model_data_url.rsplit('/', 1)[0]}/output.tar.gz")
    found = {"metrics": None, "misclassified": None}
    body = read_archive(config, bucket, key)
    if body is None:
        return found
    files = members(body, f"s3://{bucket}/{key}", wanted={"metrics.json", "misclassified.npz"})
    if "metrics.json" in files:
        found["metrics"] = json.loads(files["metrics.json"])
    if "misclassified.npz" in files:
        # allow_pickle off: arrays only, whatever the file claims to hold.
        with np.load(io.BytesIO(files["misclassified.npz"]), allow_pickle=False) as arrays:
            found["misclassified"] = {name: arrays[name] for name in arrays.files}
    return found


# --- figures -----------------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, no GUI toolkit
    import matplotlib.pyplot as plt

    return plt


def trial_label(trial: Mapping) -> str:
    """How the report and its curves name a trial: a sweep's by its hidden_channels, a tuner's by its number (the
    NNN of SageMaker's `<tuning job>-NNN-xxxxxxxx`)."""
    if "tuned" in trial:
        return trial["training_job_name"].rsplit("-", 2)[-2]
    return str(trial["hidden_channels"])


def plot_curves(histories: Mapping[str, list[dict]], path: Path, title: str = "hidden_channels") -> bool:
    """Train and test loss, and test accuracy, per epoch for every trial (by its label, ``title`` in the legend);
    False when no trial has a history."""
    if not any(histories.values()):
        return False
    plt = _pyplot()
    figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for label, history in histories.items():
        epochs = [epoch["epoch"] for epoch in history]
        (line,) = loss_axes.plot(epochs, [e["train_loss"] for e in history], marker="o", label=label)
        loss_axes.plot(epochs, [e["test_loss"] for e in history], marker="x", linestyle="--", color=line.get_color())
        accuracy_axes.plot(epochs, [100 * e["test_accuracy"] for e in history], marker="o", label=label)
    loss_axes.set(title="Loss (solid: train, dashed: test)", xlabel="epoch", ylabel="loss")
    accuracy_axes.set(title="Test accuracy", xlabel="epoch", ylabel="%")
    for axes in (loss_axes, accuracy_axes):
        axes.grid(alpha=0.3)
        axes.xaxis.get_major_locator().set_params(integer=True)
    accuracy_axes.legend(title=title, fontsize="small")
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


def plot_confusion_matrix(matrix: list[list[int]], path: Path) -> None:
    import numpy as np

    plt = _pyplot()
    counts = np.asarray(matrix)
    figure, axes = plt.subplots(figsize=(6, 5.4), constrained_layout=True)
    image = axes.imshow(counts, cmap="Blues")
    threshold = counts.max() / 2
    for (true, predicted), count in np.ndenumerate(counts):
        axes.text(
            predicted,
            true,
            str(count),
            ha="center",
            va="center",
            fontsize=8,
            color="white" if count > threshold else "black",
        )
    axes.set(xticks=range(10), yticks=range(10), xlabel="predicted digit", ylabel="true digit")
    figure.colorbar(image, ax=axes, shrink=0.8)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_misclassified(misclassified: Mapping, path: Path, limit: int = MISCLASSIFIED_SHOWN) -> int:
    """A grid of up to ``limit`` misclassified digits titled "true→predicted"; returns how many it shows."""
    images = misclassified["images"][:limit]
    if len(images) == 0:
        return 0
    plt = _pyplot()
    columns = min(10, len(images))
    rows = -(-len(images) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(1.2 * columns, 1.35 * rows), squeeze=False)
    for index, ax in enumerate(axes.flat):
        ax.axis("off")
        if index < len(images):
            ax.imshow(images[index], cmap="gray_r")
            label, prediction = misclassified["labels"][index], misclassified["predictions"][index]
            ax.set_title(f"{label}→{prediction}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return len(images)


# --- text --------------------------------------------------------------------------------------------------------


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


def render_markdown(context: Mapping) -> str:
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
        lines += ["", "## Learning curves", "", f"![loss and accuracy per epoch]({REPORT_FILES['curves']})"]
    if context["best_metrics"]:
        per_class = context["best_metrics"].get("per_class_accuracy") or []
        lines += ["", f"## The best model (hidden_channels {best['hidden_channels']})", ""]
        if per_class:
            lines += _table([str(digit) for digit in range(10)], [[_percent(a) for a in per_class]])
            lines.append("")
        lines.append(f"![confusion matrix]({REPORT_FILES['confusion_matrix']})")
        if context["misclassified_shown"]:
            total = context["misclassified_total"]
            lines += [
                "",
                f"{context['misclassified_shown']} of its {total} misclassified test digits (true→predicted):",
                "",
                f"![misclassified digits]({REPORT_FILES['misclassified']})",
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


# --- the report --------------------------------------------------------------------------------------------------


def write_report(directory: Path, context: Mapping, best_outputs: Mapping, histories: Mapping) -> None:
    """Render every file of the report into ``directory`` (which must exist and be empty)."""
    context = dict(context)
    tuning = bool(context["best"] and context["best"].get("tuning_job_name"))
    context["curves"] = plot_curves(
        histories, directory / REPORT_FILES["curves"], "trial" if tuning else "hidden_channels"
    )
    metrics = best_outputs["metrics"]
    context["best_metrics"] = metrics
    if metrics and metrics.get("confusion_matrix"):
        plot_confusion_matrix(metrics["confusion_matrix"], directory / REPORT_FILES["confusion_matrix"])
    misclassified = best_outputs["misclassified"]
    context["misclassified_total"] = len(misclassified["labels"]) if misclassified else 0
    context["misclassified_shown"] = (
        plot_misclassified(misclassified, directory / REPORT_FILES["misclassified"]) if misclassified else 0
    )
    markdown_text = render_markdown(context)
    (directory / REPORT_FILES["markdown"]).write_text(markdown_text)
    (directory / REPORT_FILES["html"]).write_text(render_html(markdown_text, f"Report {context['run_id']}"))
    (directory / REPORT_FILES["summary"]).write_text(
        json.dumps(
            {key: context.get(key) for key in ("dag_id", "run_id", "best", "choice", "approval")}, indent=2, default=str
        )
    )


def _replace_directory(source: Path, target: Path) -> None:
    """Put ``source`` at ``target`` whole: a reader sees the old report or the new one, never half of one."""
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(source, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(source, target)


def upload_directory(directory: Path, s3_uri: str, config: PipelineConfig, last: str | None = None) -> list[str]:
    """Upload every file under ``directory`` to ``s3_uri`` with its content type; ``last`` goes up last."""
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    s3 = s3_hook(config)
    bucket, prefix = S3Hook.parse_s3_url(s3_uri)
    files = sorted((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.name == last)
    uploaded = []
    for path in files:
        key = f"{prefix.rstrip('/')}/{path.relative_to(directory).as_posix()}"
        content_type = CONTENT_TYPES.get(path.suffix, "application/octet-stream")
        s3.conn.put_object(Bucket=bucket, Key=key, Body=path.read_bytes(), ContentType=content_type)
        uploaded.append(f"s3://{bucket}/{key}")
    return uploaded


def build_report(
    run_id: str,
    best: Mapping | None,
    *,
    validation: Mapping | None = None,
    gate: Mapping | None = None,
    choice: Mapping | None = None,
    deployment: Mapping | None = None,
    monitoring: Mapping | None = None,
    approval: Mapping | None = None,
    config: PipelineConfig | None = None,
    dag_id: str = DAG_ID,
) -> dict:
    """Write the run's report locally and to S3; return where: ``{"markdown", "html", "directory", "s3_uri",
    "html_s3_uri"}``.

    ``best`` is the selection's answer (tasks.selection.most_accurate: the best job and ``trials``; None in a
    deploy-only run); ``validation`` the data check's summary; ``gate``, ``choice`` (what to deploy:
    tasks.registry.choose_model), ``deployment`` and ``monitoring`` what those steps returned, or None when they
    did not run; ``approval`` a person's review with approval manual (tasks.review.outcome: written while it waits,
    then again with the answer). Idempotent: a retry replaces the run's report.
    """
    config = config or load_config()
    run_dir = run_directory(config, run_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    trials = [trial for trial in (best or {}).get("trials", []) if trial.get("model_data_url")]
    outputs = {trial["training_job_name"]: job_outputs(trial["model_data_url"], config) for trial in trials}
    histories = {
        trial_label(trial): (outputs[trial["training_job_name"]]["metrics"] or {}).get("history") or []
        for trial in trials
    }
    validation_dir = run_dir / "validation"
    data_docs = validation_dir / "index.html"
    context = {
        "dag_id": dag_id,
        "run_id": run_id,
        "best": best,
        "validation": validation,
        "gate": gate,
        "choice": choice,
        "deployment": deployment,
        "monitoring": monitoring,
        "approval": approval,
        "data_docs_link": "../validation/index.html" if data_docs.is_file() else None,
    }
    with tempfile.TemporaryDirectory(dir=run_dir, prefix=".report-") as scratch:
        draft = Path(scratch) / "report"
        draft.mkdir()
        best_outputs = outputs[best["training_job_name"]] if best else {"metrics": None, "misclassified": None}
        write_report(draft, context, best_outputs, histories)
        _replace_directory(draft, run_dir / "report")

    s3_root = run_s3_uri(config, run_id)
    if data_docs.is_file():
        upload_directory(validation_dir, f"{s3_root}/validation", config)
    upload_directory(run_dir / "report", f"{s3_root}/report", config, last=REPORT_FILES["html"])
    locations = {
        "directory": str(run_dir / "report"),
        "markdown": str(run_dir / "report" / REPORT_FILES["markdown"]),
        "html": str(run_dir / "report" / REPORT_FILES["html"]),
        "s3_uri": f"{s3_root}/report/",
        "html_s3_uri": f"{s3_root}/report/{REPORT_FILES['html']}",
    }
    log.info("Report: %s (local) and %s", locations["html"], locations["html_s3_uri"])
    return locations
