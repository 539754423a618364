"""Tasks both DAGs run: the configuration, resolved once per run. Light: the DAGs import it at parse time."""

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
