"""The report of one DAG run, in Markdown and HTML: what was trained, what won, and whether it now serves. This
module gathers what the report tells and writes and uploads its files; tasks/report_text.py writes its text and
tasks/report_figures.py draws its figures.

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
from tasks.report_figures import plot_confusion_matrix, plot_curves, plot_misclassified
from tasks.report_text import render_html, render_markdown, trial_label

log = logging.getLogger(__name__)

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
    markdown_text = render_markdown(context, REPORT_FILES)
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
