"""Names the pipeline shares with SageMaker and CloudWatch, each defined once. Light: the DAG imports it."""

DAG_ID = "mnist_sweep"  # the sweep DAG (dags/mnist_sweep.py)
BATCH_DAG_ID = "mnist_batch_predict"  # the batch predictions DAG (dags/mnist_batch_predict.py)
DRIFT_DAG_ID = "mnist_drift"  # the drift check (dags/mnist_drift.py)
DEFAULT_ENDPOINT = "mnist-classifier"
VARIANT_NAME = "AllTraffic"  # the variant name SageMaker gives a single-variant endpoint config
ENDPOINT_NAMESPACE = "AWS/SageMaker"  # the invocation metrics of endpoints
INSTANCE_NAMESPACE = "/aws/sagemaker/Endpoints"  # CPU and memory of the instances behind an endpoint
# The model server's setting (an environment variable of the container) for the arithmetic of large batches; the
# handler's predictor (inference/predictor.py) reads the same name. A copy, because that module imports torch;
# tests/test_inference.py holds the two together.
PRECISION_VARIABLE = "MNIST_INFERENCE_PRECISION"
PRECISIONS = ("float32", "bfloat16")
# SageMaker's rule for job, model and endpoint names: `[a-zA-Z0-9](-*[a-zA-Z0-9])*`, at most this long (the local
# SageMaker service's runtime keeps its own copy: tests/test_layers.py holds both to botocore's model).
MAX_NAME_LENGTH = 63


def endpoint_dimensions(endpoint_name: str) -> list[dict]:
    """The CloudWatch dimensions of an endpoint's single variant."""
    return [{"Name": "EndpointName", "Value": endpoint_name}, {"Name": "VariantName", "Value": VARIANT_NAME}]
