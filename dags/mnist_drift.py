"""
# MNIST drift check

Says when the inputs an endpoint serves stopped looking like the MNIST its model was trained on.

**Reads** the endpoint's data capture (`<s3_root>/capture/<endpoint>/`, which deployments turn on with the sweep's
`capture_percentage`) written since the last check, each capture file exactly once across runs, retries and
restarts: where the last check stopped is kept in S3. Inputs are decoded as the model server decodes them.

**Compares** them with the official MNIST training set's statistics: the mean image, intensity, centre of mass and
slant of the inputs, the distribution of the predicted digits against the training labels', and the model's mean
confidence against its confidence on the held-out test set. Fewer requests than `min_requests`: not enough data,
nothing judged.

**Reports** the figures, their thresholds, the requests read, the most atypical inputs and the verdict on the run's
page ("Run report"), in S3, and as CloudWatch metrics (`MnistPipeline/Drift`). **On drift** it tells the SNS topic
and emits an event of the `mnist_drift` asset, at most once per `retrain_interval_hours`; with `retrain_on_drift`
in the configuration, that event starts a retraining run of `mnist_sweep`.

**When:** the configuration's `drift_schedule` (hourly by default), and whenever triggered by hand
(`mnist-pipeline drift`).
"""

from __future__ import annotations

import copy
import datetime

from airflow.sdk import chain, dag, task

from tasks.assets import DRIFT
from tasks.dag_tasks import config_of, configuration, drift_schedule
from tasks.names import DRIFT_DAG_ID
from tasks.params import DRIFT_PARAMS
from tasks.policy import dag_defaults


@task
def check_capture(settings: dict, params: dict, run_id: str) -> dict:
    """The window since the last check, judged; its report written and the capture position moved past it."""
    from tasks.drift import check

    return check(
        config_of(settings),
        params["endpoint_name"],
        run_id,
        min_requests=params["min_requests"],
        max_requests=params["max_requests"],
    )


@task(inlets=[DRIFT], outlets=[DRIFT])
def alert(settings: dict, result: dict, run_id: str, inlet_events, outlet_events) -> dict:
    """On drift: the SNS topic told; an event of the drift asset, unless one was emitted within
    retrain_interval_hours (the task is then skipped, saying when)."""
    from airflow.sdk.exceptions import AirflowSkipException

    from tasks.drift import notify, retraining_due

    if result["verdict"] != "drift":
        raise AirflowSkipException(result["summary"])
    config = config_of(settings)
    notify(config, result, run_id)
    events = inlet_events[DRIFT]
    last = events[-1].timestamp if events else None
    now = datetime.datetime.now(datetime.UTC)
    if not retraining_due(config, last, now):
        raise AirflowSkipException(
            f"{result['summary']} Told the topic; no new asset event: the last was at "
            f"{last:%Y-%m-%d %H:%M} UTC, within retrain_interval_hours "
            f"({config.retrain_interval_hours})."
        )
    outlet_events[DRIFT].extra = {
        key: result[key] for key in ("endpoint_name", "verdict", "reasons", "figures", "requests", "report", "summary")
    }
    return {"asset_event": True, "retrain_on_drift": config.retrains_on_drift}


@dag(
    dag_id=DRIFT_DAG_ID,
    doc_md=__doc__,
    schedule=drift_schedule(),
    **dag_defaults(),
    max_active_runs=1,  # two checks of one endpoint must not read the same window
    dagrun_timeout=datetime.timedelta(hours=2),
    tags=["mnist", "sagemaker", "monitoring", "drift"],
    # Its own copy: a run's conf (dag.test) sets the values of the Param objects, which must not become the next
    # parse's defaults in the same process.
    params=copy.deepcopy(DRIFT_PARAMS),
)
def mnist_drift():
    settings = configuration()
    result = check_capture(settings)
    chain(result, alert(settings, result))


mnist_drift()
