"""The "Run report" view on each run's page: the report (and Data Docs) a run of the sweep or drift DAG stored, served
behind Airflow's own authentication and permissions (the logged-in UI's session cookie, or a bearer token; the user
must be allowed to read the DAG's runs).

Files come from the run's directory on this machine when it is there, else from S3 through the pipeline's AWS
connection, exactly where tasks/report.py put them: `<state_dir or s3_root>/runs/<run>/{report,validation}/...`
(a drift check's, tasks/drift.py: `<state_dir or s3_root>/drift-runs/<run>/report/...`).

What is served, and how, assumes that whoever can write to the bucket may have put anything under a run's prefix:
- only the sweep and drift DAGs' reports, and only for a run that Airflow's database knows as a run of it (a report
  is found by run id alone, and run ids are unique per DAG only);
- of a run's report/, only the files the report writes (tasks.report.REPORT_FILES, tasks.drift.DRIFT_REPORT_FILES,
  by name): a page planted beside them is not served; of its validation/ (the great-expectations Data Docs, a site
  of many generated pages), only the types the report writes (tasks.report.CONTENT_TYPES) and never a script; each
  as its own type, never guessed from the body;
- under a Content-Security-Policy that sandboxes the page and lets nothing run: this is Airflow's origin. The
  report itself needs only its own images and styles. The great-expectations Data Docs load their scripts, fonts
  and stylesheets from CDNs: none of that loads here, and they show as plain HTML (their tables and verdicts, their
  own stylesheet and PNGs), not as the interactive site.
"""

from __future__ import annotations

from pathlib import PurePosixPath

from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
from airflow.api_fastapi.common.db.common import SessionDep
from airflow.api_fastapi.core_api.security import requires_access_dag
from airflow.models.dagrun import DagRun
from fastapi import Depends, FastAPI, HTTPException
from fastapi.responses import Response
from sqlalchemy import select

from tasks import drift, report
from tasks.names import DAG_ID, DRIFT_DAG_ID
from tasks.report import CONTENT_TYPES, REPORT_VIEW_PREFIX

URL_PREFIX = REPORT_VIEW_PREFIX
# Per DAG: what a run stores (a sweep its report and the Data Docs of its data checks; a drift check its report),
# the files of its report, and where its folder is on this machine and in S3.
LAYOUTS = {
    DAG_ID: (("report", "validation"), report.REPORT_FILES, report.run_directory, report.run_s3_uri),
    DRIFT_DAG_ID: (("report",), drift.DRIFT_REPORT_FILES, drift.run_directory, drift.run_s3_uri),
}
# What a run's files are served as: the types the report writes, less any a browser would run as a script.
SERVED_TYPES = {suffix: kind for suffix, kind in CONTENT_TYPES.items() if "javascript" not in kind}
# `sandbox` without allow-scripts: no script runs, whatever the page says, and no form, popup or top navigation
# either. allow-same-origin keeps the page's own origin, without which Chromium sends no SameSite=Lax cookie with
# the page's image and stylesheet requests (Airflow's session cookie is Lax), and the report's figures would be
# refused; with scripts off, that origin can do nothing else. Then every fetch is refused but the run's own images
# and stylesheets (the report's <style> is inline), and only Airflow's own pages may frame it.
CONTENT_SECURITY_POLICY = (
    "sandbox allow-same-origin; default-src 'none'; img-src 'self'; style-src 'self' 'unsafe-inline'; "
    "form-action 'none'; base-uri 'none'; frame-ancestors 'self'"
)
HEADERS = {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "X-Content-Type-Options": "nosniff"}

app = FastAPI(title="MNIST sweep reports", docs_url=None, redoc_url=None, openapi_url=None)


def _relative(path: str) -> PurePosixPath:
    """``path`` as a relative path inside a part of a run, or 404: nothing that climbs out, no backslash (a
    separator to some), no control character."""
    relative = PurePosixPath(path)
    climbs = relative.is_absolute() or ".." in relative.parts or not relative.parts
    if climbs or "\\" in path or any(ord(character) < 32 or ord(character) == 127 for character in path):
        raise HTTPException(404, f"no such file in a run's report: {path!r}")
    return relative


def _served_type(dag_id: str, part: str, relative: PurePosixPath) -> str:
    """The content type ``relative`` is served as, or 404: under report/ a file the report writes, under
    validation/ a file of a type it writes."""
    files = LAYOUTS[dag_id][1]
    if part == "report" and str(relative) not in files.values():
        names = ", ".join(files.values())
        raise HTTPException(404, f"{str(relative)!r} is not served: a run's report is {names}, nothing else")
    kind = SERVED_TYPES.get(relative.suffix)
    if kind is None:
        served = ", ".join(sorted(SERVED_TYPES))
        raise HTTPException(404, f"{relative.name!r} is not served: a run's {part}/ is served as {served} files only")
    return kind


def _check_run(session, dag_id: str, run_id: str) -> None:
    if session.scalar(select(DagRun.id).where(DagRun.dag_id == dag_id, DagRun.run_id == run_id)) is None:
        raise HTTPException(404, f"{dag_id} has no run {run_id!r}")


def _read(dag_id: str, run_id: str, part: str, relative: PurePosixPath) -> bytes:
    from botocore.exceptions import ClientError

    from tasks.config import load_config
    from tasks.s3 import read_object

    _, _, run_directory, run_s3_uri = LAYOUTS[dag_id]
    config = load_config()
    directory = (run_directory(config, run_id) / part).resolve()
    local = directory / relative
    if local.is_file():
        # A link under the run's directory is followed only to a file inside it.
        if not local.resolve().is_relative_to(directory):
            raise HTTPException(404, f"run {run_id} has no {part}/{relative}")
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
def run_file(dag_id: str, run_id: str, part: str, path: str, session: SessionDep) -> Response:
    if dag_id not in LAYOUTS:
        raise HTTPException(404, f"reports are kept for the runs of {' and '.join(LAYOUTS)}, not of {dag_id!r}")
    parts = LAYOUTS[dag_id][0]
    if part not in parts:
        raise HTTPException(404, f"a run of {dag_id} stores {' and '.join(parts)}, not {part!r}")
    relative = _relative(path)
    kind = _served_type(dag_id, part, relative)
    _check_run(session, dag_id, run_id)
    return Response(_read(dag_id, run_id, part, relative), media_type=kind, headers=HEADERS)
