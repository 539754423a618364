"""The champion gate: deploy a new model only when it is good enough and no worse than the one serving now.

The champion is the model that serves the endpoint now, recorded with it when it passed the monitoring check:
`<s3_root>/endpoints/<endpoint>/champion.json` (test accuracy, model, endpoint config), in S3 wherever the AWS
connection points. The record counts only as far as SageMaker agrees with it (``verify_champion``). Accuracies are
fractions (0.9714).
"""

from __future__ import annotations

import datetime
import json
import logging

from tasks.config import PipelineConfig
from tasks.hooks import s3_hook, sagemaker_hook
from tasks.names import TEST_ACCURACY_TAG

log = logging.getLogger(__name__)

DEFAULT_MIN_TEST_ACCURACY = 0.9
# Retraining the same network moves test accuracy by a few tenths of a point by chance alone; refusing a model for
# that would freeze the endpoint on one lucky model.
DEFAULT_TOLERANCE = 0.005


def champion_uri(config: PipelineConfig, endpoint_name: str) -> str:
    return f"{config.s3_root}/endpoints/{endpoint_name}/champion.json"


class ChampionMismatch(RuntimeError):
    """The champion record disagrees with what SageMaker says the endpoint serves; the message names each field."""


def read_champion(config: PipelineConfig, endpoint_name: str) -> dict | None:
    """The champion record of ``endpoint_name``, or None when none was recorded."""
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    bucket, key = S3Hook.parse_s3_url(champion_uri(config, endpoint_name))
    s3 = s3_hook(config)
    if not s3.check_for_key(key, bucket):
        return None
    return json.loads(s3.read_key(key, bucket))


def verify_champion(config: PipelineConfig, endpoint_name: str, champion: dict, serving: str) -> None:
    """ChampionMismatch unless the record names the endpoint config the endpoint serves, that config's model
    artifact, and the test accuracy SageMaker keeps in that config's tag: a record written by anyone who can write
    to the bucket, or left over from another deployment, never decides the gate."""
    hook = sagemaker_hook(config)
    problems = []
    if champion.get("endpoint_config_name") != serving:
        problems.append(
            f"it names endpoint config {champion.get('endpoint_config_name')!r}, the endpoint serves {serving!r}"
        )
    else:
        described = hook.describe_endpoint_config(serving)
        model = hook.describe_model(described["ProductionVariants"][0]["ModelName"])
        container = model.get("PrimaryContainer") or model["Containers"][0]
        if champion.get("model_data_url") != container.get("ModelDataUrl"):
            problems.append(f"its model is {champion.get('model_data_url')!r}, the endpoint serves "
                            f"{container.get('ModelDataUrl')!r}")  # fmt: skip
        tags = hook.conn.list_tags(ResourceArn=described["EndpointConfigArn"])["Tags"]
        tagged = next((tag["Value"] for tag in tags if tag["Key"] == TEST_ACCURACY_TAG), None)
        if tagged is None or float(tagged) != champion.get("test_accuracy"):
            problems.append(f"its test accuracy is {champion.get('test_accuracy')!r}, the endpoint config's "
                            f"{TEST_ACCURACY_TAG} tag says {tagged!r}")  # fmt: skip
    if problems:
        raise ChampionMismatch(
            f"The champion record {champion_uri(config, endpoint_name)} does not agree with what SageMaker says "
            f"endpoint {endpoint_name} serves: {'; '.join(problems)}. Find out who wrote it; delete it to let the "
            "gate judge by min_test_accuracy alone until a run passes its check again."
        )


def record_champion(config: PipelineConfig, endpoint_name: str, champion: dict) -> str:
    """Record ``champion`` (at least test_accuracy, model_data_url, endpoint_config_name) as what serves now."""
    missing = {"test_accuracy", "model_data_url", "endpoint_config_name"} - champion.keys()
    if missing:
        raise ValueError(f"champion record for {endpoint_name} lacks {', '.join(sorted(missing))}")
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    uri = champion_uri(config, endpoint_name)
    bucket, key = S3Hook.parse_s3_url(uri)
    record = {
        **champion,
        "endpoint_name": endpoint_name,
        "recorded_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    s3_hook(config).load_string(json.dumps(record, indent=2), key, bucket, replace=True)
    log.info("Champion of endpoint %s is now %s (test accuracy %.4f)", endpoint_name, uri, champion["test_accuracy"])
    return uri


def serving_endpoint_config(config: PipelineConfig, endpoint_name: str) -> str | None:
    """The endpoint config the endpoint serves now (the one to roll back to), or None when there is no endpoint."""
    from botocore.exceptions import ClientError

    try:
        return sagemaker_hook(config).describe_endpoint(endpoint_name)["EndpointConfigName"]
    except ClientError as error:
        # SageMaker answers a missing endpoint with a ValidationException "Could not find endpoint ...".
        if "Could not find endpoint" in str(error):
            return None
        raise


def decide(
    best_accuracy: float, champion_accuracy: float | None, min_test_accuracy: float, tolerance: float
) -> tuple[bool, str]:
    """Whether to deploy, and why, in one line for the log and the report."""
    if not 0 <= best_accuracy <= 1:
        raise ValueError(f"best test accuracy {best_accuracy!r} is not a fraction between 0 and 1")
    if best_accuracy < min_test_accuracy:
        return False, f"best test accuracy {best_accuracy:.4f} is below min_test_accuracy {min_test_accuracy:.4f}"
    if champion_accuracy is None:
        return True, f"best test accuracy {best_accuracy:.4f} >= min_test_accuracy {min_test_accuracy:.4f}; no champion"
    floor = champion_accuracy - tolerance
    if best_accuracy < floor:
        return False, (
            f"best test accuracy {best_accuracy:.4f} is below the champion's {champion_accuracy:.4f} "
            f"minus tolerance {tolerance:.4f}"
        )
    return True, (
        f"best test accuracy {best_accuracy:.4f} >= min_test_accuracy {min_test_accuracy:.4f} and >= the "
        f"champion's {champion_accuracy:.4f} minus tolerance {tolerance:.4f}"
    )


def gate(
    config: PipelineConfig,
    endpoint_name: str,
    best_accuracy: float,
    *,
    min_test_accuracy: float = DEFAULT_MIN_TEST_ACCURACY,
    tolerance: float = DEFAULT_TOLERANCE,
) -> dict:
    """Decide whether the sweep's best model replaces the champion. Refusal is a normal outcome, not an error.

    The champion counts only while its endpoint exists. Returns what the deploy, rollback and report need:
    ``{"deploy", "reason", "best_accuracy", "champion_accuracy", "champion_model_data_url", "min_test_accuracy",
    "tolerance", "serving_endpoint_config_name"}``.
    """
    serving = serving_endpoint_config(config, endpoint_name)
    champion = read_champion(config, endpoint_name) if serving else None
    if champion:
        verify_champion(config, endpoint_name, champion, serving)
    champion_accuracy = champion["test_accuracy"] if champion else None
    deploy, reason = decide(best_accuracy, champion_accuracy, min_test_accuracy, tolerance)
    log.info("Gate for endpoint %s: %s — %s", endpoint_name, "deploy" if deploy else "skip deployment", reason)
    return {
        "deploy": deploy,
        "reason": reason,
        "best_accuracy": best_accuracy,
        "champion_accuracy": champion_accuracy,
        "champion_model_data_url": champion and champion["model_data_url"],
        "min_test_accuracy": min_test_accuracy,
        "tolerance": tolerance,
        "serving_endpoint_config_name": serving,
    }
