"""The Airflow Assets of the pipeline: what its runs produce, for the Assets view's lineage and for the DAGs they
schedule. Each event's extra says which one (the dataset's S3 URI; the champion's registry version and model; the drift found)."""

from __future__ import annotations

from airflow.sdk import Asset

# The MNIST files as uploaded, content-addressed (`<s3_root>/datasets/mnist/<sha256>/`): the sweep's `upload`.
DATASET = Asset(name="mnist_dataset", uri="x-mnist-pipeline://datasets/mnist", group="mnist")
# The model serving the endpoint, Approved in the registry: the sweep's `monitor` when a check passes. It schedules
# mnist_batch_predict.
CHAMPION = Asset(name="mnist_champion", uri="x-mnist-pipeline://registry/champion", group="mnist")
# Drift in the inputs an endpoint serves, found by mnist_drift, which emits an event (its figures and reasons in the
# extra) at most once per retrain_interval_hours; with retrain_on_drift, it schedules a retraining run of the sweep.
DRIFT = Asset(name="mnist_drift", uri="x-mnist-pipeline://monitoring/drift", group="mnist")
