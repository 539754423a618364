"""The provider's SageMakerTrainingOperator, made safe to kill and to retry, and reading the job's status every
``check_interval`` as it streams the log.

- Killed (marked failed, timed out, cleared: Airflow sends the task SIGTERM and calls ``on_kill``), it stops its
  training job (StopTrainingJob), where the provider's operator has no ``on_kill`` and leaves the job running.
- A job that ended Stopped fails its task whether or not ``print_log`` is on (without it the provider's wait
  passes a stopped job on as trained).
- A retry follows the training job of its request that an earlier try started (`tasks.earlier_jobs`), under the
  task's deterministic name or the provider's timestamped variant of it: InProgress, it waits for that job instead of
  starting a second one (which would train, hold the sweep member's cores and on AWS bill twice); Completed, the job
  is the result; Stopping, it is waited out. Only after each ended Failed or Stopped does the provider start another
  (``action_if_job_exists="timestamp"``). A job of the same name with other hyperparameters, code or data (the run's
  earlier tasks cleared and run again) is not this request's.

With ``print_log`` the provider's hook asks for the job's status at most every 30 s, whatever ``check_interval``
says: a guard against DescribeTrainingJob throttling on AWS, where jobs take minutes and the interval is 30 s
anyway. A job of seconds on the local SageMaker service would wait that out: under the provider's hook, the five
jobs of the seed preset's sweep (seed_cnn at hidden_channels 2, 5, 10, 20 and 32) had all finished while their
tasks went on waiting for a good part of that half minute. bench/bench_sweep.py times the sweep's tasks
(bench/results/sweep.json, `tasks`). This hook honours ``check_interval`` for the status too, never more often
than the provider would with the same interval; everything else is the provider's own code.
"""

from __future__ import annotations

from collections.abc import Mapping

from airflow.providers.amazon.aws.hooks.sagemaker import SageMakerHook
from airflow.providers.amazon.aws.operators.sagemaker import SageMakerTrainingOperator

from tasks.earlier_jobs import TRAINING, data_read, job_to_follow
from tasks.hooks import stop_when_killed

# The provider's pause between DescribeTrainingJob calls while it tails the job's log (hooks/sagemaker.py).
PROVIDER_DESCRIBE_SECONDS = 30


class TrainingLogHook(SageMakerHook):
    """SageMakerHook whose log-tailing wait describes the job every ``check_interval`` (at most every 30 s)."""

    describe_interval: float = PROVIDER_DESCRIBE_SECONDS

    def check_training_status_with_log(
        self, job_name, non_terminal_states, failed_states, wait_for_completion, check_interval, max_ingestion_time=None
    ):
        self.describe_interval = min(check_interval, PROVIDER_DESCRIBE_SECONDS)
        return super().check_training_status_with_log(
            job_name, non_terminal_states, failed_states, wait_for_completion, check_interval, max_ingestion_time
        )

    def describe_training_job_with_log(
        self, job_name, positions, stream_names, instance_count, state, last_description, last_describe_job_call
    ):
        # The provider describes the job once 30 s have passed since its last call to DescribeTrainingJob: showing
        # it that call earlier by the difference makes it describe every describe_interval.
        shifted = last_describe_job_call - (PROVIDER_DESCRIBE_SECONDS - self.describe_interval)
        state, last_description, called = super().describe_training_job_with_log(
            job_name, positions, stream_names, instance_count, state, last_description, shifted
        )
        return state, last_description, last_describe_job_call if called == shifted else called


class TrainingOperator(SageMakerTrainingOperator):
    """SageMakerTrainingOperator with TrainingLogHook (no 30 s lag), ``on_kill`` and retries that follow the job of
    an earlier try: the same requests, waits and log otherwise."""

    aws_hook_class = TrainingLogHook

    def execute(self, context):
        earlier = job_to_follow(self, TRAINING, self.config["TrainingJobName"], self.same_request)
        if earlier is None:
            return self._ended_well(super().execute(context))
        name = self.config["TrainingJobName"] = earlier["TrainingJobName"]  # what on_kill stops, if killed too
        if earlier["TrainingJobStatus"] != "InProgress":
            return self._ended_well(self.serialize_result(name))
        if self.print_log:
            self.hook.check_training_status_with_log(
                name,
                self.hook.non_terminal_states,
                self.hook.training_failed_states,
                True,
                self.check_interval,
                self.max_ingestion_time,
            )
        else:
            self.hook.check_status(
                name, "TrainingJobStatus", self.hook.describe_training_job, self.check_interval, self.max_ingestion_time
            )
        return self._ended_well(self.serialize_result(name))

    def same_request(self, job: Mapping) -> bool:
        """Whether ``job`` trains what this task's request does: the same hyperparameters (the code's content-addressed
        archive among them) on the same data."""
        hyperparameters, data = job.get("HyperParameters", {}), data_read(job.get("InputDataConfig", []))
        return (hyperparameters, data) == (
            self.config.get("HyperParameters", {}),
            data_read(self.config.get("InputDataConfig", [])),
        )

    def _ended_well(self, result: dict) -> dict:
        # Without print_log the provider's wait counts only Failed as failure: a job Stopped (by StopTrainingJob or
        # past MaxRuntimeInSeconds) would pass on as a trained model.
        training = result["Training"]
        if training["TrainingJobStatus"] in self.hook.training_failed_states:
            reason = training.get("FailureReason") or training.get("SecondaryStatus", "")
            raise RuntimeError(
                f"SageMaker training job {training['TrainingJobName']} ended {training['TrainingJobStatus']}: {reason}"
            )
        return result

    def on_kill(self) -> None:
        name = self.config.get("TrainingJobName")
        stop_when_killed(self, "training job", name, lambda: self.hook.conn.stop_training_job(TrainingJobName=name))
