"""Hyperparameter tuning jobs on the local SageMaker service, through boto3: real training jobs, real processes.

The training script is a stand-in that prints the project's per-epoch log line with a test accuracy that is a known
function of its hyperparameters (``accuracy``), so each behaviour is asserted exactly. The tuning jobs of the module
are created together, up front (``tuned``): their jobs' one-second Starting waits overlap, and the file runs in
about half the time it would one tuning job after another. Searches that depend on the order jobs end in run one
job at a time (MaxParallelTrainingJobs 1).
"""

from __future__ import annotations

import inspect
import json
import re
import statistics
import textwrap

import boto3
import optuna
import pytest
from botocore.exceptions import ClientError
from optuna.distributions import FloatDistribution, IntDistribution

from local_sagemaker import protocol, tuning, tuning_plan
from tasks.training_jobs import METRIC_DEFINITIONS
from tests.conftest import EXECUTION_ROLE
from tests.helpers.jobs import put_script, s3_channel, training
from tests.helpers.polling import wait_until

BUCKET = "service-tuning"
SEED = 11
OBJECTIVE = {"Type": "Maximize", "MetricName": "test:accuracy"}
LOG_GROUP = "/aws/sagemaker/TrainingJobs"


def accuracy(hp: dict, epoch: int) -> float:
    """The stand-in's test accuracy (percent) after ``epoch`` for hyperparameters ``hp`` (strings, as a job gets
    them): every job gains the same each epoch, so jobs rank alike at every epoch."""
    import math

    score = 50 + 0.5 * epoch + float(hp.get("level", 0))
    if "lr" in hp:
        score += 10 - 5 * abs(math.log10(float(hp["lr"])) + 2)  # best at lr = 0.01
    if "batch" in hp:
        score += math.log2(int(hp["batch"])) / 2
    if "momentum" in hp:
        score += 10 * float(hp["momentum"])
    if "width" in hp:
        score += int(hp["width"]) / 8
    if hp.get("act") == "relu":
        score += 1
    return round(score, 4)


SCRIPT = inspect.getsource(accuracy) + textwrap.dedent(
    """
    import sys, time
    hp = dict(zip((key[2:] for key in sys.argv[1::2]), sys.argv[2::2]))
    for epoch in range(1, int(hp["epochs"]) + 1):
        if "crash" in hp:
            print(f"Traceback: crash {hp['crash']}", flush=True)
            sys.exit(3)
        value = accuracy(hp, epoch)
        print(f"Test Epoch: {epoch}, Test Average loss: {(100 - value) / 1000:.4f}, Test Accuracy: {value:.4f}%; "
              f"({int(value * 100)}/10000) in 0.1 s", flush=True)
        time.sleep(float(hp["pause"]))
    """
)


def request(
    name: str,
    strategy: str,
    ranges: dict,
    *,
    jobs: int | None = None,
    parallel: int = 2,
    epochs: int = 2,
    pause: float = 0.1,
    encoded: bool = False,
    **config,
) -> dict:
    """A CreateHyperParameterTuningJob request for the stand-in; ``config``: more HyperParameterTuningJobConfig;
    ``encoded``: each static hyperparameter JSON-encoded (``"\\"train.py\\""``), as the SDK's framework estimators
    send them and the training toolkit decodes them."""
    limits = {"MaxParallelTrainingJobs": parallel} | ({"MaxNumberOfTrainingJobs": jobs} if jobs else {})
    static = {
        "epochs": str(epochs),
        "pause": str(pause),
        "sagemaker_program": "train.py",
        "sagemaker_submit_directory": f"s3://{BUCKET}/code/sourcedir.tar.gz",
    }
    return {
        "HyperParameterTuningJobName": name,
        "HyperParameterTuningJobConfig": {
            "Strategy": strategy,
            "HyperParameterTuningJobObjective": OBJECTIVE,
            "ResourceLimits": limits,
            "ParameterRanges": ranges,
            "RandomSeed": SEED,
            **config,
        },
        "TrainingJobDefinition": {
            "StaticHyperParameters": {key: json.dumps(value) for key, value in static.items()} if encoded else static,
            "AlgorithmSpecification": {
                "TrainingImage": "stand-in",
                "TrainingInputMode": "File",
                "MetricDefinitions": [dict(d) for d in METRIC_DEFINITIONS],
            },
            "RoleArn": EXECUTION_ROLE,
            "OutputDataConfig": {"S3OutputPath": f"s3://{BUCKET}/jobs"},
            "ResourceConfig": {"InstanceType": "ml.m5.large", "InstanceCount": 1, "VolumeSizeInGB": 1},
            "StoppingCondition": {"MaxRuntimeInSeconds": 120},
        },
    }


def categorical(**values: list[str]) -> dict:
    return {"CategoricalParameterRanges": [{"Name": name, "Values": list(v)} for name, v in values.items()]}


# Random and Bayesian search these, with the same seed: Bayesian's first jobs are Random's (TPE starts at random).
SEARCHED = {
    "IntegerParameterRanges": [{"Name": "batch", "MinValue": "8", "MaxValue": "256", "ScalingType": "Logarithmic"}],
    "ContinuousParameterRanges": [
        {"Name": "lr", "MinValue": "0.0001", "MaxValue": "0.1", "ScalingType": "Logarithmic"},
        {"Name": "momentum", "MinValue": "0.5", "MaxValue": "0.999", "ScalingType": "ReverseLogarithmic"},
    ],
}


def random_draws(count: int) -> list[dict]:
    """What Optuna's RandomSampler, seeded with SEED, draws for SEARCHED: log scales for the Logarithmic ranges, and
    1 - x drawn on a log scale for the ReverseLogarithmic one, in the order the service asks (integer ranges, then
    continuous)."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=SEED))
    distributions = {
        "batch": IntDistribution(8, 256, log=True),
        "lr": FloatDistribution(0.0001, 0.1, log=True),
        "momentum": FloatDistribution(1 - 0.999, 1 - 0.5, log=True),
    }
    draws = []
    for _ in range(count):
        params = study.ask(distributions).params
        draws.append({"batch": str(params["batch"]), "lr": str(params["lr"]), "momentum": str(1 - params["momentum"])})
    return draws


# The stand-in's one searched hyperparameter, ``level``, as a range of reals from 0 to 10 or of integers from 0 to 9.
CONTINUOUS_LEVEL = {"ContinuousParameterRanges": [{"Name": "level", "MinValue": "0", "MaxValue": "10"}]}
INTEGER_LEVEL = {"IntegerParameterRanges": [{"Name": "level", "MinValue": "0", "MaxValue": "9"}]}


def early_stopped(name: str, levels: list[str], epochs: int, pause: float) -> dict:
    """A Grid search over ``levels`` under SageMaker's automatic early stopping, one job at a time: which jobs had
    completed when another was judged is then the order they ran in."""
    return request(
        name,
        "Grid",
        categorical(level=levels),
        parallel=1,
        epochs=epochs,
        pause=pause,
        TrainingJobEarlyStoppingType="Auto",
    )


TUNING_JOBS = {
    "tune-grid": request("tune-grid", "Grid", categorical(width=["8", "16", "32"], act=["relu", "tanh"])),
    "tune-random": request("tune-random", "Random", SEARCHED, jobs=5),
    "tune-bayesian": request("tune-bayesian", "Bayesian", SEARCHED, jobs=5),
    "tune-median": early_stopped("tune-median", ["0", "2", "4", "6", "8"], epochs=3, pause=0.4),
    # Worse and worse, one epoch each: behind the median, yet never stopped at the last epoch (its work is done).
    "tune-last-epoch": early_stopped("tune-last-epoch", ["8", "6", "4", "2", "0"], epochs=1, pause=0),
    "tune-hyperband": request(
        "tune-hyperband",
        "Hyperband",
        CONTINUOUS_LEVEL,
        jobs=6,
        parallel=1,
        epochs=3,
        pause=0.4,
        StrategyConfig={"HyperbandStrategyConfig": {"MinResource": 1}},
        RandomSeed=7,  # Hyperband's random draws follow RandomSeed; 7 gives bracket 0 a job worse than an earlier one.
        encoded=True,  # MaxResource is then the decoded '"3"', the code the decoded sourcedir's
    ),
    # MaxResource below the script's epochs: the job is stopped once it has had them.
    "tune-budget": request(
        "tune-budget",
        "Hyperband",
        INTEGER_LEVEL,
        jobs=1,
        parallel=1,
        epochs=4,
        pause=0.4,
        StrategyConfig={"HyperbandStrategyConfig": {"MinResource": 1, "MaxResource": 2}},
    ),
    "tune-target": request(
        "tune-target",
        "Random",
        CONTINUOUS_LEVEL,
        jobs=8,
        parallel=1,
        TuningJobCompletionCriteria={"TargetObjectiveMetricValue": 58.0},
    ),
    # Equal objectives: after the first job, none improves on it.
    "tune-flat": request(
        "tune-flat",
        "Grid",
        categorical(level=["1", "1.0", "1.00", "1.000", "1.0000", "01"]),
        parallel=1,
        TuningJobCompletionCriteria={"BestObjectiveNotImproving": {"MaxNumberOfTrainingJobsNotImproving": 3}},
    ),
    "tune-crash": request("tune-crash", "Grid", categorical(crash=["1", "2"])),
}


@pytest.fixture(scope="module")
def clients(local_sagemaker, local_aws):
    s3 = boto3.client("s3", endpoint_url=local_aws)
    s3.create_bucket(Bucket=BUCKET)
    put_script(s3, BUCKET, "code/sourcedir.tar.gz", SCRIPT)
    return boto3.client("sagemaker", endpoint_url=local_sagemaker), boto3.client("logs", endpoint_url=local_aws)


@pytest.fixture(scope="module")
def tuned(clients):
    """Every tuning job of TUNING_JOBS, created at once; the tests wait for theirs."""
    sagemaker, _ = clients
    tags = [{"Key": "project", "Value": "tuning-test"}]
    for name, sent in TUNING_JOBS.items():
        arn = sagemaker.create_hyper_parameter_tuning_job(**sent, Tags=tags)["HyperParameterTuningJobArn"]
        assert arn == f"arn:aws:sagemaker:us-east-1:000000000000:hyper-parameter-tuning-job/{name}"
    return sagemaker


def validated(operation: str, answer: dict) -> dict:
    protocol.validate_response(operation, {k: v for k, v in answer.items() if k != "ResponseMetadata"})
    return answer


def wait(sagemaker, name: str, timeout: float = 90) -> dict:
    described = wait_until(
        lambda: sagemaker.describe_hyper_parameter_tuning_job(HyperParameterTuningJobName=name),
        lambda described: described["HyperParameterTuningJobStatus"] in ("Completed", "Failed", "Stopped"),
        timeout=timeout,
        interval=0.3,
    )
    return validated("DescribeHyperParameterTuningJob", described)


def completed_search(sagemaker, name: str) -> tuple[dict, list[dict]]:
    """Tuning job ``name`` described once it has Completed (its FailureReason if it has not), and its training jobs."""
    described = wait(sagemaker, name)
    assert described["HyperParameterTuningJobStatus"] == "Completed", described.get("FailureReason")
    return described, jobs_of(sagemaker, name)


def jobs_of(sagemaker, name: str) -> list[dict]:
    """The tuning job's training jobs, in the order it started them (their names' numbers)."""
    pages = sagemaker.get_paginator("list_training_jobs_for_hyper_parameter_tuning_job").paginate(
        HyperParameterTuningJobName=name
    )
    jobs = []
    for answer in pages:
        jobs += validated("ListTrainingJobsForHyperParameterTuningJob", answer)["TrainingJobSummaries"]
    return sorted(jobs, key=lambda job: int(job["TrainingJobName"].split("-")[-2]))


def objective(job: dict) -> float:
    return job["FinalHyperParameterTuningJobObjectiveMetric"]["Value"]


def epochs_logged(logs, job_name: str) -> int:
    streams = logs.describe_log_streams(logGroupName=LOG_GROUP, logStreamNamePrefix=f"{job_name}/")["logStreams"]
    events = [
        e
        for s in streams
        for e in logs.get_log_events(logGroupName=LOG_GROUP, logStreamName=s["logStreamName"])["events"]
    ]
    return sum("Test Accuracy:" in event["message"] for event in events)


def peak_in_flight(jobs: list[dict]) -> int:
    """The most jobs in flight (created, not yet ended) at any job's creation."""
    return max(sum(o["CreationTime"] <= j["CreationTime"] < o["TrainingEndTime"] for o in jobs) for j in jobs)


def test_grid_runs_each_combination_once_as_ordinary_training_jobs(tuned, clients):
    sagemaker = tuned
    described, jobs = completed_search(sagemaker, "tune-grid")
    assert described["TrainingJobStatusCounters"] == {
        "Completed": 6,
        "InProgress": 0,
        "RetryableError": 0,
        "NonRetryableError": 0,
        "Stopped": 0,
    }
    assert described["ObjectiveStatusCounters"] == {"Succeeded": 6, "Pending": 0, "Failed": 0}
    assert described["HyperParameterTuningEndTime"] > described["CreationTime"]
    assert described["ConsumedResources"]["RuntimeInSeconds"] >= 1
    # The grid, each combination once, with no MaxNumberOfTrainingJobs: as many jobs as combinations.
    assert sorted((j["TunedHyperParameters"]["width"], j["TunedHyperParameters"]["act"]) for j in jobs) == sorted(
        (w, a) for w in ("8", "16", "32") for a in ("relu", "tanh")
    )
    assert [re.fullmatch(r"tune-grid-(\d{3})-[0-9a-f]{8}", j["TrainingJobName"])[1] for j in jobs] == [
        "001",
        "002",
        "003",
        "004",
        "005",
        "006",
    ]
    assert peak_in_flight(jobs) == 2  # MaxParallelTrainingJobs, used and never exceeded
    for job in jobs:
        assert objective(job) == accuracy(job["TunedHyperParameters"], 2) and job["ObjectiveStatus"] == "Succeeded"
        assert job["TuningJobName"] == "tune-grid"
    # An ordinary training job, that names its tuning job; static and tuned hyperparameters as strings.
    first = validated(
        "DescribeTrainingJob", sagemaker.describe_training_job(TrainingJobName=jobs[0]["TrainingJobName"])
    )
    assert first["TuningJobArn"] == described["HyperParameterTuningJobArn"]
    static = TUNING_JOBS["tune-grid"]["TrainingJobDefinition"]["StaticHyperParameters"]
    assert first["HyperParameters"] == {**static, **jobs[0]["TunedHyperParameters"]}
    assert {m["MetricName"]: m["Value"] for m in first["FinalMetricDataList"]}["test:accuracy"] == objective(jobs[0])
    assert sagemaker.list_tags(ResourceArn=first["TrainingJobArn"])["Tags"] == [
        {"Key": "project", "Value": "tuning-test"}
    ]
    # The best: the highest accuracy, width 32 with relu.
    best = described["BestTrainingJob"]
    assert best["TunedHyperParameters"] == {"width": "32", "act": "relu"}
    assert best["FinalHyperParameterTuningJobObjectiveMetric"] == {**OBJECTIVE, "Value": max(map(objective, jobs))}

    by_value = sagemaker.get_paginator("list_training_jobs_for_hyper_parameter_tuning_job").paginate(
        HyperParameterTuningJobName="tune-grid",
        SortBy="FinalObjectiveMetricValue",
        SortOrder="Descending",
        PaginationConfig={"PageSize": 4},
    )
    values = [objective(j) for answer in by_value for j in answer["TrainingJobSummaries"]]
    assert values == sorted(map(objective, jobs), reverse=True)
    failed = sagemaker.list_training_jobs_for_hyper_parameter_tuning_job(
        HyperParameterTuningJobName="tune-grid", StatusEquals="Failed"
    )
    assert failed["TrainingJobSummaries"] == []
    listed = validated("ListHyperParameterTuningJobs", sagemaker.list_hyper_parameter_tuning_jobs(NameContains="grid"))
    [summary] = listed["HyperParameterTuningJobSummaries"]
    assert (summary["HyperParameterTuningJobName"], summary["Strategy"]) == ("tune-grid", "Grid")
    assert summary["TrainingJobStatusCounters"]["Completed"] == 6


def test_random_draws_in_range_on_the_scales_asked(tuned):
    _, jobs = completed_search(tuned, "tune-random")
    tuned_values = [job["TunedHyperParameters"] for job in jobs]
    for values in tuned_values:
        assert 8 <= int(values["batch"]) <= 256 and 0.0001 <= float(values["lr"]) <= 0.1
        assert 0.5 <= float(values["momentum"]) <= 0.999
    # Exactly Optuna's seeded RandomSampler on log scales (a linear draw would differ): reproducible by RandomSeed.
    assert tuned_values == random_draws(5)
    assert peak_in_flight(jobs) <= 2


def test_bayesian_starts_as_random_then_models(tuned):
    """TPE's first jobs are its seeded random sampler's, the same draws as the Random strategy's with the same seed;
    so its best objective is at least the best of those jobs: a bound fixed by the seed alone."""
    described, jobs = completed_search(tuned, "tune-bayesian")
    assert len(jobs) == 5
    startup = tuning_plan.tpe_startup(5)
    draws = random_draws(startup)
    assert [job["TunedHyperParameters"] for job in jobs[:startup]] == draws
    for job in jobs:
        values = job["TunedHyperParameters"]
        assert 8 <= int(values["batch"]) <= 256 and 0.0001 <= float(values["lr"]) <= 0.1
        assert 0.5 <= float(values["momentum"]) <= 0.999
    best = objective(described["BestTrainingJob"])
    assert best == max(map(objective, jobs))
    assert best >= max(accuracy(draw, 2) for draw in draws)


def test_early_stopping_stops_the_jobs_behind_the_median_and_no_others(tuned, clients):
    _, logs = clients
    described, jobs = completed_search(tuned, "tune-median")
    assert len(jobs) == 5
    # The rule, from the order the jobs ran in: once MEDIAN_STARTUP_JOBS have completed, a job whose accuracy is below
    # the median of the completed jobs' at the same epoch is stopped (all gain alike per epoch: epoch 1 decides).
    completed, expected = [], []
    for job in jobs:
        value = accuracy(job["TunedHyperParameters"], 1)
        behind = len(completed) >= tuning_plan.MEDIAN_STARTUP_JOBS and value < statistics.median(completed)
        expected.append("Stopped" if behind else "Completed")
        if not behind:
            completed.append(value)
    assert [job["TrainingJobStatus"] for job in jobs] == expected
    assert "Stopped" in expected and expected[tuning_plan.MEDIAN_STARTUP_JOBS :].count("Completed") >= 1, (
        "the seed should give both outcomes among the judged jobs"
    )
    for job in jobs:
        assert job["ObjectiveStatus"] == "Succeeded"  # a job stopped early still gave its objective
        if job["TrainingJobStatus"] == "Stopped":
            assert epochs_logged(logs, job["TrainingJobName"]) < 3  # stopped through StopTrainingJob's path
    counters = described["TrainingJobStatusCounters"]
    assert (counters["Completed"], counters["Stopped"]) == (expected.count("Completed"), expected.count("Stopped"))
    assert described["BestTrainingJob"]["TunedHyperParameters"] == {"level": "8"}


def test_early_stopping_never_stops_a_job_at_its_last_epoch(tuned):
    _, jobs = completed_search(tuned, "tune-last-epoch")
    # Some jobs fall behind the median of the ones completed before them at their first epoch, which is their last.
    # RandomSeed fixes the grid's order, so the values are recomputed from the jobs rather than listed here.
    values = [accuracy(job["TunedHyperParameters"], 1) for job in jobs]
    behind = [i >= tuning_plan.MEDIAN_STARTUP_JOBS and v < statistics.median(values[:i]) for i, v in enumerate(values)]
    assert any(behind), values
    assert [job["TrainingJobStatus"] for job in jobs] == ["Completed"] * 5


def hyperband_stops(jobs: list[dict]) -> list[bool]:
    """Which of ``jobs`` (run one at a time, in this order) Optuna's HyperbandPruner stops before MaxResource, for
    the tuning job's study (its name places each job in a bracket) and the stand-in's accuracy at each epoch."""
    pruner = optuna.pruners.HyperbandPruner(
        min_resource=1, max_resource=3, reduction_factor=tuning_plan.HYPERBAND_REDUCTION
    )
    study = optuna.create_study(study_name="tune-hyperband", direction="maximize", pruner=pruner)
    stops = []
    for job in jobs:
        trial, hp = study.ask(), job["TunedHyperParameters"]
        for epoch in (1, 2):  # never judged at MaxResource: the job is done
            trial.report(accuracy(hp, epoch), epoch)
            if trial.should_prune():
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                break
        else:
            trial.report(accuracy(hp, 3), 3)
            study.tell(trial, accuracy(hp, 3))
        stops.append(study.trials[-1].state == optuna.trial.TrialState.PRUNED)
    return stops


def test_hyperband_stops_some_jobs_before_max_resource(tuned, clients):
    """MaxResource is the static epochs (3); MinResource 1: the weaker jobs of bracket 0 are stopped at epoch 1."""
    _, logs = clients
    described, jobs = completed_search(tuned, "tune-hyperband")
    assert len(jobs) == 6
    stopped = [job for job in jobs if job["TrainingJobStatus"] == "Stopped"]
    assert [job in stopped for job in jobs] == hyperband_stops(jobs)
    assert stopped, "the seed should give a job that Hyperband stops"
    for job in jobs:
        logged = epochs_logged(logs, job["TrainingJobName"])
        assert logged < 3 if job in stopped else logged == 3
    best = described["BestTrainingJob"]
    assert best["TrainingJobStatus"] == "Completed"
    assert objective(best) == max(objective(j) for j in jobs if j["TrainingJobStatus"] == "Completed")
    assert peak_in_flight(jobs) == 1


def test_hyperband_ends_a_job_at_max_resource_as_its_full_budget(tuned, clients):
    _, logs = clients
    described, [job] = completed_search(tuned, "tune-budget")
    assert (job["TrainingJobStatus"], job["ObjectiveStatus"]) == ("Stopped", "Succeeded")
    assert epochs_logged(logs, job["TrainingJobName"]) < 4
    assert objective(job) == accuracy(job["TunedHyperParameters"], 2)  # its objective at MaxResource
    assert described["BestTrainingJob"]["TrainingJobName"] == job["TrainingJobName"]


def test_a_target_reached_completes_the_tuning_job_with_fewer_jobs(tuned):
    described, jobs = completed_search(tuned, "tune-target")
    reached = [objective(job) >= 58.0 for job in jobs]
    assert reached[-1] and not any(reached[:-1])  # one job at a time: it ended with the first to reach the target
    assert len(jobs) < 8, "the seed should reach the target before the last job"
    assert objective(described["BestTrainingJob"]) >= 58.0


def test_jobs_that_do_not_improve_complete_the_tuning_job(tuned):
    described, jobs = completed_search(tuned, "tune-flat")
    assert len(jobs) == 4  # the first, then three that did not improve on it
    assert described["TuningJobCompletionDetails"]["NumberOfTrainingJobsObjectiveNotImproving"] == 3


def test_a_tuning_job_whose_jobs_all_fail_fails_naming_one(tuned):
    described = wait(tuned, "tune-crash")
    assert described["HyperParameterTuningJobStatus"] == "Failed"
    assert re.match(
        r"No training job completed: tune-crash-00\d-[0-9a-f]{8} failed: AlgorithmError: exit code 3",
        described["FailureReason"],
    ), described["FailureReason"]
    assert described["TrainingJobStatusCounters"]["NonRetryableError"] == 2
    assert described["ObjectiveStatusCounters"] == {"Succeeded": 0, "Pending": 0, "Failed": 2}
    assert "BestTrainingJob" not in described


def test_stop_stops_the_running_jobs_and_their_processes(tuned, clients):
    import psutil

    sagemaker, _ = clients
    sent = request(
        "tune-stop",
        "Random",
        INTEGER_LEVEL,
        jobs=6,
        epochs=100,
        pause=1,
    )
    sagemaker.create_hyper_parameter_tuning_job(**sent)
    wait_until(
        lambda: jobs_of(sagemaker, "tune-stop"),
        lambda jobs: len(jobs) >= 2 and all(training(sagemaker, j["TrainingJobName"]) for j in jobs),
        timeout=60,
    )
    sagemaker.stop_hyper_parameter_tuning_job(HyperParameterTuningJobName="tune-stop")
    status = sagemaker.describe_hyper_parameter_tuning_job(HyperParameterTuningJobName="tune-stop")
    assert status["HyperParameterTuningJobStatus"] in ("Stopping", "Stopped")
    described = wait(sagemaker, "tune-stop", timeout=30)
    assert described["HyperParameterTuningJobStatus"] == "Stopped"
    jobs = jobs_of(sagemaker, "tune-stop")
    assert [job["TrainingJobStatus"] for job in jobs] == ["Stopped", "Stopped"]  # and no more started
    assert [job["ObjectiveStatus"] for job in jobs] == ["Failed", "Failed"]  # not evaluated: stopped by the user
    left = [
        p
        for p in psutil.process_iter(["cwd"])
        for j in jobs
        if f"/job-dirs/{j['TrainingJobName']}/" in f"{p.info['cwd']}/"
    ]
    assert left == []
    with pytest.raises(ClientError, match="in status Stopped"):
        sagemaker.stop_hyper_parameter_tuning_job(HyperParameterTuningJobName="tune-stop")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda r: r["HyperParameterTuningJobConfig"]["ParameterRanges"].update(
                ContinuousParameterRanges=[{"Name": "lr", "MinValue": "0.001", "MaxValue": "0.1"}]
            ),
            "The Grid strategy searches categorical ranges only; lr is a numeric range",
        ),
        (
            lambda r: r["HyperParameterTuningJobConfig"].update(
                HyperParameterTuningJobObjective={"Type": "Maximize", "MetricName": "validation:accuracy"}
            ),
            "The objective metric validation:accuracy is not one of the MetricDefinitions",
        ),
        (
            lambda r: r["HyperParameterTuningJobConfig"].update(
                Strategy="Random",
                ParameterRanges={
                    "ContinuousParameterRanges": [
                        {"Name": "dropout", "MinValue": "0", "MaxValue": "0.5", "ScalingType": "Logarithmic"}
                    ]
                },
            ),
            "ContinuousParameterRange dropout: Logarithmic scaling works only for ranges of values greater than 0",
        ),
        (
            lambda r: r["HyperParameterTuningJobConfig"].update(Strategy="Random"),
            "ResourceLimits.MaxNumberOfTrainingJobs is required with the Random strategy",
        ),
        (
            lambda r: r["HyperParameterTuningJobConfig"].update(
                Strategy="Hyperband",
                TrainingJobEarlyStoppingType="Auto",
                ResourceLimits={"MaxNumberOfTrainingJobs": 4, "MaxParallelTrainingJobs": 2},
            ),
            "TrainingJobEarlyStoppingType must be Off with the Hyperband strategy",
        ),
        (
            lambda r: r.update(
                WarmStartConfig={
                    "ParentHyperParameterTuningJobs": [{"HyperParameterTuningJobName": "x"}],
                    "WarmStartType": "TransferLearning",
                }
            ),
            "WarmStartConfig is not supported by this local SageMaker service",
        ),
        (
            lambda r: r["TrainingJobDefinition"]["StaticHyperParameters"].update(width="8"),
            "width: a hyperparameter is either static or tuned, not both",
        ),
    ],
    ids=[
        "grid-continuous",
        "objective-not-defined",
        "log-over-zero",
        "random-unbounded",
        "hyperband-early-stopping",
        "warm-start",
        "static-and-tuned",
    ],
)
def test_requests_refused_with_what_is_wrong(clients, change, message):
    sagemaker, _ = clients
    sent = request("tune-refused", "Grid", categorical(width=["8", "16"]))
    change(sent)
    with pytest.raises(ClientError) as caught:
        sagemaker.create_hyper_parameter_tuning_job(**sent)
    assert caught.value.response["Error"]["Code"] == "ValidationException"
    assert message in caught.value.response["Error"]["Message"]
    with pytest.raises(ClientError) as caught:
        sagemaker.describe_hyper_parameter_tuning_job(HyperParameterTuningJobName="tune-refused")
    assert caught.value.response["Error"]["Code"] == "ResourceNotFound"


def test_completion_rules():
    """NumberOfTrainingJobsObjectiveNotImproving, convergence and the target, over (objective, final) in end order."""
    assert tuning.not_improving([(90, True), (90.5, True), (92, True), (50, False), (91, True)], True) == 2
    assert tuning.not_improving([(0.5, True), (0.4, True), (0.398, True)], False) == 1  # minimized, < 1% better
    assert tuning.not_improving([(50, False), (60, False)], True) == 2  # stopped early: never an improvement
    assert tuning.converged([(80, True), (90, True), (89.5, True), (90.2, True)], True)
    assert not tuning.converged([(90, True), (89.5, True), (80, True)], True)
    assert not tuning.converged([(90, True), (90, True)], True)  # fewer than CONVERGENCE_JOBS
    assert tuning.reached([(57, True), (58, True)], True, 58) and not tuning.reached([(59, False)], True, 58)
    assert tuning.reached([(0.1, True)], False, 0.2)


def test_a_tuning_job_running_when_the_service_stopped_fails_on_restart(tmp_path):
    """Its training jobs went with the service; the records stay, the tuning job Failed with the reason."""
    from local_sagemaker.roles import Roles
    from local_sagemaker.store import Store, now
    from local_sagemaker.training import TrainingJobs

    store = Store(tmp_path)
    record = {
        **request("tune-restart", "Grid", categorical(width=["8", "16"])),
        "Tags": [],
        "HyperParameterTuningJobArn": "arn:aws:sagemaker:us-east-1:000000000000:hyper-parameter-tuning-job/x",
        "HyperParameterTuningJobStatus": "InProgress",
        "CreationTime": now(),
        "LastModifiedTime": now(),
        "TuningJobCompletionDetails": {"NumberOfTrainingJobsObjectiveNotImproving": 0},
        "Jobs": {"tune-restart-001-0a1b2c3d": {"TunedHyperParameters": {"width": "8"}, "ObjectiveStatus": "Pending"}},
    }
    store.put(tuning.KIND, "tune-restart", record)
    reopened = Store(tmp_path)  # as the service's next start reads it
    training = TrainingJobs(
        reopened,
        tmp_path,
        1,
        "us-east-1",
        "0" * 12,
        roles=Roles("us-east-1", "0" * 12),
        service_url="http://127.0.0.1:9",
    )
    restarted = tuning.TuningJobs(reopened, training, "us-east-1", "0" * 12)
    described = validated("DescribeHyperParameterTuningJob", restarted.describe("tune-restart"))
    assert described["HyperParameterTuningJobStatus"] == "Failed"
    assert described["FailureReason"].startswith("InternalServerError: the local SageMaker service stopped")
    assert "HyperParameterTuningEndTime" in described
    kept = reopened.get(tuning.KIND, "tune-restart")["Jobs"]["tune-restart-001-0a1b2c3d"]
    assert kept["ObjectiveStatus"] == "Failed"


# -- the pipeline's TuningOperator (the provider's, made safe to kill and to retry) against the service --------------


def operator_request(name: str, **kwargs) -> dict:
    """``request`` with the training channel the provider's operator checks in S3 before it creates the job."""
    sent = request(
        name,
        "Random",
        INTEGER_LEVEL,
        jobs=2,
        **kwargs,
    )
    sent["TrainingJobDefinition"]["InputDataConfig"] = [s3_channel("training", f"s3://{BUCKET}/code/")]
    return sent


def operator(sent: dict):
    """The pipeline's TuningOperator for ``sent``, checking every second."""
    from tasks.operators import TuningOperator

    return TuningOperator(task_id="tune", config=sent, aws_conn_id="aws_default", check_interval=1)


def test_the_tuning_operator_follows_an_earlier_try(tuned, clients):
    sagemaker, _ = clients
    # A retry while its predecessor's tuning job still runs: it follows that job, it starts no other.
    sent = operator_request("op-follow")
    sagemaker.create_hyper_parameter_tuning_job(**sent)
    result = operator(operator_request("op-follow")).execute({})["Tuning"]
    assert (result["HyperParameterTuningJobName"], result["HyperParameterTuningJobStatus"]) == (
        "op-follow",
        "Completed",
    )
    assert len(jobs_of(sagemaker, "op-follow")) == 2


def test_the_tuning_operator_retunes_a_stopped_one(tuned, clients):
    sagemaker, _ = clients
    # A retry after its predecessor's job was stopped (the task killed: its on_kill): tuned again, under a new name.
    sagemaker.create_hyper_parameter_tuning_job(**operator_request("op-stopped", epochs=100, pause=1))
    operator(operator_request("op-stopped")).on_kill()
    assert wait(sagemaker, "op-stopped")["HyperParameterTuningJobStatus"] == "Stopped"
    operator(operator_request("op-stopped")).on_kill()  # a second kill of an ended job is harmless
    again = operator(operator_request("op-stopped")).execute({})["Tuning"]
    assert re.fullmatch(r"op-stopped-\d{10}", again["HyperParameterTuningJobName"])
    assert again["HyperParameterTuningJobStatus"] == "Completed"


def test_the_tuning_operator_fails_when_stopped(tuned, clients):
    import threading

    sagemaker, _ = clients
    # Stopped by someone while the task waits: the task fails, its half search is not passed on.
    slow = operator(operator_request("op-interrupted", epochs=100, pause=1))
    failure = []

    def execute() -> None:
        try:
            slow.execute({})
        except RuntimeError as error:
            failure.append(error)

    waiting = threading.Thread(target=execute)
    waiting.start()
    wait_until(
        lambda: sagemaker.list_hyper_parameter_tuning_jobs(NameContains="op-interrupted")[
            "HyperParameterTuningJobSummaries"
        ],
        timeout=60,
    )
    sagemaker.stop_hyper_parameter_tuning_job(HyperParameterTuningJobName="op-interrupted")
    waiting.join(timeout=60)
    [raised] = failure
    assert "tuning job op-interrupted was stopped before it ended" in str(raised)
