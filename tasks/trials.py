"""The trial table: one row per training job of a sweep, as the sweep write-ups' SageMaker Experiments table showed it
(test accuracy min / max / avg / last over the epochs), from the job's metrics.json.

Light on purpose (rich only, imported when a table is drawn): the DAG's selection task uses it to log the sweep.
"""

from __future__ import annotations

import io
import statistics
from collections.abc import Iterable, Mapping


def summarize_trial(metrics: Mapping, name: str | None = None) -> dict:
    """One row from a training job's metrics.json; accuracies stay fractions, as in metrics.json."""
    history = metrics.get("history") or []
    accuracies = [epoch["test_accuracy"] for epoch in history] or [metrics["test_accuracy"]]
    return {
        "trial": name,
        "architecture": metrics.get("architecture"),
        "hidden_channels": metrics.get("hidden_channels"),
        "epochs": len(history) or None,
        "accuracy_min": min(accuracies),
        "accuracy_max": max(accuracies),
        "accuracy_avg": statistics.fmean(accuracies),
        "test_accuracy": metrics.get("test_accuracy", accuracies[-1]),
        "test_loss": metrics.get("test_loss"),
        "test_confidence": metrics.get("test_confidence"),
        "train_loss": metrics.get("train_loss"),
        "seconds": metrics.get("wall_seconds"),
        "parameters": metrics.get("parameters"),
        "per_class_accuracy": [round(a, 4) for a in metrics["per_class_accuracy"]]
        if metrics.get("per_class_accuracy")
        else None,
    }


def _tuned(values: Mapping) -> str:
    return ", ".join(f"{key}={value}" for key, value in sorted(values.items()))


# (heading, key, format: a template or a function) of each column; a row may lack any key (shown as "-"), and a
# column no row has is left out (a sweep's rows have no tuner's columns).
_COLUMNS = (
    ("trial", "trial", "{}"),
    ("tuned", "tuned", _tuned),
    ("status", "status", "{}"),
    ("stopped early", "stopped_early", "{}"),
    ("model", "architecture", "{}"),
    ("hidden_channels", "hidden_channels", "{}"),
    ("epochs", "epochs", "{}"),
    ("test acc min", "accuracy_min", "{:.2%}"),
    ("test acc max", "accuracy_max", "{:.2%}"),
    ("test acc avg", "accuracy_avg", "{:.2%}"),
    ("test acc last", "test_accuracy", "{:.2%}"),
    ("test loss", "test_loss", "{:.4f}"),
    ("train loss", "train_loss", "{:.4f}"),
    ("seconds", "seconds", "{:.1f}"),
    ("parameters", "parameters", "{:,}"),
)


def _cell(row: Mapping, key: str, template) -> str:
    value = row.get(key)
    if value is None and key == "trial":  # the DAG's rows are named by their training job
        value = row.get("training_job_name")
    if value is None or value == {}:
        return "-"
    return template(value) if callable(template) else template.format(value)


def format_trial_table(trials: Iterable[Mapping], title: str | None = None) -> str:
    """The rows as a text table (box-drawn by rich, no colour codes), ready for a log or a terminal."""
    from rich.console import Console
    from rich.table import Table

    rows = list(trials)
    columns = [column for column in _COLUMNS if any(_cell(row, *column[1:]) != "-" for row in rows)]
    table = Table(title=title)
    for heading, key, _ in columns:
        table.add_column(heading, justify="left" if key in ("trial", "architecture") else "right")
    for row in rows:
        table.add_row(*(_cell(row, key, template) for _, key, template in columns))
    buffer = io.StringIO()
    Console(file=buffer, width=200, color_system=None).print(table)
    return "\n".join(line.rstrip() for line in buffer.getvalue().splitlines())
