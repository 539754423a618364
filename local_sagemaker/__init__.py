"""A local SageMaker service: speaks the SageMaker API (control plane and runtime) on loopback and really runs training
jobs and endpoints on this machine, so that boto3, the SageMaker Python SDK and the Amazon provider for Airflow, given
an ``endpoint_url``, cannot tell it from Amazon SageMaker by the shape of what they send and get back. It imports
nothing from the rest of this repository (only botocore for SageMaker's own service model), so it could ship alone."""
