"""The local stack for real: `mnist-pipeline up`, `status`, `down` (last: it stops the shared stack)."""

from __future__ import annotations

import psutil
import pytest

from tests.local_stack import shared_stack

pytestmark = pytest.mark.slow


@pytest.fixture
def stack(request, small_mnist):
    return shared_stack(request, small_mnist)


def stack_processes(stack) -> list[psutil.Process]:
    """Every process of the stack now: the ones `up` started and all their descendants."""
    found = []
    for record in stack.state["processes"].values():
        leader = psutil.Process(record["pid"])
        found += [leader, *leader.children(recursive=True)]
    return found


def test_up_prints_the_ui_and_a_working_login(stack):
    assert stack.url in stack.up_output
    assert f"admin / {stack.password}" in stack.up_output
    import httpx

    assert httpx.get(stack.url).status_code == 200  # the UI's page
    refused = httpx.post(f"{stack.url}/auth/token", json={"username": "admin", "password": "wrong"})
    assert refused.status_code == 401
    with stack.api() as api:
        health = api.get("/monitor/health").json()
        assert {part: health[part]["status"] for part in ("metadatabase", "scheduler", "triggerer", "dag_processor")} == {
            "metadatabase": "healthy", "scheduler": "healthy", "triggerer": "healthy", "dag_processor": "healthy"
        }  # fmt: skip
        assert api.get("/dags/mnist_sweep").json()["is_paused"] is False
        from tasks.local_backend import TRAINING_POOL

        pool = api.get(f"/pools/{TRAINING_POOL}").json()
        assert pool["slots"] == len(psutil.Process().cpu_affinity())


def test_everything_listens_on_loopback_only(stack):
    listening = [
        conn.laddr
        for process in stack_processes(stack)
        for conn in process.net_connections(kind="inet")
        if conn.status == psutil.CONN_LISTEN
    ]
    urls = {stack.url, stack.state["aws_endpoint"]}
    assert {f"http://{addr.ip}:{addr.port}" for addr in listening} >= urls
    assert {addr.ip for addr in listening} == {"127.0.0.1"}


def test_status_and_a_second_up(stack):
    before = {name: record["pid"] for name, record in stack.state["processes"].items()}
    assert set(before) == {"local-aws", "api-server", "scheduler", "dag-processor", "triggerer"}
    status = stack.cli("status")
    assert status.returncode == 0, status.stdout + status.stderr
    for name, pid in before.items():
        assert name in status.stdout and str(pid) in status.stdout
    again = stack.cli("up", "--port", "0")
    assert again.returncode == 0, again.stderr
    assert stack.url in again.stdout
    assert {name: record["pid"] for name, record in stack.state["processes"].items()} == before


def test_down_leaves_no_process_behind(stack):
    processes = stack_processes(stack)
    assert len(processes) > 5  # the scheduler's executor workers are among them
    result = stack.down()
    assert result.returncode == 0, result.stderr
    _, alive = psutil.wait_procs(processes, timeout=1)
    assert [(p.pid, p.name()) for p in alive] == []
    status = stack.cli("status")
    assert status.returncode == 3
    assert "not running" in status.stdout
