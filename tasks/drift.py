"""The drift check of an endpoint (dags/mnist_drift.py): read the capture written since the last check, hold its
inputs and answers to the training set's statistics (data_checks.drift), and say so where people look.

A check writes its report (Markdown, HTML, the atypical inputs as a picture, and summary.json with every figure)
on this machine and in S3 (``<s3_root>/drift-runs/<run>/report/``, shown on the run's page in the Airflow UI),
publishes its figures to CloudWatch (namespace DRIFT_NAMESPACE, dimension EndpointName), and only then moves the
capture position on (tasks.capture). A retry finds its own summary.json and moves the position it names, or finds
it moved already, so no capture is read twice or skipped, whichever step a failure interrupted.

On drift, ``alert`` tells the SNS topic and, at most once per ``retrain_interval_hours``, emits an event of the
mnist_drift asset carrying the figures, which schedules a retraining run of the sweep with ``retrain_on_drift``.
"""

from __future__ import annotations

import datetime
import json
import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path

from tasks.config import PipelineConfig
from tasks.names import DRIFT_DAG_ID

log = logging.getLogger(__name__)

DRIFT_NAMESPACE = "MnistPipeline/Drift"
RUNS_FOLDER = "drift-runs"
# The files of a drift check's report, which the report view serves and nothing else of its folder.
DRIFT_REPORT_FILES = {
    "markdown": "report.md",
    "html": "report.html",
    "summary": "summary.json",
    "atypical": "atypical.png",
}
ATYPICAL_SHOWN = 16


def run_directory(config: PipelineConfig, run_id: str) -> Path:
    from tasks.report import run_name

    return Path(config.state_dir) / RUNS_FOLDER / run_name(run_id)


def run_s3_uri(config: PipelineConfig, run_id: str) -> str:
    from tasks.report import run_name

    return f"{config.s3_root}/{RUNS_FOLDER}/{run_name(run_id)}"


def report_location(config: PipelineConfig, run_id: str) -> str:
    return f"{run_s3_uri(config, run_id)}/report/{DRIFT_REPORT_FILES['html']}"


def decoding_handler():
    """The handler every model artifact ships (inference/inference.py, with the network definitions it imports),
    loaded as the inference container loads it: its ``input_fn`` decodes captured requests as the endpoint did."""
    from inference.artifact import add_code, load_handler

    # The files are needed only while they are imported: each check would otherwise leave a directory behind.
    with tempfile.TemporaryDirectory(prefix="mnist-drift-handler-") as directory:
        add_code(directory)
        return load_handler(directory)


def check(config: PipelineConfig, endpoint: str, run_id: str, *, min_requests: int, max_requests: int) -> dict:
    """Check the capture ``endpoint`` wrote since the last check; returns the result (small: the figures, the
    verdict, where the report is)."""
    from tasks import capture

    done = _summary(config, run_id)
    if done is not None:  # a retry of a check that wrote its report: finish moving the position, change nothing
        _move_position(config, endpoint, done)
        return done["result"]
    position, etag = capture.read_position(config, endpoint)
    objects = capture.new_objects(config, endpoint, position)
    window = capture.read_window(config, objects, decoding_handler(), max_requests)
    model = _champion(config, endpoint)
    judged = _judge(window, model, min_requests, config)
    result = {
        "endpoint_name": endpoint,
        "verdict": judged["verdict"],
        "reasons": judged["reasons"],
        "figures": judged["figures"],
        "thresholds": judged["thresholds"],
        "requests": window.requests,
        "images": len(window.images),
        "objects": len(window.objects),
        "skipped": window.skipped,
        "first": window.first,
        "last": window.last,
        "more": len(window.objects) < len(objects),  # max_requests reached: the rest is the next check's
        "model": {key: (model or {}).get(key) for key in ("version", "model_package_arn", "test_confidence")},
        "report": report_location(config, run_id),
        "summary": summary_line(judged["verdict"], judged["reasons"], window.requests, endpoint),
    }
    _write_report(config, run_id, result, window, judged)
    if judged["verdict"] != "not enough data":
        _publish(config, endpoint, result)
    # Too few requests change nothing: the position stays, and they are read again with the next ones.
    judged_objects = window.objects if judged["verdict"] != "not enough data" else []
    moved = capture.advanced(position, judged_objects, capture.endpoint_prefix(config, endpoint))
    summary = {"dag_id": DRIFT_DAG_ID, "run_id": run_id, "result": result, "etag": etag, "position": moved}
    _upload(config, run_id, summary)
    _move_position(config, endpoint, summary)
    return result


def summary_line(verdict: str, reasons: list[str], requests: int, endpoint: str) -> str:
    if verdict == "not enough data":
        return f"Not enough data: {requests} requests to {endpoint} since the last check; nothing judged."
    if verdict == "drift":
        return f"Drift in {requests} requests to {endpoint}: {'; '.join(reasons)}."
    return f"No drift in {requests} requests to {endpoint}."


def _champion(config: PipelineConfig, endpoint: str) -> dict | None:
    from tasks.registry import champion

    try:
        return champion(config, endpoint)
    except Exception as error:  # no endpoint, no registry group: the inputs are still judged, the confidence not
        log.warning("The champion of %s cannot be read (%s): its confidence is not judged", endpoint, error)
        return None


def _judge(window, model: Mapping | None, min_requests: int, config: PipelineConfig) -> dict:
    """The window held to the statistics of the data the models are trained on: the configuration's
    mnist_reference (a dataset other than the official MNIST), else the official MNIST's."""
    from data_checks.class_stats import load_reference
    from data_checks.drift import drift_report

    return drift_report(
        window.images,
        window.probabilities,
        test_confidence=(model or {}).get("test_confidence"),
        reference=load_reference(config.mnist_reference) if config.mnist_reference else None,
        min_requests=min_requests,
    )


def _summary(config: PipelineConfig, run_id: str) -> dict | None:
    from botocore.exceptions import ClientError

    from tasks.s3 import read_object

    try:
        return json.loads(read_object(config, f"{run_s3_uri(config, run_id)}/report/{DRIFT_REPORT_FILES['summary']}"))
    except ClientError as error:
        if error.response["Error"]["Code"] in ("NoSuchKey", "404"):
            return None
        raise


def _move_position(config: PipelineConfig, endpoint: str, summary: Mapping) -> None:
    from tasks import capture

    current, etag = capture.read_position(config, endpoint)
    if current == summary["position"]:
        return  # moved already, by this check's first try
    if etag != summary["etag"]:
        raise capture.PositionMoved(
            f"the capture position of {endpoint} was moved by another check since this one "
            "read its window; run the check again"
        )
    capture.write_position(config, endpoint, summary["position"], etag)


def _publish(config: PipelineConfig, endpoint: str, result: Mapping) -> None:
    from tasks.hooks import hook

    moment = datetime.datetime.now(datetime.UTC)
    dimensions = [{"Name": "EndpointName", "Value": endpoint}]
    data = [
        {
            "MetricName": "Requests",
            "Dimensions": dimensions,
            "Timestamp": moment,
            "Value": result["requests"],
            "Unit": "Count",
        }
    ]
    data += [
        {"MetricName": _metric_name(name), "Dimensions": dimensions, "Timestamp": moment, "Value": float(value)}
        for name, value in result["figures"].items()
        if value is not None
    ]
    data.append(
        {
            "MetricName": "Drift",
            "Dimensions": dimensions,
            "Timestamp": moment,
            "Value": 1.0 if result["verdict"] == "drift" else 0.0,
        }
    )
    hook(config, "cloudwatch").conn.put_metric_data(Namespace=DRIFT_NAMESPACE, MetricData=data)


def _metric_name(figure: str) -> str:
    return "".join(part.capitalize() for part in figure.split("_"))


def _write_report(config: PipelineConfig, run_id: str, result: Mapping, window, judged: Mapping) -> None:
    from data_checks.drift import sample_grid_png
    from tasks.report import _replace_directory
    from tasks.report_text import render_html

    run_dir = run_directory(config, run_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=run_dir, prefix=".report-") as scratch:
        draft = Path(scratch) / "report"
        draft.mkdir()
        atypical = [item["index"] for item in judged.get("atypical", [])][:ATYPICAL_SHOWN]
        if atypical:
            sample_grid_png(window.images, atypical, draft / DRIFT_REPORT_FILES["atypical"])
        text = render_markdown(run_id, result, shown=len(atypical))
        (draft / DRIFT_REPORT_FILES["markdown"]).write_text(text)
        (draft / DRIFT_REPORT_FILES["html"]).write_text(render_html(text, f"Drift check {run_id}"))
        _replace_directory(draft, run_dir / "report")


def _upload(config: PipelineConfig, run_id: str, summary: Mapping) -> None:
    """The report to S3, summary.json last: once it is there, the check's result is final (see ``check``)."""
    from tasks.report import upload_directory

    directory = run_directory(config, run_id) / "report"
    (directory / DRIFT_REPORT_FILES["summary"]).write_text(json.dumps(summary, indent=2, default=str))
    upload_directory(directory, f"{run_s3_uri(config, run_id)}/report", config, last=DRIFT_REPORT_FILES["summary"])


def render_markdown(run_id: str, result: Mapping, shown: int) -> str:
    verdict = {"drift": "**Drift**", "no drift": "**No drift**", "not enough data": "**Not enough data**"}
    lines = [
        f"# Drift check of {result['endpoint_name']}",
        "",
        f"{DRIFT_DAG_ID} run `{run_id}`.",
        "",
        f"{verdict[result['verdict']]}: {result['summary']}",
        "",
    ]
    lines += [f"- {reason}" for reason in result["reasons"]]
    lines += [
        "",
        "## The window",
        "",
        f"- requests read: {result['requests']} ({result['images']} images), from {result['objects']} capture objects",
        f"- invoked from {result['first'] or '-'} to {result['last'] or '-'}",
    ]
    if result["skipped"]:
        lines.append("- left out: " + ", ".join(f"{count} {reason}" for reason, count in result["skipped"].items()))
    if result["more"]:
        lines.append("- more capture waits: this check read as many requests as max_requests allows")
    model = result["model"]
    lines.append(
        f"- model: version {model['version']} (test confidence {model['test_confidence']})"
        if model.get("version")
        else "- model: no champion found (its confidence is not judged)"
    )
    if result["figures"]:
        lines += ["", "## Figures", "", "| figure | value | threshold | past it |", "|---|---:|---:|:---:|"]
        for name, value in result["figures"].items():
            threshold = result["thresholds"].get(name)
            past = any(reason.startswith(name) for reason in result["reasons"])
            shown_value = "-" if value is None else f"{value:.4g}"
            lines.append(f"| {name} | {shown_value} | {threshold} | {'yes' if past else ''} |")
    if shown:
        lines += [
            "",
            "## The most atypical inputs",
            "",
            f"![the {shown} most atypical inputs]({DRIFT_REPORT_FILES['atypical']})",
        ]
    return "\n".join(lines) + "\n"


def retraining_due(config: PipelineConfig, last_event: datetime.datetime | None, now: datetime.datetime) -> bool:
    """Whether a drift may request retraining now: none was requested within retrain_interval_hours."""
    return last_event is None or now - last_event >= datetime.timedelta(hours=config.retrain_interval_hours)


def notify(config: PipelineConfig, result: Mapping, run_id: str) -> None:
    """Tell the configuration's SNS topic (none configured: nobody) of the drift ``result``, with its figures and
    where its report is."""
    if not config.alert_topic_arn:
        log.info("No alert_topic_arn configured: the drift is not notified")
        return
    from urllib.parse import quote

    from airflow.providers.amazon.aws.hooks.sns import SnsHook
    from airflow.sdk.configuration import conf

    base = conf.get("api", "base_url", fallback="").rstrip("/")
    figures = ", ".join(f"{name} {value:.4g}" for name, value in result["figures"].items() if value is not None)
    lines = [
        f"{result['summary']}",
        f"Figures: {figures}.",
        f"Window: {result['requests']} requests invoked from {result['first']} to {result['last']}.",
        f"Report: {result['report']}",
    ]
    if base:
        lines.append(f"Run: {base}/dags/{DRIFT_DAG_ID}/runs/{quote(run_id, safe='')}")
    SnsHook(aws_conn_id=config.aws_conn_id, region_name=config.region).publish_to_target(
        target_arn=config.alert_topic_arn,
        message="\n".join(lines),
        subject=f"MNIST: drift in the inputs of {result['endpoint_name']}"[:100],
        message_attributes={"event": "drift_detected"},
    )
    log.info("Sent the drift notification to %s", config.alert_topic_arn)
