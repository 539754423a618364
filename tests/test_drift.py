"""Data capture and drift, proven with real traffic: a model trained on the official MNIST is registered and served
on an endpoint of the local SageMaker service with capture on; official test digits go through it, then digits
damaged the way real inputs go wrong, each kind in a window of its own, and mnist_drift (run whole, with
`dag.test()`) judges each window: the clean one is no drift, every damaged one is drift, naming the figure that
moved. The first drift tells the topic and emits an event of the mnist_drift asset; the next ones, within
retrain_interval_hours, only tell the topic. A window too small is not judged and moves nothing.

`make test-long` (a minute or two of it), run by .ci/run.
"""

from __future__ import annotations

import datetime

import numpy as np
import pytest
from PIL import Image

from tests.helpers.alerts import read_alerts, subscribe_queue
from tests.helpers.dag_runs import parse_dag, states, xcoms
from tests.helpers.endpoints import pack, train_artifact
from tests.helpers.traffic import invoke_all
from training.mnist_idx import load_mnist

pytestmark = [pytest.mark.long, pytest.mark.slow, pytest.mark.real_data]

ENDPOINT = "drift-real"
WINDOW = 600  # requests per window, one digit each
MIN_REQUESTS = 500
TOO_FEW = 100
RUN = "manual__drift-test"


def inverted(images: np.ndarray) -> np.ndarray:
    return 255 - images


def rotated(images: np.ndarray, degrees: float = 45) -> np.ndarray:
    return np.stack(
        [np.asarray(Image.fromarray(image).rotate(degrees, resample=Image.Resampling.BILINEAR)) for image in images]
    )


def shifted(images: np.ndarray, pixels: int = 6) -> np.ndarray:
    moved = np.zeros_like(images)
    moved[:, pixels:, pixels:] = images[:, :-pixels, :-pixels]  # down and right, off the centre of mass
    return moved


def thicker(images: np.ndarray) -> np.ndarray:
    """Strokes a pixel wider on every side: a 3x3 maximum filter (a bolder pen, or a scan's bleed)."""
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1)))
    return np.max([padded[:, 1 + dy : 29 + dy, 1 + dx : 29 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1)], axis=0)


DAMAGES = {"inverted": inverted, "rotated": rotated, "shifted": shifted, "thicker": thicker}


@pytest.fixture(scope="module")
def served(local_aws, local_sagemaker, airflow_db, real_mnist, tmp_path_factory):
    """The endpoint, serving a registered, Approved model of the official MNIST with capture at 100%; yields the
    test digits, the alert queue and the configuration."""
    import boto3
    import torch

    from inference.artifact import load_handler
    from tasks.config import load_config
    from tasks.deployment import sagemaker_deploy_requests
    from tasks.hooks import sagemaker_hook
    from tasks.registry import registration
    from tasks.s3 import put_content_addressed

    directory = tmp_path_factory.mktemp("drift")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MNIST_PIPELINE_BUCKET", "drift-real")
        patch.setenv("MNIST_PIPELINE_STATE_DIR", str(directory / "state"))
        boto3.client("s3", endpoint_url=local_aws).create_bucket(Bucket="drift-real")
        topic = boto3.client("sns", endpoint_url=local_aws).create_topic(Name="drift-alerts")["TopicArn"]
        patch.setenv("MNIST_PIPELINE_ALERT_TOPIC_ARN", topic)
        alerts = subscribe_queue(local_aws, topic)
        config = load_config()

        model_dir = directory / "model"
        accuracy = train_artifact(model_dir, real_mnist, epochs=2, limit=6000)
        data = load_mnist(real_mnist)
        test_images, test_labels = data["test_images"], data["test_labels"]
        handler = load_handler(model_dir)
        probabilities = handler.predict_fn(
            torch.from_numpy(test_images.astype(np.float32)[:, None]), handler.model_fn(str(model_dir))
        ).numpy()
        archive = pack(model_dir, directory / "model.tar.gz").read_bytes()
        model_url = put_content_addressed(config, "models", "model.tar.gz", archive)
        best = {
            "training_job_name": "drift-real-model",
            "hidden_channels": 10,
            "test_accuracy": accuracy,
            "test_confidence": float(probabilities.max(axis=1).mean()),
            "model_data_url": model_url,
            "per_class_accuracy": None,
            "parameters": None,
        }
        version = registration(best, f"{config.s3_root}/datasets/mnist/{'0' * 64}/", RUN, config)
        sagemaker = sagemaker_hook(config).conn
        sagemaker.create_model_package_group(ModelPackageGroupName=ENDPOINT)
        sagemaker.create_model_package(
            ModelPackageGroupName=ENDPOINT, ModelApprovalStatus="Approved", **version["extras"]
        )
        requests = sagemaker_deploy_requests(
            best, endpoint_name=ENDPOINT, run_id=RUN, config=config, capture_percent=100
        )
        sagemaker.create_model(**requests["model"])
        sagemaker.create_endpoint_config(**requests["endpoint_config"])
        sagemaker.create_endpoint(**requests["endpoint"])
        try:
            sagemaker.get_waiter("endpoint_in_service").wait(
                EndpointName=ENDPOINT, WaiterConfig={"Delay": 1, "MaxAttempts": 120}
            )
            yield {
                "config": config,
                "alerts": alerts,
                "images": test_images,
                "labels": test_labels,
                "confidence": best["test_confidence"],
                "aws": local_aws,
            }
        finally:
            sagemaker.delete_endpoint(EndpointName=ENDPOINT)


def send(config, images: np.ndarray) -> None:
    """The digits through the endpoint, each a request, once its capture holds them all."""
    from tasks.hooks import hook, s3_hook

    invoke_all(hook(config, "sagemaker-runtime").conn, s3_hook(config).conn, config, ENDPOINT, images)


def check(conf: dict | None = None):
    """One run of mnist_drift, whole; returns (run, the check's result)."""
    moment = datetime.datetime.now(datetime.UTC)
    run = parse_dag("mnist_drift").test(
        run_conf={"endpoint_name": ENDPOINT, "min_requests": MIN_REQUESTS, **(conf or {})},
        logical_date=moment,
        run_after=moment,
    )
    [result] = xcoms(run.run_id, "check_capture")
    return run, result


@pytest.fixture(scope="module")
def windows(served):
    """Each window's run and result, in order: too few, clean, then each damage, then a class-skewed one."""
    rng = np.random.default_rng(0)
    images, labels = served["images"], served["labels"]
    found = {}
    send(served["config"], images[rng.choice(len(images), TOO_FEW, replace=False)])
    found["too_few"] = check()
    send(served["config"], images[rng.choice(len(images), WINDOW - TOO_FEW, replace=False)])  # with those: a window
    found["clean"] = check()
    for name, damage in DAMAGES.items():
        send(served["config"], damage(images[rng.choice(len(images), WINDOW, replace=False)]))
        found[name] = check()
    ones_and_sevens = np.flatnonzero((labels == 1) | (labels == 7))
    send(served["config"], images[rng.choice(ones_and_sevens, WINDOW, replace=False)])
    found["skewed"] = check()
    # The figures of each window, for the log (`make test-long` shows them).
    for name, (_, result) in found.items():
        figures = ", ".join(f"{key} {value}" for key, value in result["figures"].items())
        print(f"{name}: {result['verdict']} ({result['requests']} requests) {figures}")
    return found


def test_too_few_requests_are_not_judged_and_move_nothing(windows):
    run, result = windows["too_few"]
    assert result["verdict"] == "not enough data" and result["requests"] == TOO_FEW, result
    assert result["summary"] == (
        f"Not enough data: {TOO_FEW} requests to {ENDPOINT} since the last check; nothing judged."
    )
    assert states(run)["alert"] == ["skipped"]
    # The position stayed: the next check read those again, with the rest of its window.
    assert windows["clean"][1]["requests"] == WINDOW


def test_official_test_digits_are_no_drift(windows, served):
    run, result = windows["clean"]
    assert result["verdict"] == "no drift", result
    assert result["reasons"] == [] and result["skipped"] == {}
    assert result["model"]["test_confidence"] == pytest.approx(served["confidence"])
    assert str(run.state) == "success" and states(run)["alert"] == ["skipped"]


@pytest.mark.parametrize(
    ("damage", "figure"),
    [("inverted", "intensity"), ("rotated", "slant"), ("shifted", "centre"), ("thicker", "intensity")],
)
def test_each_damage_is_drift_naming_what_moved(windows, damage, figure):
    run, result = windows[damage]
    assert result["verdict"] == "drift", result
    assert result["requests"] == WINDOW
    assert any(figure in reason for reason in result["reasons"]), result["reasons"]
    assert str(run.state) == "success"


def test_a_skewed_class_mix_is_drift_in_the_predicted_classes(windows):
    _, result = windows["skewed"]
    assert result["verdict"] == "drift", result
    assert any("class" in reason for reason in result["reasons"]), result["reasons"]


def test_the_first_drift_asks_for_retraining_the_next_ones_only_tell_the_topic(windows, served):
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    first, *later = (windows[name][0] for name in (*DAMAGES, "skewed"))
    assert states(first)["alert"] == ["success"]
    assert [states(run)["alert"] for run in later] == [["skipped"]] * len(later)
    with create_session() as session:
        events = session.scalars(
            select(AssetEvent)
            .join(AssetModel, AssetEvent.asset_id == AssetModel.id)
            .where(AssetModel.name == "mnist_drift", AssetEvent.source_run_id == first.run_id)
        ).all()
        [event] = events
        extra = event.extra
    assert extra["endpoint_name"] == ENDPOINT and extra["verdict"] == "drift" and extra["reasons"]
    assert extra["summary"].startswith(f"Drift in {WINDOW} requests to {ENDPOINT}: ")
    told = read_alerts(served["aws"], served["alerts"], wanted=1 + len(later), event="drift_detected")
    assert len(told) == 1 + len(later)
    assert told[0]["Subject"] == f"MNIST: drift in the inputs of {ENDPOINT}"
    assert "Report: s3://drift-real/" in told[0]["Message"] and "Figures: " in told[0]["Message"]


def test_the_report_is_written_and_figures_reach_cloudwatch(windows, served):
    from tasks.drift import DRIFT_NAMESPACE, run_directory
    from tasks.hooks import hook

    run, _ = windows["inverted"]
    report = (run_directory(served["config"], run.run_id) / "report" / "report.md").read_text()
    assert report.startswith(f"# Drift check of {ENDPOINT}") and "**Drift**" in report
    assert "## Figures" in report and "![the 16 most atypical inputs](atypical.png)" in report
    assert (run_directory(served["config"], run.run_id) / "report" / "atypical.png").stat().st_size > 0
    cloudwatch = hook(served["config"], "cloudwatch").conn
    metrics = cloudwatch.list_metrics(
        Namespace=DRIFT_NAMESPACE, Dimensions=[{"Name": "EndpointName", "Value": ENDPOINT}]
    )["Metrics"]
    assert {"Requests", "Drift"} <= {metric["MetricName"] for metric in metrics}
