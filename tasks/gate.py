"""The champion gate: deploy a new model only when it is good enough and no worse than the one serving now.

The champion is the latest Approved version in the model registry that the endpoint serves now
(tasks.registry.champion): SageMaker's own record, wherever the AWS connection points. Accuracies are fractions
(0.9714).
"""

from __future__ import annotations

import logging

from tasks.config import PipelineConfig
from tasks.policy import DEFAULT_MIN_TEST_ACCURACY, DEFAULT_TOLERANCE

log = logging.getLogger(__name__)


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


def judge(
    config: PipelineConfig,
    endpoint_name: str,
    best_accuracy: float,
    *,
    min_test_accuracy: float = DEFAULT_MIN_TEST_ACCURACY,
    tolerance: float = DEFAULT_TOLERANCE,
) -> dict:
    """Decide whether the run's best model may replace the champion. Refusal is a normal outcome, not an error.

    Returns what the registration, the report and the run note need: ``{"deploy", "reason", "best_accuracy",
    "champion_accuracy", "champion_model_data_url", "champion_version", "min_test_accuracy", "tolerance"}``.
    """
    from tasks.registry import champion as registry_champion

    champion = registry_champion(config, endpoint_name)
    champion_accuracy = champion["test_accuracy"] if champion else None
    deploy, reason = decide(best_accuracy, champion_accuracy, min_test_accuracy, tolerance)
    log.info("Gate for endpoint %s: %s — %s", endpoint_name, "deploy" if deploy else "skip deployment", reason)
    return {
        "deploy": deploy,
        "reason": reason,
        "best_accuracy": best_accuracy,
        "champion_accuracy": champion_accuracy,
        "champion_model_data_url": champion and champion["model_data_url"],
        "champion_version": champion and champion["model_package_arn"],
        "min_test_accuracy": min_test_accuracy,
        "tolerance": tolerance,
    }
