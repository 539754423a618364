"""The DAG with `search: tune`: one SageMaker hyperparameter tuning job through the provider's operator, against
the local SageMaker service (real training jobs on the small generated digits), then the same selection, gate and
registry as a sweep, and a report that lists every trial with its tuned values, its objective and whether the
tuner stopped it early."""

from __future__ import annotations

import boto3
import pytest

from tests.helpers.dag_runs import SMALL_TUNE, configure, report_text, run_sweep, states, xcoms

# The tuner's choice is registered, not deployed: this file is about the search (test_safe_deploy deploys).
TUNE = {
    **SMALL_TUNE,
    "hidden_channels": [4, 16],
    "optimizer": "adam",
    "epochs": 2,
    "batch_size": 32,
    "endpoint_name": "tuned-local",
}


@pytest.fixture(scope="module")
def tuned(local_sagemaker, local_aws, small_mnist, airflow_db, tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        data = configure(patch, tmp_path_factory.mktemp("tune-local"), small_mnist, "tune-local", local_aws)
        yield run_sweep({**data, **TUNE})


def test_a_tuning_run_searches_selects_and_registers_the_best_trial(tuned, local_sagemaker):
    from tasks.tuning import tuning_job_name

    found = states(tuned)
    assert str(tuned.state) == "success", found
    # The tuner ran instead of the sweep's mapped jobs (none requested); the selection, gate and registry followed.
    assert (found["training_requests"], found["train"]) == (["success"], ["skipped"])
    assert xcoms(tuned.run_id, "training_requests") == [[]]
    for task in ("tune", "select_best", "gate", "register", "candidate", "report"):
        assert found[task] == ["success"], task
    assert found["deploy"] == found["review"] == ["skipped"]

    sagemaker = boto3.client("sagemaker", endpoint_url=local_sagemaker)
    name = tuning_job_name(tuned.run_id)
    assert len(name) <= 32
    [tune] = xcoms(tuned.run_id, "tune")
    assert tune["Tuning"]["HyperParameterTuningJobName"] == name
    tuning = sagemaker.describe_hyper_parameter_tuning_job(HyperParameterTuningJobName=name)
    assert tuning["HyperParameterTuningJobStatus"] == "Completed"
    config = tuning["HyperParameterTuningJobConfig"]
    assert config["Strategy"] == "Random" and config["TrainingJobEarlyStoppingType"] == "Auto"
    assert config["HyperParameterTuningJobObjective"] == {"Type": "Maximize", "MetricName": "test:accuracy"}
    assert config["ParameterRanges"]["CategoricalParameterRanges"] == [
        {"Name": "hidden_channels", "Values": ["4", "16"]}
    ]
    [lr] = config["ParameterRanges"]["ContinuousParameterRanges"]
    assert (lr["Name"], lr["ScalingType"]) == ("lr", "Logarithmic")
    static = tuning["TrainingJobDefinition"]["StaticHyperParameters"]
    assert static["optimizer"] == "adam" and "lr" not in static and "hidden_channels" not in static

    jobs = sagemaker.list_training_jobs_for_hyper_parameter_tuning_job(HyperParameterTuningJobName=name)
    jobs = jobs["TrainingJobSummaries"]
    assert len(jobs) == 2
    for job in jobs:
        described = sagemaker.describe_training_job(TrainingJobName=job["TrainingJobName"])
        assert described["TuningJobArn"] == tuning["HyperParameterTuningJobArn"]
        assert 0.002 <= float(described["HyperParameters"]["lr"]) <= 0.01
        assert described["HyperParameters"]["hidden_channels"] in ("4", "16")

    # The best trial as the tuner judged it is what the pipeline selected, published and registered.
    [best] = xcoms(tuned.run_id, "select_best")
    assert best["tuning_job_name"] == name
    assert best["training_job_name"] == tuning["BestTrainingJob"]["TrainingJobName"]
    assert best["test_accuracy"] == pytest.approx(
        tuning["BestTrainingJob"]["FinalHyperParameterTuningJobObjectiveMetric"]["Value"] / 100
    )
    assert len(best["trials"]) == 2
    for trial in best["trials"]:
        assert set(trial["tuned"]) == {"hidden_channels", "lr"} and trial["status"] in ("Completed", "Stopped")
    [register] = xcoms(tuned.run_id, "register")
    version = sagemaker.describe_model_package(ModelPackageName=register)
    assert version["CustomerMetadataProperties"]["training_job"] == best["training_job_name"]
    assert version["ModelApprovalStatus"] == "PendingManualApproval"  # deploy was off: nothing checked it

    # The report: a row per trial, its tuned values, objective and status.
    report = report_text(tuned.run_id)
    assert report.startswith("# Tuning report") and f"of tuning job `{name}`" in report
    assert "| trial | tuned hyperparameters | objective | status |" in report
    for trial in best["trials"]:
        number = trial["training_job_name"].rsplit("-", 2)[-2]
        [row] = [line for line in report.splitlines() if line.startswith((f"| {number} |", f"| **{number}** |"))]
        assert f"hidden_channels={trial['tuned']['hidden_channels']}, lr={trial['tuned']['lr']}" in row
        assert f"{100 * trial['objective']:.2f}%" in row
        assert ("stopped early" if trial["stopped_early"] else trial["status"]) in row


def test_a_tune_retry_after_its_tuning_job_completed_passes_that_job_on(tuned, local_sagemaker):
    """The try failed after its tuning job completed (its worker lost): the retry's result is that job, as the
    DAG's request names it; no second search starts (tasks.earlier_jobs)."""
    from tasks.earlier_jobs import TIMESTAMP_DIGITS, TUNING
    from tasks.operators import TuningOperator
    from tasks.tuning import tuning_job_name

    name = tuning_job_name(tuned.run_id)
    sagemaker = boto3.client("sagemaker", endpoint_url=local_sagemaker)
    sent = sagemaker.describe_hyper_parameter_tuning_job(HyperParameterTuningJobName=name)
    # The request the DAG's tune task made, as SageMaker recorded it.
    request = {key: sent[key] for key in ("HyperParameterTuningJobName", "HyperParameterTuningJobConfig")}
    request["TrainingJobDefinition"] = sent["TrainingJobDefinition"]
    result = TuningOperator(task_id="tune", config=request, aws_conn_id="aws_default", check_interval=1).execute({})
    assert (result["Tuning"]["HyperParameterTuningJobName"], result["Tuning"]["HyperParameterTuningJobStatus"]) == (
        name,
        "Completed",
    )
    stem = name[: TUNING.max_name - TIMESTAMP_DIGITS - 1]
    listed = sagemaker.list_hyper_parameter_tuning_jobs(NameContains=stem)["HyperParameterTuningJobSummaries"]
    assert [job["HyperParameterTuningJobName"] for job in listed] == [name]


def test_a_tune_retry_follows_the_tuning_job_an_earlier_retry_started_under_its_timestamped_name(
    local_sagemaker, local_aws
):
    """The first try's tuning job was stopped, a retry started another under the name suffixed with the time, and
    was lost too: the next retry follows that one, rather than the first name's, which would search a third time.
    (The stand-in training script of test_service_tuning: seconds a job.)"""
    from tasks.earlier_jobs import TUNING, timestamped
    from tasks.operators import TuningOperator
    from tests.helpers.jobs import put_script
    from tests.test_service_tuning import BUCKET, SCRIPT, operator_request

    s3 = boto3.client("s3", endpoint_url=local_aws)
    s3.create_bucket(Bucket=BUCKET)  # in us-east-1, again is no error: test_service_tuning may have made it
    put_script(s3, BUCKET, "code/sourcedir.tar.gz", SCRIPT)
    sagemaker = boto3.client("sagemaker", endpoint_url=local_sagemaker)
    first, renamed = "tune-retried", timestamped("tune-retried", TUNING, 1700000000)
    sagemaker.create_hyper_parameter_tuning_job(**operator_request(first))
    sagemaker.stop_hyper_parameter_tuning_job(HyperParameterTuningJobName=first)
    sagemaker.create_hyper_parameter_tuning_job(**operator_request(renamed))  # the lost retry's

    retry = TuningOperator(task_id="tune", config=operator_request(first), aws_conn_id="aws_default", check_interval=1)
    result = retry.execute({})["Tuning"]
    assert (result["HyperParameterTuningJobName"], result["HyperParameterTuningJobStatus"]) == (renamed, "Completed")
    listed = sagemaker.list_hyper_parameter_tuning_jobs(NameContains=first)["HyperParameterTuningJobSummaries"]
    assert sorted(job["HyperParameterTuningJobName"] for job in listed) == [first, renamed]
    assert sagemaker.describe_hyper_parameter_tuning_job(HyperParameterTuningJobName=first)[
        "HyperParameterTuningJobStatus"
    ] in ("Stopping", "Stopped")
