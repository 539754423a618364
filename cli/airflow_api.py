"""How the command line talks to Airflow: a client of its public REST API, and what a run's task instances say
through it (their logs, their return values)."""

from __future__ import annotations

import json
from pathlib import Path

from cli import StackError


class AirflowAPI:
    """A small client of Airflow's public REST API, authenticated with a JWT from the SimpleAuthManager."""

    def __init__(self, url: str, username: str, password: str, log: Path | None = None):
        import httpx

        self.url = url
        self.log = log  # the API server's: a 5xx names an error id to look up there
        token = httpx.post(f"{url}/auth/token", json={"username": username, "password": password}, timeout=30)
        if token.status_code >= 400:
            raise StackError(f"Airflow at {url} refused the login of {username!r}: {token.text}")
        self.client = httpx.Client(
            base_url=f"{url}/api/v2", headers={"Authorization": f"Bearer {token.json()['access_token']}"}, timeout=30
        )

    def request(self, method: str, path: str, **kwargs) -> dict:
        response = self.client.request(method, path, **kwargs)
        if response.status_code >= 400:
            where = f"\n(the API server's log: {self.log})" if self.log and response.status_code >= 500 else ""
            raise StackError(f"Airflow API {method} {path} answered {response.status_code}: {response.text}{where}")
        return response.json() if response.content else {}

    def get(self, path: str, **params) -> dict:
        return self.request("GET", path, params=params)


def quote(segment: str) -> str:
    """``segment`` (a run id) as one segment of a URL path: escaped, slashes included."""
    from urllib.parse import quote as url_quote

    return url_quote(segment, safe="")


def run_path(dag_id: str, run_id: str) -> str:
    """The API's path of a DAG run."""
    return f"/dags/{dag_id}/dagRuns/{quote(run_id)}"


def task_instances(api: AirflowAPI, dag_id: str, run_id: str) -> list[dict]:
    """The run's task instances, mapped ones one by one."""
    return api.get(f"{run_path(dag_id, run_id)}/taskInstances", limit=1000)["task_instances"]


def task_log(api: AirflowAPI, dag_id: str, run_id: str, ti: dict) -> list[str]:
    """The lines of a task instance's latest try (the API's structured log, one event per line)."""
    path = f"{run_path(dag_id, run_id)}/taskInstances/{ti['task_id']}/logs/{max(ti['try_number'], 1)}"
    response = api.client.get(path, params={"map_index": ti["map_index"]}, headers={"Accept": "application/json"})
    if response.status_code >= 400:
        return []
    content = response.json().get("content") or []
    return [entry.get("event", "") if isinstance(entry, dict) else str(entry) for entry in content]


def xcom(api: AirflowAPI, dag_id: str, run_id: str, task_id: str, map_index: int = -1):
    """A task's return value, or None when it has none (skipped, failed, or not run)."""
    path = f"{run_path(dag_id, run_id)}/taskInstances/{task_id}/xcomEntries/return_value"
    response = api.client.get(path, params={"map_index": map_index})
    if response.status_code == 404:
        return None
    if response.status_code >= 400:
        raise StackError(f"Airflow API GET {path} answered {response.status_code}: {response.text}")
    value = response.json()["value"]
    return json.loads(value) if isinstance(value, str) and value[:1] in "[{" else value
