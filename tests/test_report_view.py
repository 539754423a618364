"""The "Run report" view (ui/report_view.py), mounted from its plugin by Airflow's own code (the API server's
init_plugins; the rest of the API, seconds to build, is left out), authenticated with Airflow's own tokens, reading
runs from the metadata database and files from the run's directory and the local S3.

Hostile cases: another DAG's id in the path, a run of another DAG, files planted under a run's report/ (in S3 or
on disk: a script, an SVG, an HTML page beside the report's) and its validation/, and paths that climb out of a
run. The browser test (tests/test_browser.py) opens the
view from a real run's page."""

from __future__ import annotations

import datetime
from urllib.parse import unquote

import boto3
import pytest

from tasks.names import BATCH_DAG_ID, DAG_ID, DRIFT_DAG_ID

BUCKET = "report-view"
SWEEP_RUN = "manual__report-view"
BATCH_RUN = "asset_triggered__report-view"  # a run of the batch DAG only
DRIFT_RUN = "scheduled__report-view"  # a run of the drift check
PNG = b"\x89PNG\r\n\x1a\n"


def directives(policy: str) -> dict[str, list[str]]:
    parsed = {}
    for directive in filter(None, (part.strip() for part in policy.split(";"))):
        name, *values = directive.split()
        parsed[name] = values
    return parsed


@pytest.fixture(scope="module")
def view(local_aws, airflow_db, tmp_path_factory):
    """Airflow's API app with the plugin, a run of each DAG, the sweep run's report on disk, and files planted in S3
    under both runs' prefixes. Yields the client and the headers of each kind of user."""
    from airflow.api_fastapi.app import get_auth_manager, init_auth_manager, init_plugins
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    from sqlalchemy import select

    from tasks.config import load_config
    from tasks.report import run_directory, run_s3_uri

    state = tmp_path_factory.mktemp("report-view")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MNIST_PIPELINE_BUCKET", BUCKET)
        patch.setenv("MNIST_PIPELINE_STATE_DIR", str(state))
        config = load_config()
        s3 = boto3.client("s3", endpoint_url=local_aws)
        s3.create_bucket(Bucket=BUCKET)
        now = datetime.datetime.now(datetime.UTC)
        with create_session() as session:
            for dag_id, run_id in ((DAG_ID, SWEEP_RUN), (BATCH_DAG_ID, BATCH_RUN), (DRIFT_DAG_ID, DRIFT_RUN)):
                session.add(
                    DagRun(dag_id=dag_id, run_id=run_id, run_type=run_id.split("__")[0], run_after=now, state="success")
                )
        report = run_directory(config, SWEEP_RUN) / "report"
        report.mkdir(parents=True)
        (report / "report.html").write_text("<h1>Sweep report</h1><img src='curves.png'>")
        (report / "curves.png").write_bytes(PNG)
        (report / "planted.html").write_text("<h1>not the report's</h1>")
        (state / "secret.json").write_text("{}")
        (report / "summary.json").symlink_to(state / "secret.json")
        from tasks import drift

        checked = drift.run_directory(config, DRIFT_RUN) / "report"
        checked.mkdir(parents=True)
        (checked / "report.html").write_text("<h1>Drift check</h1><img src='atypical.png'>")
        (checked / "atypical.png").write_bytes(PNG)
        (checked / "curves.png").write_bytes(PNG)  # a sweep report's file: not one a drift check writes
        docs = run_directory(config, SWEEP_RUN) / "validation"
        (docs / "static").mkdir(parents=True)
        (docs / "index.html").write_text("<h1>Data Docs</h1>")
        (docs / "static" / "data_docs.css").write_text("h1 {}")
        planted = {
            "evil.js": b"alert(1)",
            "evil.svg": b"<svg onload='alert(1)'/>",
            "evil.html": b"<script>1</script>",
            "report.html": b"<h1>planted</h1>",
            "evil": b"no suffix",
        }
        for run_id in (SWEEP_RUN, BATCH_RUN):
            bucket, prefix = run_s3_uri(config, run_id).removeprefix("s3://").split("/", 1)
            for part, name in ((part, name) for part in ("report", "validation") for name in planted):
                s3.put_object(Bucket=bucket, Key=f"{prefix}/{part}/{name}", Body=planted[name])
        api = FastAPI()
        init_plugins(api)
        init_auth_manager(api)
        client = TestClient(api)
        token = get_auth_manager().generate_jwt(SimpleAuthManagerUser(username="admin", role="admin"))
        nobody = get_auth_manager().generate_jwt(SimpleAuthManagerUser(username="nobody", role=None))
        yield {
            "client": client,
            "admin": {"Authorization": f"Bearer {token}"},
            "nobody": {"Authorization": f"Bearer {nobody}"},
        }
        with create_session() as session:
            for run_id in (SWEEP_RUN, BATCH_RUN, DRIFT_RUN):
                session.delete(session.scalars(select(DagRun).where(DagRun.run_id == run_id)).one())


def get(view, path: str, who: str = "admin"):
    return view["client"].get(f"/mnist-reports/{path}", headers=view.get(who, {}))


def test_the_sweep_report_is_served_sandboxed_to_those_who_may_read_the_runs(view):
    from urllib.parse import quote

    run = quote(SWEEP_RUN, safe="")
    answer = get(view, f"{DAG_ID}/{run}/report/report.html")
    assert answer.status_code == 200, answer.text
    assert answer.text == "<h1>Sweep report</h1><img src='curves.png'>"  # the local copy wins over S3's
    assert answer.headers["content-type"] == "text/html; charset=utf-8"
    assert answer.headers["x-content-type-options"] == "nosniff"
    policy = directives(answer.headers["content-security-policy"])
    # Sandboxed without allow-scripts, and no source of scripts: nothing runs, whatever the page holds.
    assert "allow-scripts" not in policy["sandbox"] and policy["default-src"] == ["'none'"]
    assert not {"script-src", "script-src-elem", "script-src-attr", "connect-src", "object-src"} & set(policy)
    assert policy["img-src"] == ["'self'"] and policy["frame-ancestors"] == ["'self'"]
    image = get(view, f"{DAG_ID}/{run}/report/curves.png")
    assert (image.status_code, image.headers["content-type"], image.content) == (200, "image/png", PNG)
    assert "sandbox" in image.headers["content-security-policy"]

    assert get(view, f"{DAG_ID}/{run}/report/report.html", who="anonymous").status_code == 401
    assert get(view, f"{DAG_ID}/{run}/report/report.html", who="nobody").status_code == 403


def test_only_runs_of_the_sweep_dag_are_served(view):
    from urllib.parse import quote

    # Another DAG's id, with a report planted under its run's prefix: the view serves the sweep DAG's only.
    answer = get(view, f"{BATCH_DAG_ID}/{quote(BATCH_RUN, safe='')}/report/report.html")
    assert answer.status_code == 404 and f"reports are kept for the runs of {DAG_ID}" in answer.json()["detail"]
    # The sweep DAG's id with the batch DAG's run: a report is found by run id, so the run must be the sweep's.
    answer = get(view, f"{DAG_ID}/{quote(BATCH_RUN, safe='')}/report/report.html")
    assert answer.status_code == 404 and answer.json()["detail"] == f"{DAG_ID} has no run {BATCH_RUN!r}"
    assert get(view, f"{DAG_ID}/manual__never/report/report.html").status_code == 404


def test_of_a_runs_report_only_the_files_the_report_writes_are_served(view):
    """A page planted beside the report, in S3 or on disk, is not served, though the report writes HTML."""
    from urllib.parse import quote

    from tasks.report import REPORT_FILES

    run = quote(SWEEP_RUN, safe="")
    names = ", ".join(REPORT_FILES.values())
    for name in ("evil.js", "evil.svg", "evil", "evil.html", "planted.html", "static%2Freport.html"):
        answer = get(view, f"{DAG_ID}/{run}/report/{name}")
        assert answer.status_code == 404, name
        expected = f"{unquote(name)!r} is not served: a run's report is {names}, nothing else"
        assert answer.json()["detail"] == expected, answer.json()
    assert get(view, f"{DAG_ID}/{run}/report/report.html").text == "<h1>Sweep report</h1><img src='curves.png'>"
    assert get(view, f"{DAG_ID}/{run}/summary/report.html").json()["detail"] == (
        f"a run of {DAG_ID} stores report and validation, not 'summary'"
    )


def test_the_data_docs_are_served_as_the_types_the_report_writes_and_never_a_script(view):
    """validation/ is the great-expectations site (pages of any name): a type rule, not names. A planted page is
    served, under the same sandbox, its script inert."""
    from urllib.parse import quote

    run = quote(SWEEP_RUN, safe="")
    assert get(view, f"{DAG_ID}/{run}/validation/index.html").text == "<h1>Data Docs</h1>"
    styles = get(view, f"{DAG_ID}/{run}/validation/static/data_docs.css")
    assert (styles.status_code, styles.headers["content-type"]) == (200, "text/css; charset=utf-8")
    for name in ("evil.js", "evil.svg", "evil"):
        answer = get(view, f"{DAG_ID}/{run}/validation/{name}")
        assert answer.status_code == 404, name
        assert answer.json()["detail"].startswith(f"{name!r} is not served: a run's validation/ is served as"), name
        assert ".js" not in answer.json()["detail"].split("served as ")[1].split()
    answer = get(view, f"{DAG_ID}/{run}/validation/evil.html")
    assert answer.status_code == 200 and answer.content == b"<script>1</script>"
    assert directives(answer.headers["content-security-policy"])["default-src"] == ["'none'"]


@pytest.mark.parametrize(
    "path",
    [
        "..%2F..%2Fsecret.html",  # a separator encoded, as a browser sends it untouched
        "report%2F..%2F..%2F..%2Fsecret.html",
        "%2E%2E/%2E%2E/secret.html",  # dots encoded: decoded before routing
        "..%5C..%5Csecret.html",  # a backslash
        "%2Fetc%2Fpasswd.html",  # absolute
        "report.html%00.png",  # a NUL byte
        "summary.json",  # a link under the run's directory, named as a report file, to a file outside it
        ".",
    ],
)
def test_paths_that_leave_the_run_are_refused(view, path):
    from urllib.parse import quote

    answer = view["client"].get(
        f"/mnist-reports/{DAG_ID}/{quote(SWEEP_RUN, safe='')}/report/{path}", headers=view["admin"]
    )
    assert answer.status_code == 404, (path, answer.text)
    assert answer.json()["detail"].startswith(("no such file in a run's report", f"run {SWEEP_RUN} has no report/"))


def test_a_drift_checks_report_is_served_and_only_its_own_files(view):
    from urllib.parse import quote

    run = quote(DRIFT_RUN, safe="")
    answer = get(view, f"{DRIFT_DAG_ID}/{run}/report/report.html")
    assert answer.status_code == 200 and answer.text == "<h1>Drift check</h1><img src='atypical.png'>"
    assert "sandbox" in answer.headers["content-security-policy"]
    assert get(view, f"{DRIFT_DAG_ID}/{run}/report/atypical.png").content == PNG
    refused = get(view, f"{DRIFT_DAG_ID}/{run}/report/curves.png")
    assert refused.status_code == 404 and "a run's report is report.md, report.html" in refused.json()["detail"]
    assert get(view, f"{DRIFT_DAG_ID}/{run}/validation/index.html").json()["detail"] == (
        f"a run of {DRIFT_DAG_ID} stores report, not 'validation'"
    )
    # A report is found by run id: the sweep's run under the drift DAG's id is not one of its runs.
    assert get(view, f"{DRIFT_DAG_ID}/{quote(SWEEP_RUN, safe='')}/report/report.html").status_code == 404
    assert get(view, f"{DRIFT_DAG_ID}/{run}/report/report.html", "nobody").status_code == 403
