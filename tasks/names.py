"""Names the pipeline shares with SageMaker and CloudWatch, each defined once. Light: the DAG imports it."""

DAG_ID = "mnist_sweep"  # the sweep DAG (dags/mnist_sweep.py)
DEFAULT_ENDPOINT = "mnist-classifier"
VARIANT_NAME = "AllTraffic"  # the variant name SageMaker gives a single-variant endpoint config
ENDPOINT_NAMESPACE = "AWS/SageMaker"  # the invocation metrics of endpoints
INSTANCE_NAMESPACE = "/aws/sagemaker/Endpoints"  # CPU and memory of the instances behind an endpoint
# The tag on each endpoint config the pipeline creates: the test accuracy of the model it serves, kept in SageMaker
# itself, against which the champion record in S3 is checked.
TEST_ACCURACY_TAG = "mnist-pipeline:test-accuracy"


def endpoint_dimensions(endpoint_name: str) -> list[dict]:
    """The CloudWatch dimensions of an endpoint's single variant."""
    return [{"Name": "EndpointName", "Value": endpoint_name}, {"Name": "VariantName", "Value": VARIANT_NAME}]
