"""The provider's SageMakerTrainingOperator, reading the job's status every ``check_interval`` as it streams the log.

With ``print_log`` the provider's hook asks for the job's status at most every 30 s, whatever ``check_interval``
says: a guard against DescribeTrainingJob throttling on AWS, where jobs take minutes and the interval is 30 s
anyway. A job of seconds on the local SageMaker service would wait that out (five seed jobs: all done after 43 s,
their tasks after 64 s). This hook honours ``check_interval`` for the status too, never more often than the
provider would with the same interval; everything else is the provider's own code.
"""

from __future__ import annotations

from airflow.providers.amazon.aws.hooks.sagemaker import SageMakerHook
from airflow.providers.amazon.aws.operators.sagemaker import SageMakerTrainingOperator

# The provider's pause between DescribeTrainingJob calls while it tails the job's log (hooks/sagemaker.py).
PROVIDER_DESCRIBE_SECONDS = 30


class TrainingLogHook(SageMakerHook):
    """SageMakerHook whose log-tailing wait describes the job every ``check_interval`` (at most every 30 s)."""

    describe_interval: float = PROVIDER_DESCRIBE_SECONDS

    def check_training_status_with_log(self, job_name, non_terminal_states, failed_states, wait_for_completion,
                                       check_interval, max_ingestion_time=None):  # fmt: skip
        self.describe_interval = min(check_interval, PROVIDER_DESCRIBE_SECONDS)
        return super().check_training_status_with_log(
            job_name, non_terminal_states, failed_states, wait_for_completion, check_interval, max_ingestion_time
        )

    def describe_training_job_with_log(self, job_name, positions, stream_names, instance_count, state,
                                       last_description, last_describe_job_call):  # fmt: skip
        # The provider describes the job once 30 s have passed since its last call to DescribeTrainingJob: showing
        # it that call earlier by the difference makes it describe every describe_interval.
        shifted = last_describe_job_call - (PROVIDER_DESCRIBE_SECONDS - self.describe_interval)
        state, last_description, called = super().describe_training_job_with_log(
            job_name, positions, stream_names, instance_count, state, last_description, shifted
        )
        return state, last_description, last_describe_job_call if called == shifted else called


class TrainingOperator(SageMakerTrainingOperator):
    """SageMakerTrainingOperator with TrainingLogHook: the same requests, waits and log, without the 30 s lag."""

    aws_hook_class = TrainingLogHook
