"""A real browser against the Airflow UI of a local stack: log in, trigger mnist_sweep through its trigger form with
a non-default hidden_channels list, see the run complete with one mapped training task per value, and open its
report on the run's page (refused without the session). Then approval as a person gives it: a manual run's version
approved under Browse → Required Actions, which then serves; another's rejected there, and the champion stays.

Headless Chromium is Debian's `chromium` (`make test` installs it when missing), driven by Playwright for Python;
never `playwright install`. Screenshots of each step go to artifacts/test-screenshots/.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from urllib.parse import quote

import pytest

from tests.conftest import ROOT
from tests.helpers.local_stack import shared_stack
from tests.helpers.polling import wait_until

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOTS = ROOT / "artifacts" / "test-screenshots"
HIDDEN_CHANNELS = [3, 6]  # not the default list


@pytest.fixture
def stack(request, small_mnist):
    return shared_stack(request, small_mnist)


@pytest.fixture
def page():
    from playwright.sync_api import sync_playwright

    if not shutil.which(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs it (apt-get install chromium)")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)
        yield page
        browser.close()


def wait_for_run(api, run_id: str, timeout: float = 420) -> dict:
    return wait_until(
        lambda: api.get(f"/dags/mnist_sweep/dagRuns/{run_id}").json(),
        lambda run: run["state"] in ("success", "failed"),
        timeout=timeout,
        interval=3,
        failure=f"run {run_id} did not finish",
    )


def test_trigger_form_runs_the_sweep(stack, page, small_mnist):
    with stack.api() as api:
        known = {run["dag_run_id"] for run in api.get("/dags/mnist_sweep/dagRuns").json()["dag_runs"]}

    page.goto(stack.url)
    page.get_by_label("Username").fill("admin")
    page.get_by_label("Password").fill(stack.password)
    page.screenshot(path=SCREENSHOTS / "1-login.png")
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(lambda url: "/auth/" not in url)
    page.wait_for_load_state("networkidle")
    page.goto(f"{stack.url}/dags/mnist_sweep")
    page.get_by_role("button", name="Trigger").first.click()
    dialog = page.get_by_role("dialog")

    # Sweep section: hidden_channels is a JSON editor. Replace its text; the editor closes the opening bracket
    # itself, so the typed closing one is deleted, as a user would.
    dialog.get_by_text("Sweep", exact=True).click()
    editor = dialog.locator(".monaco-editor").first
    editor.click()
    page.keyboard.press("ControlOrMeta+A")
    page.keyboard.insert_text(json.dumps(HIDDEN_CHANNELS))
    page.keyboard.press("Delete")
    assert json.loads(editor.locator(".view-lines").inner_text().replace("\xa0", " ")) == HIDDEN_CHANNELS
    dialog.locator("input[name=element_epochs]").fill("1")
    page.screenshot(path=SCREENSHOTS / "2-trigger-form-sweep.png")
    # Data section: the small generated files as the mirror (no network in tests).
    dialog.get_by_text("Data and deployment", exact=True).click()
    dialog.locator("input[name=element_mnist_mirror]").fill(str(small_mnist))
    dialog.locator("label:has(input[name=element_deploy])").click()  # the Deploy switch: off, to keep it short
    assert not dialog.locator("input[name=element_deploy]").is_checked()
    page.screenshot(path=SCREENSHOTS / "3-trigger-form-data.png")
    dialog.get_by_role("button", name="Trigger").click()

    with stack.api() as api:
        new = wait_until(
            lambda: [
                run for run in api.get("/dags/mnist_sweep/dagRuns").json()["dag_runs"] if run["dag_run_id"] not in known
            ],
            timeout=60,
            interval=1,
            fail=False,
        )
        assert len(new) == 1, "the trigger form started no run"
        run_id = new[0]["dag_run_id"]
        assert new[0]["conf"]["hidden_channels"] == HIDDEN_CHANNELS
        assert new[0]["conf"]["mnist_mirror"] == str(small_mnist)

        page.goto(f"{stack.url}/dags/mnist_sweep/runs/{run_id}")
        page.screenshot(path=SCREENSHOTS / "4-run-started.png")
        run = wait_for_run(api, run_id)
        page.reload()
        page.wait_for_load_state("networkidle")
        page.screenshot(path=SCREENSHOTS / "5-run-finished.png", full_page=True)
        tis = api.get(f"/dags/mnist_sweep/dagRuns/{run_id}/taskInstances", params={"limit": 1000}).json()
        training = sorted(ti["map_index"] for ti in tis["task_instances"] if ti["task_id"] == "train")
        failed = [(ti["task_id"], ti["map_index"]) for ti in tis["task_instances"] if ti["state"] == "failed"]
        names = sorted(ti["rendered_map_index"] for ti in tis["task_instances"] if ti["task_id"] == "train")
    assert run["state"] == "success", f"run {run_id} {run['state']}; failed tasks: {failed}"
    assert training == list(range(len(HIDDEN_CHANNELS)))
    # Each sweep member by its hidden_channels value, on the run's page of mapped training tasks.
    assert names == sorted(f"hidden_channels={value}" for value in HIDDEN_CHANNELS)
    page.goto(f"{stack.url}/dags/mnist_sweep/runs/{run_id}/tasks/train/mapped")
    for value in HIDDEN_CHANNELS:
        page.get_by_text(f"hidden_channels={value}", exact=True).first.wait_for(timeout=30_000)
    page.screenshot(path=SCREENSHOTS / "6-sweep-members-by-name.png", full_page=True)

    # The run's report inside the UI: the "Run report" view on the run's page (the project's Airflow plugin).
    page.goto(f"{stack.url}/dags/mnist_sweep/runs/{run_id}")
    page.get_by_role("tab", name="Run report").or_(page.get_by_role("link", name="Run report")).first.click()
    frame = page.frame_locator("iframe").first
    frame.get_by_role("table").first.wait_for(timeout=30_000)
    header = frame.get_by_role("table").first.inner_text()
    assert "hidden_channels" in header and "last acc" in header, header
    for value in HIDDEN_CHANNELS:
        assert frame.get_by_role("cell", name=str(value), exact=True).count() >= 1
    # Its figures load under the view's sandbox: the page keeps its origin, so the session cookie goes with them.
    figures = frame.locator("img")
    assert figures.count() >= 1
    wait_until(
        lambda: all(figures.nth(i).evaluate("img => img.complete") for i in range(figures.count())),
        timeout=30,
        interval=0.5,
        failure="the report's figures did not load",
    )
    widths = [figures.nth(i).evaluate("img => img.naturalWidth") for i in range(figures.count())]
    assert 0 not in widths, f"a figure of the report was refused: {widths}"
    page.screenshot(path=SCREENSHOTS / "7-sweep-report-in-the-ui.png", full_page=True)

    # Behind Airflow's authentication: without the session (logged out), the report is refused.
    import httpx

    report = f"{stack.url}/mnist-reports/mnist_sweep/{quote(run_id, safe='')}/report/report.html"
    assert httpx.get(report).status_code == 401
    cookies = {cookie["name"]: cookie["value"] for cookie in page.context.cookies()}
    answer = httpx.get(report, cookies=cookies)
    assert answer.status_code == 200, "the browser's session is what lets it in"
    assert "sandbox" in answer.headers["content-security-policy"]
    assert httpx.get(report.replace("report.html", "..%2F..%2Fstack.json"), cookies=cookies).status_code == 404


# Approval in the UI: runs of their own endpoint, approval manual; the gate lets any model through to the reviewer.
REVIEWED_ENDPOINT = "browser-review"
MANUAL = {
    "approval": "manual",
    "endpoint_name": REVIEWED_ENDPOINT,
    "min_test_accuracy": 0.0,
    "accuracy_tolerance": 1.0,
    "bake_seconds": 0,
    "smoke_requests": 50,
    "max_p99_latency_ms": 20_000,
    "max_model_latency_ms": 10_000,
}
# Learns the small digits (test accuracy > 0.9: it passes the check); one epoch of the smallest network does not.
GOOD = {"epochs": 3, "optimizer": "adam", "lr": 0.005, "batch_size": 32, "hidden_channels": [16]}
POOR = {"epochs": 1, "hidden_channels": [2]}
APPROVAL_SCREENSHOT = ROOT / "artifacts" / "approval-request.png"


def log_in(page, stack) -> None:
    page.goto(stack.url)
    page.get_by_label("Username").fill("admin")
    page.get_by_label("Password").fill(stack.password)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(lambda url: "/auth/" not in url)
    page.wait_for_load_state("networkidle")


@contextlib.contextmanager
def review_waiting(stack, small_mnist, conf: dict, timeout: float = 420):
    """A manual run triggered through the REST API, once its review waits for a person: yields its run id and the
    version it registered. A review still waiting afterwards (the test failed first) is rejected through the API:
    a waiting run would hold up every later run of the DAG (max_active_runs 1) for a day."""
    run_id = None
    try:
        run_id, version = _start_review(stack, small_mnist, conf, timeout)
        yield run_id, version
    finally:
        if run_id is not None:
            with stack.api() as api:
                hitl = f"/dags/mnist_sweep/dagRuns/{quote(run_id, safe='')}/taskInstances/review/-1/hitlDetails"
                if not api.get(hitl).json().get("response_received"):
                    api.patch(hitl, json={"chosen_options": ["Reject"], "params_input": {"comment": "test ended"}})


def _start_review(stack, small_mnist, conf: dict, timeout: float) -> tuple[str, int]:
    with stack.api() as api:
        created = api.post(
            "/dags/mnist_sweep/dagRuns",
            json={"logical_date": None, "conf": {**MANUAL, **conf, "mnist_mirror": str(small_mnist)}},
        )
        assert created.status_code == 200, created.text
        run_id = created.json()["dag_run_id"]

        def asked() -> bool:
            review = api.get(f"/dags/mnist_sweep/dagRuns/{quote(run_id, safe='')}/taskInstances/review").json()
            if review["state"] == "awaiting_input":
                return True
            run = api.get(f"/dags/mnist_sweep/dagRuns/{quote(run_id, safe='')}").json()
            assert run["state"] in ("queued", "running"), f"run {run_id} {run['state']} before its review asked"
            return False

        wait_until(asked, timeout=timeout, interval=3, failure=f"the review of run {run_id} did not wait for a person")
        arn = api.get(
            f"/dags/mnist_sweep/dagRuns/{quote(run_id, safe='')}/taskInstances/register/xcomEntries/return_value"
        ).json()["value"]
        return run_id, int(arn.rsplit("/", 1)[1])


def answer_in_the_ui(page, stack, version: int, answer: str, comment: str, screenshot=None) -> str:
    """As a person: Browse → Required Actions, the request of ``version``, a comment, the answer's button. Returns
    the request's link to the run's report."""
    if screenshot:  # the whole request, down to its buttons
        page.set_viewport_size({"width": 1400, "height": 2000})
    page.goto(stack.url)
    page.get_by_role("button", name="Browse").click()
    page.get_by_role("menuitem", name="Required Actions").click()
    page.get_by_role("link", name=f"Approve version {version} of {REVIEWED_ENDPOINT}?").click()
    page.get_by_text("it waits for your approval before it serves").wait_for()
    report = page.get_by_role("link", name="open", exact=True).get_attribute("href")
    page.locator("input[name=element_comment]").fill(comment)
    if screenshot:
        page.wait_for_load_state("networkidle")
        page.screenshot(path=screenshot, full_page=True)
    page.get_by_role("button", name=answer, exact=True).click()
    page.get_by_text("review response successful").wait_for()
    return report


def endpoint_model(stack) -> tuple[str, str] | None:
    """What the reviewed endpoint serves: (endpoint config, model artifact), or None without the endpoint."""
    sagemaker = stack.client("sagemaker")
    try:
        config = sagemaker.describe_endpoint(EndpointName=REVIEWED_ENDPOINT)["EndpointConfigName"]
    except sagemaker.exceptions.ClientError:
        return None
    variant = sagemaker.describe_endpoint_config(EndpointConfigName=config)["ProductionVariants"][0]
    return config, sagemaker.describe_model(ModelName=variant["ModelName"])["PrimaryContainer"]["ModelDataUrl"]


def version_of(stack, version: int) -> dict:
    arn = f"arn:aws:sagemaker:us-east-1:000000000000:model-package/{REVIEWED_ENDPOINT}/{version}"
    return stack.client("sagemaker").describe_model_package(ModelPackageName=arn)


def test_a_version_approved_in_the_ui_is_deployed_and_serves(stack, page, small_mnist):
    comment = "Every digit above 90%; approved for the endpoint"
    with review_waiting(stack, small_mnist, GOOD) as (run_id, version):
        log_in(page, stack)
        report = answer_in_the_ui(page, stack, version, "Approve", comment)
    with stack.api() as api:
        run = wait_for_run(api, run_id)
        tis = api.get(f"/dags/mnist_sweep/dagRuns/{quote(run_id, safe='')}/taskInstances").json()["task_instances"]
    found = {ti["task_id"]: ti["state"] for ti in tis}
    assert run["state"] == "success", found
    assert {task: found[task] for task in ("review", "deploy", "monitor")} == dict.fromkeys(
        ("review", "deploy", "monitor"), "success"
    )
    described = version_of(stack, version)
    assert described["ModelApprovalStatus"] == "Approved"
    assert re.fullmatch(
        rf"Approved by admin in the Airflow UI at [\d-]+ [\d:]+ UTC \(mnist_sweep run "
        rf"{re.escape(run_id)}\): {re.escape(comment)}",
        described["ApprovalDescription"],
    )
    # It serves: the endpoint's model is the version's, and it answers.
    _, model = endpoint_model(stack)
    assert model == described["InferenceSpecification"]["Containers"][0]["ModelDataUrl"]
    from training.mnist_idx import load_mnist

    images = load_mnist(small_mnist)["test_images"][:5]
    answer = stack.client("sagemaker-runtime").invoke_endpoint(
        EndpointName=REVIEWED_ENDPOINT, ContentType="application/json", Body=json.dumps({"instances": images.tolist()})
    )
    assert len(json.loads(answer["Body"].read())["predictions"]) == 5
    # The request's link opens the run's report, which says who approved it.
    page.goto(report)
    page.get_by_text("Approved by admin in the Airflow UI").first.wait_for()
    page.screenshot(path=SCREENSHOTS / "8-approved-run-report.png", full_page=True)


def test_a_version_rejected_in_the_ui_is_not_deployed_and_the_champion_stays(stack, page, small_mnist):
    before = endpoint_model(stack)
    assert before is not None, "the approval test serves a champion on the endpoint first"
    try:
        with review_waiting(stack, small_mnist, POOR) as (run_id, version):
            log_in(page, stack)
            # The request as a reviewer sees it, against the champion: for the closing note.
            answer_in_the_ui(page, stack, version, "Reject", "Misreads most digits", screenshot=APPROVAL_SCREENSHOT)
        with stack.api() as api:
            run = wait_for_run(api, run_id)
            tis = api.get(f"/dags/mnist_sweep/dagRuns/{quote(run_id, safe='')}/taskInstances").json()
        found = {ti["task_id"]: ti["state"] for ti in tis["task_instances"]}
        assert run["state"] == "success", found
        assert found["review"] == "success" and found["deploy"] == "skipped", found
        described = version_of(stack, version)
        assert described["ModelApprovalStatus"] == "Rejected"
        assert described["ApprovalDescription"].endswith(f"(mnist_sweep run {run_id}): Misreads most digits")
        assert endpoint_model(stack) == before  # the champion still serves
        assert f"Not deployed: version {version} was rejected (Rejected by admin" in run["note"], run["note"]
    finally:  # the shared stack's other tests need its cores
        stack.client("sagemaker").delete_endpoint(EndpointName=REVIEWED_ENDPOINT)
