"""What the DAGs share as they parse and run: the configuration, resolved once per run, and their schedules.
Light: the DAGs import it at parse time."""

from __future__ import annotations

import dataclasses

from airflow.sdk import task


@task(multiple_outputs=True)
def configuration() -> dict:
    """Resolve the deployment configuration once: every task of the run then uses the same connection and bucket."""
    from tasks.config import load_config

    return dataclasses.asdict(load_config())


def config_of(settings: dict):
    """The configuration ``configuration`` resolved for this run, back as a PipelineConfig."""
    from tasks.config import PipelineConfig

    return PipelineConfig(**settings)


def sweep_schedule():
    """The configuration's schedule of the sweep; with retrain_on_drift, a drift that mnist_drift finds also starts
    a run."""
    from tasks.assets import DRIFT
    from tasks.config import load_config

    config = load_config()
    cron = None if config.schedule.strip().lower() in ("", "none") else config.schedule.strip()
    if not config.retrains_on_drift:
        return cron
    if cron is None:
        return DRIFT
    from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable

    return AssetOrTimeSchedule(timetable=CronTriggerTimetable(cron, timezone="UTC"), assets=DRIFT)


def drift_schedule() -> str | None:
    """The configuration's schedule of the drift check (hourly unless it says otherwise; none: by hand only)."""
    from tasks.config import load_config

    schedule = load_config().drift_schedule.strip()
    return None if schedule.lower() in ("", "none") else schedule
