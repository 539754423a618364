"""`mnist-pipeline drift`: trigger the drift check of an endpoint on the local stack, wait for it, and say what it
found and where its report is."""

from __future__ import annotations

from cli import StackError, new_console
from cli.airflow_api import quote, run_path
from cli.runs import polls, trigger
from tasks.config import load_config
from tasks.names import DRIFT_DAG_ID

POLL_SECONDS = 2.0
TIMEOUT_SECONDS = 1800.0


def run_check(conf: dict, console, timeout: float = TIMEOUT_SECONDS) -> dict:
    """Trigger mnist_drift with ``conf`` and wait for its end: ``{"run_id", "state", "result"}`` (``result``: the
    check's return value, None when it did not return)."""
    api, state, run_id = trigger(DRIFT_DAG_ID, conf, console)
    *_, run = polls(api, DRIFT_DAG_ID, run_id, POLL_SECONDS, timeout)
    answer = api.client.get(f"{run_path(DRIFT_DAG_ID, run_id)}/taskInstances/check_capture/xcomEntries/return_value")
    result = answer.json()["value"] if answer.status_code == 200 else None
    return {"run_id": run_id, "state": run["state"], "result": result, "url": state["airflow_url"]}


def drift_command(args) -> int:
    from tasks.drift import DRIFT_REPORT_FILES, run_directory
    from tasks.report import REPORT_VIEW_PREFIX

    console = new_console()
    conf = {"endpoint_name": args.endpoint}
    if args.min_requests is not None:
        conf["min_requests"] = args.min_requests
    try:
        outcome = run_check(conf, console)
    except StackError as error:
        console.print(f"[red]error:[/] {error}")
        return 2
    result = outcome["result"]
    if outcome["state"] != "success" or not isinstance(result, dict):
        console.print(
            f"[red]{DRIFT_DAG_ID} run {outcome['run_id']} {outcome['state']}[/]: see its tasks' logs in the Airflow UI"
        )
        return 1
    color = {"drift": "red", "no drift": "green"}.get(result["verdict"], "yellow")
    console.print(f"[{color}]{result['verdict']}[/]: {result['summary']}")
    html = DRIFT_REPORT_FILES["html"]
    local = run_directory(load_config(), outcome["run_id"]) / "report" / html
    ui = f"{outcome['url']}{REPORT_VIEW_PREFIX}/{DRIFT_DAG_ID}/{quote(outcome['run_id'])}/report/{html}"
    console.print(f"Report: {result['report']} (on this machine: {local}; in the UI: {ui})")
    return 0
