"""The command line on top of everything: `mnist-pipeline`, the local stack (local AWS, local SageMaker service,
Airflow) and its REST client. It may import any layer; nothing imports it but the tests and benchmarks."""
