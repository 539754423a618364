"""Where the pipeline changes the providers' operators: each subclass, and what it changes. Everything else is the
providers' own code, so a run on AWS and one on the local SageMaker service send the same requests.

- ``TrainingOperator`` (SageMakerTrainingOperator): safe to kill and to retry, and reading the job's status every
  ``check_interval`` as it streams the log.
- ``TuningOperator`` (SageMakerTuningOperator): safe to kill and to retry.
- ``TransformOperator`` (SageMakerTransformOperator): safe to kill and to retry (the batch predictions).
- ``RegisterModelVersionOperator`` (SageMakerRegisterModelVersionOperator): registers what the gate let through,
  its request built from the run's selection as it runs.
- ``ReviewOperator`` (the standard provider's HITLOperator): a person approves or rejects the version with approval
  `manual` (tasks/review.py writes the request and records the answer).

Imported by the DAG at parse time: the providers' operators and light modules only.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping

from airflow.providers.amazon.aws.hooks.sagemaker import SageMakerHook
from airflow.providers.amazon.aws.operators.sagemaker import (
    SageMakerRegisterModelVersionOperator,
    SageMakerTrainingOperator,
    SageMakerTransformOperator,
    SageMakerTuningOperator,
    serialize,
)
from airflow.providers.standard.operators.hitl import HITLOperator
from airflow.sdk import Param
from airflow.sdk.configuration import conf
from airflow.sdk.definitions.param import ParamsDict
from airflow.sdk.exceptions import AirflowSkipException
from airflow.sdk.timezone import utcnow

from tasks import registry
from tasks.dag_tasks import config_of
from tasks.earlier_jobs import TRAINING, TRANSFORM, TUNING, data_read, job_to_follow, timestamped
from tasks.hooks import stop_when_killed
from tasks.names import DAG_ID
from tasks.policy import DEFAULT_TIMEOUT_MINUTES
from tasks.report import build_report
from tasks.review import APPROVE, COMMENT, REJECT, minutes, outcome, report_link, request_text, version_metadata
from tasks.search import tuning_job

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
    an earlier try: the same requests, waits and log otherwise.

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


class TuningOperator(SageMakerTuningOperator):
    """SageMakerTuningOperator made safe to kill and to retry:

    - killed (marked failed, timed out), it stops its tuning job, where the provider's leaves it running;
    - a retry follows the tuning job of its request an earlier try started (``tasks.earlier_jobs``, as training and
      transform do), under the request's name or the name suffixed with the time that an earlier retry took: one
      InProgress is followed to its end, one Completed is the result, one Stopping is waited out; only when each
      ended Stopped or Failed is the search started again, under the name suffixed with the time (the provider's
      operator would fail on the name taken). A tuning job of the same name whose training jobs run other code or
      read other data is not this request's;
    - a tuning job that ends Stopped fails the task (the provider's wait passes it on, its jobs half done).
    - in the DAG it is given the run's ``settings`` and ``dataset_uri`` instead of a request: it makes the request
      from the run's form as it runs (``tasks.search.tuning_job``), and is skipped when the form's search is
      `sweep`.
    """

    template_fields = (*SageMakerTuningOperator.template_fields, "settings", "dataset_uri")

    def __init__(self, *, config: dict | None = None, settings=None, dataset_uri=None, **kwargs):
        super().__init__(config=config or {}, **kwargs)
        self.settings, self.dataset_uri = settings, dataset_uri

    def execute(self, context):
        if not self.config:  # the DAG's: the request is the run's form's
            params, dag_run = context["params"], context["dag_run"]
            if params["search"] != "tune":
                raise AirflowSkipException("The form's search is sweep: its training jobs run in the train task")
            self.config = tuning_job(
                params,
                config=config_of(self.settings),
                dag_id=dag_run.dag_id,
                run_id=dag_run.run_id,
                dataset_uri=self.dataset_uri,
            )
        name = self.config["HyperParameterTuningJobName"]
        earlier = job_to_follow(self, TUNING, name, self.same_request)
        if earlier is None:
            if self.name_taken(name):
                self.config["HyperParameterTuningJobName"] = timestamped(name, TUNING)
                self.log.info("Tuning as %s: %s is taken", self.config["HyperParameterTuningJobName"], name)
            return self._ended_well(super().execute(context))
        name = self.config["HyperParameterTuningJobName"] = earlier["HyperParameterTuningJobName"]  # for on_kill
        if earlier["HyperParameterTuningJobStatus"] == "InProgress":
            earlier = self.hook.check_status(
                name,
                "HyperParameterTuningJobStatus",
                self.hook.describe_tuning_job,
                self.check_interval,
                self.max_ingestion_time,
            )
        return self._ended_well({"Tuning": serialize(earlier)})

    def same_request(self, job: Mapping) -> bool:
        """Whether ``job`` runs the training jobs of this task's request: the same static hyperparameters (the code's
        content-addressed archive among them) on the same data. Its ranges come from the run's params, and so does its
        name."""

        def trains(request: Mapping) -> tuple:
            definition = request["TrainingJobDefinition"]
            return definition.get("StaticHyperParameters", {}), data_read(definition.get("InputDataConfig", []))

        return trains(job) == trains(self.config)

    def name_taken(self, name: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.hook.describe_tuning_job(name)
        except ClientError as error:
            if error.response["Error"]["Code"] == "ResourceNotFound":
                return False
            raise
        return True

    @staticmethod
    def _ended_well(result: dict) -> dict:
        tuning = result["Tuning"]
        if tuning.get("HyperParameterTuningJobStatus") == "Stopped":
            raise RuntimeError(
                f"SageMaker tuning job {tuning['HyperParameterTuningJobName']} was stopped before it "
                "ended: its trials are not a finished search"
            )
        return result

    def on_kill(self) -> None:
        name = self.config.get("HyperParameterTuningJobName")
        stop_when_killed(
            self,
            "tuning job",
            name,
            lambda: self.hook.conn.stop_hyper_parameter_tuning_job(HyperParameterTuningJobName=name),
        )


class TransformOperator(SageMakerTransformOperator):
    """SageMakerTransformOperator made safe to kill and to retry:

    - killed (marked failed, timed out, cleared), it stops its transform job, where the provider's leaves it running;
    - a retry follows the transform job of its request an earlier try started (``tasks.earlier_jobs``, as training
      and tuning do), under the request's name or the provider's timestamped variants of it
      (``action_if_job_exists="timestamp"``): one InProgress is waited for and one that Completed is the result,
      rather than a second job predicting the same files; one that is Stopping is waited out; only when they all
      ended Failed or Stopped does the provider start another. A job of the same name that runs another model is
      not this request's (e.g. after the champion changed);
    - a job that ends Stopped fails the task (the provider's wait counts only Failed as failure).
    """

    def execute(self, context):
        transform = self.config.get("Transform", self.config)
        earlier = job_to_follow(
            self, TRANSFORM, transform["TransformJobName"], lambda job: job["ModelName"] == transform["ModelName"]
        )
        if earlier is None:
            return self._ended_well(super().execute(context))
        name = transform["TransformJobName"] = earlier["TransformJobName"]  # what on_kill stops, if killed too
        if earlier["TransformJobStatus"] == "InProgress":
            self.hook.check_status(
                name,
                "TransformJobStatus",
                self.hook.describe_transform_job,
                self.check_interval,
                self.max_ingestion_time,
            )
        return self._ended_well(self.serialize_result(name))

    def execute_complete(self, context, event=None):
        return self._ended_well(super().execute_complete(context, event))

    @staticmethod
    def _ended_well(result: dict) -> dict:
        transform = result["Transform"]
        if transform["TransformJobStatus"] != "Completed":
            raise RuntimeError(
                f"SageMaker transform job {transform['TransformJobName']} ended "
                f"{transform['TransformJobStatus']}: {transform.get('FailureReason', '')}"
            )
        return result

    def on_kill(self) -> None:
        name = self.config.get("Transform", self.config).get("TransformJobName")
        stop_when_killed(self, "transform job", name, lambda: self.hook.conn.stop_transform_job(TransformJobName=name))


class RegisterModelVersionOperator(SageMakerRegisterModelVersionOperator):
    """The provider's operator, registering the model the gate let through (``gate``, the gate's decision): its
    request (``tasks.registry.registration``: the container, the model's quality statistics and metadata) is built
    from the run's selection ``best`` as the task runs. A model the gate refused is not registered: the task is
    skipped, saying why."""

    template_fields = (
        *SageMakerRegisterModelVersionOperator.template_fields,
        "settings",
        "best",
        "gate",
        "dataset_uri",
    )

    def __init__(self, *, settings, best, gate, dataset_uri, **kwargs):
        # The image, the model and the rest of the request are the selection's, known only as the task runs.
        super().__init__(image_uri="", model_url="", **kwargs)
        self.settings, self.best, self.gate, self.dataset_uri = settings, best, gate, dataset_uri

    def execute(self, context):
        if not self.gate["deploy"]:
            raise AirflowSkipException(f"Not registered: the gate refused the model ({self.gate['reason']})")
        request = registry.registration(self.best, self.dataset_uri, context["run_id"], config_of(self.settings))
        self.image_uri, self.model_url, self.extras = request["image_uri"], request["model_url"], request["extras"]
        return super().execute(context)


class ReviewOperator(HITLOperator):
    """Asks a person to approve or reject the version this run registered (``model_package_arn``), records the
    answer on the version, and returns what happened (``outcome``). ``best``, ``validation`` and ``gate`` are the
    run's, for the report the request links to: written before the request, rewritten when the run ends."""

    template_fields = (*HITLOperator.template_fields, "settings", "model_package_arn", "best", "validation", "gate")

    def __init__(self, *, settings, model_package_arn, best, validation, gate, params=None, **kwargs):
        # Airflow hands every task the DAG's params; the request's form is the provider's pick of the task's own.
        form = params if isinstance(params, ParamsDict) else ParamsDict(params or {})
        form[COMMENT] = Param(
            None,
            source="task",
            type=["null", "string"],
            title="Comment",
            description="Why you approve or reject this version: recorded on it in the model registry "
            "(ApprovalDescription), with your name and the time.",
        )
        super().__init__(
            subject="Approve the version this run registered?",  # the request's own is written as it is made
            options=[APPROVE, REJECT],
            params=form,
            # The form's approval_timeout replaces this as the request is made.
            response_timeout=datetime.timedelta(minutes=DEFAULT_TIMEOUT_MINUTES),
            **kwargs,
        )
        self.settings, self.model_package_arn = settings, model_package_arn
        self.best, self.validation, self.gate = best, validation, gate
        self.request: dict = {}  # what the notifiers tell of the request (tasks.notifications)

    def _config(self):
        return config_of(self.settings)

    def execute(self, context):
        config, params, run_id = self._config(), context["params"], context["run_id"]
        if params["approval"] != "manual":
            raise AirflowSkipException("Approval auto: the monitoring check decides, no person is asked")
        candidate = registry.describe(config, self.model_package_arn)
        number = candidate["ModelPackageVersion"]
        if candidate["ModelApprovalStatus"] != registry.PENDING:
            # Decided already, outside the UI or by an earlier try of this task: asking again would only confuse.
            return outcome(
                candidate,
                summary=f"Version {number} was {candidate['ModelApprovalStatus']} before the "
                f"request was made: {candidate.get('ApprovalDescription') or 'no description'}.",
            )
        current = registry.champion(config, params["endpoint_name"])
        champion = registry.describe(config, current["model_package_arn"]) if current else None
        self.response_timeout = datetime.timedelta(minutes=params["approval_timeout"])
        deadline = utcnow() + self.response_timeout
        link = report_link(run_id, conf.get("api", "base_url", fallback="") or "")
        self.subject, self.body = request_text(
            candidate,
            champion,
            (self.best or {}).get("hyperparameters") or {},
            params,
            run_id=run_id,
            link=link,
            deadline=deadline,
        )
        waiting = outcome(
            candidate,
            waiting=True,
            deadline=deadline.isoformat(),
            summary=(
                f"Version {number} waits for a reviewer in the Airflow UI (Browse → Required Actions, or this run's "
                f"`review` task) until {deadline:%Y-%m-%d %H:%M} UTC; this report is written again when the run "
                "ends."
            ),
        )
        # The report the request links to, there before anyone opens it; the run's last task writes it again.
        build_report(run_id, self.best, validation=self.validation, gate=self.gate, approval=waiting, config=config)
        self.request = {
            **waiting,
            "subject": self.subject,
            "endpoint_name": params["endpoint_name"],
            "test_accuracy": version_metadata(candidate)["test_accuracy"],
            "champion_accuracy": version_metadata(champion)["test_accuracy"] if champion else None,
        }
        return super().execute(context)

    def execute_complete(self, context, event: dict):
        config, run_id = self._config(), context["run_id"]
        if event.get("error_type") == "timeout":
            candidate = registry.describe(config, self.model_package_arn)
            number, status = candidate["ModelPackageVersion"], candidate["ModelApprovalStatus"]
            waited = minutes(context["params"]["approval_timeout"])
            if status != registry.PENDING:  # decided meanwhile outside the UI (the command line, AWS's console)
                return outcome(
                    candidate,
                    summary=f"No answer in the Airflow UI within {waited}; meanwhile version "
                    f"{number} was {status}: {candidate.get('ApprovalDescription') or ''}.",
                )
            timed_out = outcome(
                candidate,
                timed_out=True,
                summary=(
                    f"No answer within {waited} (approval_timeout): version {number} stays PendingManualApproval and "
                    f"is not deployed; `mnist-pipeline approve {number}` and a deploy-only run can serve it."
                ),
            )
            context["ti"].xcom_push("return_value", timed_out)  # for the report: the task ends skipped
            raise AirflowSkipException(timed_out["summary"])
        answered = super().execute_complete(context, event)  # the provider's checks of the answer
        answer = answered["chosen_options"][0]
        comment = " ".join(str(answered["params_input"].get(COMMENT) or "").split())
        who = (answered.get("responded_by_user") or {}).get("name") or "an unknown user"
        when = answered["responded_at"].astimezone(datetime.UTC)
        status = registry.APPROVED if answer == APPROVE else registry.REJECTED
        said = f": {comment}" if comment else " (no comment)"
        description = (
            f"{status} by {who} in the Airflow UI at {when:%Y-%m-%d %H:%M:%S} UTC ({DAG_ID} run {run_id}){said}"
        )
        registry.set_approval(config, self.model_package_arn, status, description)
        return outcome(
            registry.describe(config, self.model_package_arn),
            answer=answer,
            by=who,
            at=when.isoformat(),
            comment=comment,
            summary=description,
        )
