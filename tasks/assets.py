"""The Airflow Assets of the pipeline: what its runs produce, for the Assets view's lineage and for the DAGs they
schedule. Each event's extra says which one (the dataset's S3 URI; the champion's registry version and model)."""

from __future__ import annotations

from airflow.sdk import Asset

# The MNIST files as uploaded, content-addressed (`<s3_root>/datasets/mnist/<sha256>/`): the sweep's `upload`.
DATASET = Asset(name="mnist_dataset", uri="x-mnist-pipeline://datasets/mnist", group="mnist")
# The model serving the endpoint, Approved in the registry: the sweep's `monitor` when a check passes. It schedules
# mnist_batch_predict.
CHAMPION = Asset(name="mnist_champion", uri="x-mnist-pipeline://registry/champion", group="mnist")
