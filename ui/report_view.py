"""The "Sweep report" view on each run's page: the report and the Data Docs the run stored, served behind Airflow's
own authentication and permissions (the logged-in UI's session cookie, or a bearer token; the user must be allowed
to read the DAG's runs).

Files come from the run's directory on this machine when it is there, else from S3 through the pipeline's AWS
connection, exactly where tasks/report.py put them: `<state_dir or s3_root>/runs/<run>/{report,validation}/...`.
"""

from __future__ import annotations

import mimetypes
from pathlib import PurePosixPath

from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
from airflow.api_fastapi.core_api.security import requires_access_dag
from fastapi import Depends, FastAPI, HTTPException
from fastapi.responses import Response

from tasks.report import CONTENT_TYPES

URL_PREFIX = "/mnist-reports"
PARTS = ("report", "validation")  # what a run stores: its report, and the Data Docs of its data checks

app = FastAPI(title="MNIST sweep reports", docs_url=None, redoc_url=None, openapi_url=None)


def _relative(path: str) -> PurePosixPath:
    relative = PurePosixPath(path)
    if not path or relative.is_absolute() or ".." in relative.parts or "\\" in path:
        raise HTTPException(404, f"no such file in a run's report: {path!r}")
    return relative


def _read(run_id: str, part: str, relative: PurePosixPath) -> bytes:
    from botocore.exceptions import ClientError

    from tasks.config import load_config
    from tasks.report import run_directory, run_s3_uri
    from tasks.s3 import read_object

    config = load_config()
    local = run_directory(config, run_id) / part / relative
    if local.is_file():
        return local.read_bytes()
    try:
        return read_object(config, f"{run_s3_uri(config, run_id)}/{part}/{relative}")
    except ClientError as error:
        if error.response["Error"]["Code"] in ("NoSuchKey", "404"):
            raise HTTPException(
                404, f"run {run_id} has no {part}/{relative} (yet: the report task writes it)"
            ) from None
        raise


@app.get(
    "/{dag_id}/{run_id}/{part}/{path:path}",
    dependencies=[Depends(requires_access_dag(method="GET", access_entity=DagAccessEntity.RUN))],
)
def run_file(dag_id: str, run_id: str, part: str, path: str) -> Response:
    if part not in PARTS:
        raise HTTPException(404, f"a run stores {' and '.join(PARTS)}, not {part!r}")
    relative = _relative(path)
    body = _read(run_id, part, relative)
    kind = CONTENT_TYPES.get(relative.suffix) or mimetypes.guess_type(relative.name)[0] or "application/octet-stream"
    # The report is the run's own output, shown framed in Airflow's UI: no script of another origin may run in it.
    headers = {"Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:",
               "X-Content-Type-Options": "nosniff"}  # fmt: skip
    return Response(body, media_type=kind, headers=headers)
