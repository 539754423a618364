"""The Airflow plugin of the pipeline, registered through the `airflow.plugins` entry point (pyproject.toml): the
run note (a listener) and the "Run report" view on each run's page (the sweep's and the drift check's)."""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from ui import run_note
from ui.report_view import URL_PREFIX, app


class MnistPipelinePlugin(AirflowPlugin):
    name = "mnist_pipeline"
    listeners = [run_note]  # noqa: RUF012 - the shape AirflowPlugin reads
    fastapi_apps = [{"app": app, "url_prefix": URL_PREFIX, "name": "MNIST run reports"}]  # noqa: RUF012
    external_views = [  # noqa: RUF012
        {
            "name": "Run report",
            # Relative to the UI's base; the UI fills in the run's DAG and id.
            "href": f"{URL_PREFIX.lstrip('/')}/{{DAG_ID}}/{{RUN_ID}}/report/report.html",
            "destination": "dag_run",
            "url_route": "run-report",
        }
    ]
