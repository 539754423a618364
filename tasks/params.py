"""The DAGs' trigger forms (the sweep's PARAMS, the batch predictions' BATCH_PARAMS, the drift check's
DRIFT_PARAMS): every field typed, titled and bounded, in sections. Light: the DAGs import it at parse time (Airflow's
Param, and the defaults and bounds of tasks.policy)."""

from __future__ import annotations

import dataclasses

from airflow.sdk import Param

from tasks.names import DEFAULT_ENDPOINT, MAX_NAME_LENGTH, PRECISIONS
from tasks.policy import (
    APPROVAL_MODES,
    DEFAULT_BAKE_SECONDS,
    DEFAULT_CAPTURE_PERCENT,
    DEFAULT_MAX_REQUESTS,
    DEFAULT_MIN_REQUESTS,
    DEFAULT_MIN_TEST_ACCURACY,
    DEFAULT_TIMEOUT_MINUTES,
    DEFAULT_TOLERANCE,
    DEPLOY_TIMEOUT_SECONDS,
    MAX_BAKE_SECONDS,
    MAX_REQUESTS_BOUNDS,
    MAX_TIMEOUT_MINUTES,
    MAX_TRAFFIC_PERCENT,
    MAX_TRAFFIC_WAIT_SECONDS,
    MIN_REQUESTS_BOUNDS,
    MIN_TRAFFIC_PERCENT,
    STRATEGIES,
    TRAFFIC_SHIFTS,
    TRANSFORM_INSTANCE_TYPE,
    Thresholds,
    deploy_seconds,
)

SECTION_SWEEP, SECTION_TUNING, SECTION_RESOURCES = "Sweep", "Tuning (search: tune)", "Resources (SageMaker)"
SECTION_DATA, SECTION_GATE, SECTION_CHECK = "Data and deployment", "Gate and approval", "Monitoring check"


# The bound the traffic fields keep, named in their descriptions: the longest update they allow (the most linear
# steps, each waited the longest, then the longest bake) fits the deploy task's timeout (longest_deploy_seconds).
TRAFFIC_BOUND = (
    f"Bounded so that the longest update, {100 // MIN_TRAFFIC_PERCENT} linear steps each held {MAX_TRAFFIC_WAIT_SECONDS}"
    f" s and a {MAX_BAKE_SECONDS} s bake, fits the deploy task's {DEPLOY_TIMEOUT_SECONDS // 3600} h timeout."
)
ENDPOINT_PATTERN = (
    rf"^[a-zA-Z0-9](-*[a-zA-Z0-9]){{0,{MAX_NAME_LENGTH - 1}}}(?!\n)$"  # matched whole, a trailing newline too
)
INSTANCE_TYPE_PATTERN = (
    r"^ml\.[a-z0-9]+\.[a-z0-9]+(?!\n)$"  # (?!\n): Python's $ would also match before a final newline
)


def _optional(kind: str, title: str, description: str, **schema) -> Param:
    """A hyperparameter that keeps the preset's value unless set."""
    return Param(None, type=["null", kind], title=title, description=description, section=SECTION_SWEEP, **schema)


def _bounded(default, kind, bounds: tuple, title: str, description: str, section: str) -> Param:
    """A field of ``kind`` held within ``bounds`` (minimum, maximum); its description names the bounds in its own
    words, which the forms' readers and tests compare word for word."""
    low, high = bounds
    return Param(default, type=kind, minimum=low, maximum=high, title=title, description=description, section=section)


def _string(default: str, title: str, description: str, section: str, **rule) -> Param:
    """A string field held to one ``rule``: ``enum`` (the choices) or ``pattern`` (matched whole)."""
    return Param(default, type="string", **rule, title=title, description=description, section=section)


def _interval(kind: str, title: str, description: str, low: float, high: float) -> Param:
    """A tuning range [low, high], or empty: not tuned (the preset's value, or the field above, holds)."""
    return Param(
        None,
        type=["null", "array"],
        items={"type": kind, "minimum": low, "maximum": high},
        minItems=2,
        maxItems=2,
        title=title,
        description=f"{description} [low, high], each {low}-{high}; empty: not tuned.",
        section=SECTION_TUNING,
    )


PARAMS = {
    "search": _string(
        "sweep",
        "Search",
        "sweep: one training job per hidden_channels value. tune: one SageMaker hyperparameter tuning "
        "job over the ranges in the Tuning section (objective: test accuracy, maximized).",
        SECTION_SWEEP,
        enum=["sweep", "tune"],
    ),
    "hidden_channels": Param(
        [2, 5, 10, 20, 32],
        type="array",
        items={"type": "integer", "minimum": 1, "maximum": 256},
        minItems=1,
        maxItems=16,
        uniqueItems=True,
        title="hidden_channels values",
        description="sweep: one training job per value; tune: the values searched (1-16 distinct integers, each "
        "1-256), e.g. [2, 5, 10, 20, 32].",
        section=SECTION_SWEEP,
    ),
    "preset": _string(
        "seed",
        "Recipe",
        "seed: seed_cnn, 2 epochs of SGD (lr 0.01, momentum 0.5). accurate: BatchNorm CNN, augmentation, "
        "OneCycle (99.5%+ in about 10 epochs).",
        SECTION_SWEEP,
        enum=["seed", "accurate"],
    ),
    "epochs": _optional("integer", "Epochs", "Passes over the training set (1-100).", minimum=1, maximum=100),
    "optimizer": _optional("string", "Optimizer", "sgd, adam or adamw.", enum=[None, "sgd", "adam", "adamw"]),
    "lr": _optional("number", "Learning rate", "Peak learning rate (0.00001-10).", minimum=1e-5, maximum=10),
    "batch_size": _optional("integer", "Batch size", "Training batch size (1-4096).", minimum=1, maximum=4096),
    "dropout": _optional("number", "Dropout", "Dropout probability (0-0.9).", minimum=0, maximum=0.9),
    "kernel_size": _optional("integer", "Kernel size", "Convolution kernel size (odd, 3-7).", enum=[None, 3, 5, 7]),
    "tune_strategy": _string(
        "Bayesian",
        "Strategy",
        "Bayesian (TPE), Random, Grid (every combination of the listed values: hidden_channels and batch "
        "sizes only) or Hyperband (epochs as the resource: weak jobs stop at early rungs).",
        SECTION_TUNING,
        enum=list(STRATEGIES),
    ),
    "tune_max_jobs": _bounded(
        8, "integer", (1, 100), "Max training jobs", "Training jobs the tuner may start in all (1-100).", SECTION_TUNING
    ),
    "tune_max_parallel": _bounded(
        2, "integer", (1, 16), "Max parallel jobs", "Training jobs at once (1-16).", SECTION_TUNING
    ),
    "tune_lr": _interval("number", "Learning rate range", "Searched on a log scale:", 1e-5, 10),
    "tune_dropout": _interval("number", "Dropout range", "Searched on a linear scale:", 0, 0.9),
    "tune_epochs": _interval(
        "integer", "Epochs range", "Integers; with Hyperband, its minimum and maximum resource:", 1, 100
    ),
    "tune_batch_size": Param(
        None,
        type=["null", "array"],
        items={"type": "integer", "minimum": 1, "maximum": 4096},
        minItems=1,
        maxItems=8,
        uniqueItems=True,
        title="Batch sizes",
        description="The batch sizes searched (1-8 values, each 1-4096); empty: not tuned.",
        section=SECTION_TUNING,
    ),
    "tune_early_stopping": Param(
        True,
        type="boolean",
        title="Early stopping",
        description="Stop a job whose test accuracy falls behind the median of the finished "
        "jobs at the same epoch (not with Hyperband, which stops jobs itself).",
        section=SECTION_TUNING,
    ),
    "tune_target_accuracy": _bounded(
        None,
        ["null", "number"],
        (0, 1),
        "Target accuracy",
        "Stop tuning once a job reaches this test accuracy (a fraction, 0-1); empty: run every job.",
        SECTION_TUNING,
    ),
    "instance_type": _string(
        "ml.m5.xlarge",
        "Training instance type",
        "SageMaker instance type per job, e.g. ml.m5.xlarge or ml.g5.xlarge (GPU). Locally: this machine.",
        SECTION_RESOURCES,
        pattern=INSTANCE_TYPE_PATTERN,
    ),
    "instance_count": _bounded(
        1,
        "integer",
        (1, 8),
        "Instances per job",
        "More than one trains with distributed data parallel (locally: that many processes).",
        SECTION_RESOURCES,
    ),
    "mnist_mirror": Param(
        None,
        type=["null", "string"],
        maxLength=1000,
        title="MNIST mirror",
        description="URL or directory with the four MNIST files, where the configuration allows one (the public "
        "mirrors by default); empty: $MNIST_MIRROR, else the public mirrors.",
        section=SECTION_DATA,
    ),
    "deploy": Param(
        True,
        type="boolean",
        title="Deploy",
        description="Serve a model on the endpoint: this run's, when the gate lets it through and approval is auto; "
        "else the latest version approved since the champion was deployed.",
        section=SECTION_DATA,
    ),
    "deploy_only": Param(
        False,
        type="boolean",
        title="Deploy only",
        description="Train nothing: serve the latest version approved in the registry since the champion was "
        "deployed (after `mnist-pipeline approve VERSION`), with the traffic shift and check below.",
        section=SECTION_DATA,
    ),
    "endpoint_name": _string(
        DEFAULT_ENDPOINT,
        "Endpoint name",
        "SageMaker endpoint to create or update: letters, digits and hyphens, at most 63. Its models are "
        "the versions of the registry group of the same name.",
        SECTION_DATA,
        pattern=ENDPOINT_PATTERN,
    ),
    "traffic_shift": _string(
        "all_at_once",
        "Traffic shift",
        "How an update moves traffic to the new model (blue/green): all at once, a canary share first, "
        "or in linear steps. The endpoint's alarms roll it back by themselves when one fires meanwhile.",
        SECTION_DATA,
        enum=list(TRAFFIC_SHIFTS),
    ),
    "traffic_percent": _bounded(
        20,
        "integer",
        (MIN_TRAFFIC_PERCENT, MAX_TRAFFIC_PERCENT),
        "Canary size / linear step (%)",
        f"Share of capacity the canary takes first, or each linear step adds ({MIN_TRAFFIC_PERCENT}-"
        f"{MAX_TRAFFIC_PERCENT}, as SageMaker allows a linear step: at most {100 // MIN_TRAFFIC_PERCENT} steps).",
        SECTION_DATA,
    ),
    "traffic_wait_seconds": _bounded(
        10,
        "integer",
        (0, MAX_TRAFFIC_WAIT_SECONDS),
        "Wait between shifts (s)",
        "How long the canary or each linear step takes traffic before the next (0-"
        f"{MAX_TRAFFIC_WAIT_SECONDS}). {TRAFFIC_BOUND}",
        SECTION_DATA,
    ),
    "bake_seconds": _bounded(
        DEFAULT_BAKE_SECONDS,
        "integer",
        (0, MAX_BAKE_SECONDS),
        "Bake time (s)",
        "How long the old model is kept, under the alarms, once all traffic has moved: the monitoring "
        f"check runs meanwhile, and a failed check switches back to it at once (0-{MAX_BAKE_SECONDS}). "
        f"{TRAFFIC_BOUND}",
        SECTION_DATA,
    ),
    "capture_percentage": _bounded(
        DEFAULT_CAPTURE_PERCENT,
        "integer",
        (0, 100),
        "Data capture (%)",
        "Share of the endpoint's invocations whose input and output it keeps in S3 (<s3_root>/capture/), "
        "where the drift check (mnist_drift) reads them (0-100; 0: none).",
        SECTION_DATA,
    ),
    "min_test_accuracy": _bounded(
        DEFAULT_MIN_TEST_ACCURACY,
        "number",
        (0, 1),
        "Minimum test accuracy",
        "Register (and deploy) only a model with at least this test accuracy (a fraction, 0-1; the seed "
        "reaches ~0.96).",
        SECTION_GATE,
    ),
    "accuracy_tolerance": _bounded(
        DEFAULT_TOLERANCE,
        "number",
        (0, 1),
        "Tolerance against the champion",
        "Register only a model no worse than the champion's test accuracy minus this (0-1).",
        SECTION_GATE,
    ),
    "approval": _string(
        "auto",
        "Approval",
        "auto: the registered version is deployed, then Approved when its monitoring check passes "
        "(Rejected when it fails). manual: the run waits for a person in the Airflow UI (Browse → Required "
        "Actions): Approve deploys and checks it, Reject rejects it; approved outside the UI (mnist-pipeline "
        "approve VERSION), the next run or a deploy-only run serves it.",
        SECTION_GATE,
        enum=list(APPROVAL_MODES),
    ),
    "approval_timeout": _bounded(
        DEFAULT_TIMEOUT_MINUTES,
        "integer",
        (1, MAX_TIMEOUT_MINUTES),
        "Approval timeout (minutes)",
        f"approval manual: how long the run waits for a person's answer (1-{MAX_TIMEOUT_MINUTES}, 7 "
        "days). No answer by then: the version stays PendingManualApproval, nothing is deployed, and the run ends "
        "(not failed), its review task skipped saying why.",
        SECTION_GATE,
    ),
}

# The monitoring check: name → (type, title, description, minimum, maximum). Threshold names are the fields of
# tasks.policy.Thresholds, whose defaults they take.
CHECK_PARAMS = {
    "smoke_requests": ("integer", "Smoke requests", "Held-out test images sent, one request each.", 1, 10_000),
    "metrics_timeout": (
        "integer",
        "CloudWatch wait (s)",
        "How long to wait for the load's metrics to arrive.",
        0,
        3600,
    ),
    "min_live_accuracy": ("number", "Minimum live accuracy", "Accuracy of the answers to the smoke load.", 0, 1),
    "max_accuracy_drop": (
        "number",
        "Maximum accuracy drop",
        "How far live accuracy may fall below the model's test accuracy.",
        0,
        1,
    ),
    "max_error_rate": ("number", "Maximum error rate", "Failed smoke requests / requests sent.", 0, 1),
    "max_p99_latency_ms": (
        "number",
        "Maximum p99 latency (ms)",
        "Client-side p99 of the smoke load, round trip included.",
        1,
        60_000,
    ),
    "max_model_latency_ms": (
        "number",
        "Maximum model latency (ms)",
        "CloudWatch ModelLatency, average over the load.",
        1,
        60_000,
    ),
    "max_5xx_rate": (
        "number",
        "Maximum 5XX rate",
        "CloudWatch Invocation5XXErrors / Invocations over the load, everyone's requests (4XX are callers' errors: "
        "reported, not judged); the errors alarm holds it per minute.",
        0,
        1,
    ),
    "min_rate_requests": (
        "integer",
        "Minimum requests for the 5XX rate",
        "Below this many invocations (over the load; per minute for the alarm) the 5XX rate is reported and "
        "decides nothing.",
        1,
        1_000_000,
    ),
    "max_cpu_utilization": (
        ["null", "number"],
        "Maximum CPU utilization (%)",
        "CloudWatch CPUUtilization, 100 per core; empty: not checked (a smoke load keeps the CPU busy by design).",
        0,
        10_000,
    ),
    "max_memory_utilization": (
        ["null", "number"],
        "Maximum memory utilization (%)",
        "CloudWatch MemoryUtilization; empty: not checked.",
        0,
        100,
    ),
    "alarm_p99_model_latency_ms": (
        "number",
        "Alarm: p99 model latency (ms)",
        "The alarm created on a pass fires when p99 ModelLatency over 5 minutes exceeds this.",
        1,
        60_000,
    ),
}
CHECK_DEFAULTS = {"smoke_requests": 200, "metrics_timeout": 300, **dataclasses.asdict(Thresholds())}
PARAMS.update(
    {
        name: _bounded(CHECK_DEFAULTS[name], kind, (low, high), title, f"{description} ({low}-{high})", SECTION_CHECK)
        for name, (kind, title, description, low, high) in CHECK_PARAMS.items()
    }
)


def longest_deploy_seconds(params: dict = PARAMS) -> int:
    """The longest the deploy task may run on any values the form's traffic fields accept (each shift, every step
    size, the longest wait and bake): tasks.deployment.deploy_seconds at the fields' own bounds."""
    schema = {
        name: params[name].schema
        for name in ("traffic_shift", "traffic_percent", "traffic_wait_seconds", "bake_seconds")
    }
    percents = range(schema["traffic_percent"]["minimum"], schema["traffic_percent"]["maximum"] + 1)
    return max(
        deploy_seconds(
            {
                "traffic_shift": shift,
                "traffic_percent": percent,
                "traffic_wait_seconds": schema["traffic_wait_seconds"]["maximum"],
                "bake_seconds": schema["bake_seconds"]["maximum"],
            }
        )
        for shift in schema["traffic_shift"]["enum"]
        for percent in percents
    )


def check_traffic_bounds(params: dict = PARAMS, timeout: int = DEPLOY_TIMEOUT_SECONDS) -> None:
    """ValueError when the form's traffic fields allow a deploy longer than the deploy task's ``timeout``: its
    timeout would end it mid-update."""
    if (longest := longest_deploy_seconds(params)) > timeout:
        raise ValueError(
            f"The traffic fields allow a deploy of {longest} s, longer than the deploy task's timeout "
            f"of {timeout} s: narrow their bounds"
        )


check_traffic_bounds()  # as the DAGs parse: a form out of bounds fails to load, naming why

# The batch predictions DAG's form (dags/mnist_batch_predict.py).
SECTION_INPUT, SECTION_JOB = "Input and model", "Transform job (SageMaker)"
BATCH_PARAMS = {
    "input_uri": Param(
        None,
        type=["null", "string"],
        pattern=r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^\n]*)?(?!\n)$",
        maxLength=1024,
        title="Input (S3 prefix)",
        description="The images to classify: .npy, .csv (a 784-pixel image per row), .json, .png or .jpg files under "
        "this prefix; empty: the configured batch input, <s3_root>/batch/input/.",
        section=SECTION_INPUT,
    ),
    "model": Param(
        None,
        type=["null", "string"],
        pattern=r"^([0-9]{1,9}|arn:aws[a-z-]*:sagemaker:[a-z0-9-]+:[0-9]{12}:model-package/[^/\n]+/[0-9]+)(?!\n)$",
        maxLength=256,
        title="Model version",
        description="A version number of the endpoint's registry group, or a model package version ARN, Approved "
        "(a Rejected or pending version is refused); empty: the champion (the version the champion asset names, "
        "when it triggered the run).",
        section=SECTION_INPUT,
    ),
    "endpoint_name": _string(
        DEFAULT_ENDPOINT,
        "Registry group (endpoint name)",
        "Whose champion and versions: the registry group named after the endpoint.",
        SECTION_INPUT,
        pattern=ENDPOINT_PATTERN,
    ),
    "instance_type": _string(
        TRANSFORM_INSTANCE_TYPE,
        "Transform instance type",
        "SageMaker instance type of each transform job, one the allowed_instance_types setting allows. "
        "Locally: this machine.",
        SECTION_JOB,
        pattern=INSTANCE_TYPE_PATTERN,
    ),
    "max_concurrent_transforms": _bounded(
        4,
        "integer",
        (1, 64),
        "Requests in flight",
        "MaxConcurrentTransforms: requests each job keeps in flight to its model (1-64).",
        SECTION_JOB,
    ),
    "max_payload_mb": _bounded(
        6,
        "integer",
        (1, 100),
        "Largest request (MB)",
        "MaxPayloadInMB: the largest request to the model; a bigger file fails its job, named (1-100).",
        SECTION_JOB,
    ),
    "precision": _string(
        PRECISIONS[0],
        "Arithmetic",
        "float32: the probabilities the model was evaluated with. bfloat16: up to twice the images "
        "per second on CPUs with AMX or AVX-512 BF16 (others compute float32), probabilities within about a "
        "hundredth, a label in 10,000 may change.",
        SECTION_JOB,
        enum=list(PRECISIONS),
    ),
}

# The drift check's form (dags/mnist_drift.py).
SECTION_DRIFT = "Drift check"
DRIFT_PARAMS = {
    "endpoint_name": _string(
        DEFAULT_ENDPOINT,
        "Endpoint name",
        "The endpoint whose data capture is checked (<s3_root>/capture/<endpoint>/): what its "
        "invocations sent since the last check.",
        SECTION_DRIFT,
        pattern=ENDPOINT_PATTERN,
    ),
    "min_requests": _bounded(
        DEFAULT_MIN_REQUESTS,
        "integer",
        MIN_REQUESTS_BOUNDS,
        "Minimum requests",
        f"Fewer captured requests than this since the last check: not enough data, nothing judged and "
        f"nothing changed ({MIN_REQUESTS_BOUNDS[0]}-{MIN_REQUESTS_BOUNDS[1]}).",
        SECTION_DRIFT,
    ),
    "max_requests": _bounded(
        DEFAULT_MAX_REQUESTS,
        "integer",
        MAX_REQUESTS_BOUNDS,
        "Maximum requests",
        f"At most this many captured requests are read by one check (whole capture files, oldest "
        f"first); the rest waits for the next ({MAX_REQUESTS_BOUNDS[0]}-{MAX_REQUESTS_BOUNDS[1]}).",
        SECTION_DRIFT,
    ),
}
