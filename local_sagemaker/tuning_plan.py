"""How a CreateHyperParameterTuningJob request becomes an Optuna search: its ranges, strategy, sampler and pruner,
and how many jobs it runs, how many at once; checked, with a ValidationException naming what is wrong or what this
service does not do. Pure: the tuning job that runs the search is local_sagemaker.tuning's.

- Grid: GridSampler. Categorical ranges only; each combination once, in an order the seed fixes; as many jobs as
  the grid has combinations, or MaxNumberOfTrainingJobs if fewer.
- Random: RandomSampler.
- Bayesian: TPESampler, its first jobs random (``tpe_startup``), then modelled; constant liar (Optuna's default) so
  that jobs asked for while others run spread out instead of repeating the same guess.
- Hyperband: RandomSampler (Hyperband's own random search) with HyperbandPruner over epochs, from MinResource
  (default 1) to MaxResource (default: the static ``epochs`` hyperparameter, or ``num_epochs``... as SageMaker infers
  it). A job that would run past MaxResource epochs is to be stopped there (``stop_at_max``).
- TrainingJobEarlyStoppingType Auto: MedianPruner. A job whose best objective so far is worse than the median of the
  completed jobs' objective at the same epoch is stopped, once MEDIAN_STARTUP_JOBS jobs have completed, from its
  first epoch on. (SageMaker's documented rule takes the median of the earlier jobs' running averages; Optuna's
  median of their values is the same idea, kept as Optuna implements it.)
"""

from __future__ import annotations

import dataclasses
import math

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from local_sagemaker.container import decoded_value
from local_sagemaker.cores import check_instance_count
from local_sagemaker.protocol import ValidationException
from local_sagemaker.script_mode import check_code

# MedianPruner's startup: no job is stopped before three have completed (a median of fewer is one job's luck).
MEDIAN_STARTUP_JOBS = 3
HYPERBAND_REDUCTION = 3  # Hyperband's eta: a third of a rung's jobs go on to the next
EPOCH_KEYS = ("epochs", "numepochs", "n-epochs", "n_epochs", "num_epochs")  # where SageMaker infers MaxResource
MAX_RESOURCE = 20000
MAX_TUNED = 30  # hyperparameters a tuning job may search, all ranges together
UNSUPPORTED = {
    "WarmStartConfig": "every tuning job here starts from nothing",
    "TrainingJobDefinitions": "give one TrainingJobDefinition",
    "Autotune": "give the ranges and strategy yourself",
}


@dataclasses.dataclass(frozen=True)
class Range:
    """One tuned hyperparameter: what Optuna searches, and how its value reaches the training job (a string)."""

    name: str
    distribution: BaseDistribution
    reverse: bool = False  # ReverseLogarithmic: Optuna searches 1 - value on a log scale

    def value(self, sampled) -> str:
        return str(1 - sampled if self.reverse else sampled)


class _GridSampler(optuna.samplers.GridSampler):
    """GridSampler under ask-and-tell. Its after_trial calls ``study.stop()`` when the grid is used up, which only
    an ``optimize()`` loop may call (it raises here); the tuning job asks for no more jobs than the grid has
    combinations, so each is asked once without it."""

    def after_trial(self, study, trial, state, values) -> None:
        pass


def tpe_startup(jobs: int) -> int:
    """Random jobs before TPE models the others: a third of the budget, 2 to 10 (Optuna's default is 10, more than
    a small tuning job has)."""
    return max(2, min(10, jobs // 3))


@dataclasses.dataclass(frozen=True)
class Plan:
    """A tuning job's request, checked: what to search, how, for how many jobs."""

    strategy: str
    space: tuple[Range, ...]
    metric: str
    maximize: bool
    jobs: int
    parallel: int
    seed: int | None
    early_stopping: bool
    min_resource: int = 1
    max_resource: int | None = None  # Hyperband's
    epochs: int | None = None  # each job's, from the static hyperparameters, when they say
    stop_at_max: bool = False  # Hyperband: the jobs would run past MaxResource epochs, so the tuner stops them there

    @property
    def prunes(self) -> bool:
        return self.early_stopping or self.strategy == "Hyperband"

    def study(self, name: str) -> optuna.Study:
        if self.strategy == "Grid":
            sampler = _GridSampler({r.name: list(r.distribution.choices) for r in self.space}, seed=self.seed)
        elif self.strategy == "Bayesian":
            sampler = optuna.samplers.TPESampler(seed=self.seed, n_startup_trials=tpe_startup(self.jobs))
        else:
            sampler = optuna.samplers.RandomSampler(seed=self.seed)
        if self.strategy == "Hyperband":
            pruner = optuna.pruners.HyperbandPruner(
                min_resource=self.min_resource, max_resource=self.max_resource, reduction_factor=HYPERBAND_REDUCTION
            )
        elif self.early_stopping:
            pruner = optuna.pruners.MedianPruner(n_startup_trials=MEDIAN_STARTUP_JOBS, n_warmup_steps=0)
        else:
            pruner = optuna.pruners.NopPruner()
        return optuna.create_study(
            study_name=name, direction="maximize" if self.maximize else "minimize", sampler=sampler, pruner=pruner
        )


def plan(request: dict) -> Plan:
    """The Plan of a CreateHyperParameterTuningJob request (or of the record it made); ValidationException naming
    what is wrong, or what this service does not do."""
    for key, instead in UNSUPPORTED.items():
        if key in request:
            raise ValidationException(f"{key} is not supported by this local SageMaker service: {instead}")
    definition = request.get("TrainingJobDefinition")
    if definition is None:
        raise ValidationException("TrainingJobDefinition is required: this local service runs one definition")
    for key in ("HyperParameterRanges", "TuningObjective", "HyperParameterTuningResourceConfig"):
        if key in definition:
            raise ValidationException(
                f"TrainingJobDefinition.{key} is not supported by this local SageMaker "
                "service: give the ranges and the objective in HyperParameterTuningJobConfig, "
                "the instances in ResourceConfig"
            )
    if "ResourceConfig" not in definition:
        raise ValidationException("TrainingJobDefinition.ResourceConfig is required: it sizes each training job")
    config = request["HyperParameterTuningJobConfig"]
    objective = config.get("HyperParameterTuningJobObjective")
    if objective is None:
        raise ValidationException("HyperParameterTuningJobConfig.HyperParameterTuningJobObjective is required")
    metrics = [d["Name"] for d in definition["AlgorithmSpecification"].get("MetricDefinitions", [])]
    if objective["MetricName"] not in metrics:
        raise ValidationException(
            f"The objective metric {objective['MetricName']} is not one of the MetricDefinitions of "
            f"TrainingJobDefinition.AlgorithmSpecification ({', '.join(metrics) or 'none'}): a tuning job reads its "
            "objective from the training jobs' logs through them"
        )
    static = definition.get("StaticHyperParameters", {})
    check_code(
        definition["AlgorithmSpecification"],
        static,
        specification_name="TrainingJobDefinition.AlgorithmSpecification",
        hyperparameters_name="StaticHyperParameters",
    )
    check_instance_count(definition.get("ResourceConfig", {}))
    space = _space(config.get("ParameterRanges", {}), static)
    strategy, limits = config["Strategy"], config["ResourceLimits"]
    if strategy == "Grid":
        numeric = [r.name for r in space if not isinstance(r.distribution, CategoricalDistribution)]
        if numeric:
            raise ValidationException(
                f"The Grid strategy searches categorical ranges only; {', '.join(numeric)} "
                "is a numeric range: give its values as a CategoricalParameterRange"
            )
        size = math.prod(len(r.distribution.choices) for r in space)
        jobs = min(size, limits.get("MaxNumberOfTrainingJobs", size))
    elif "MaxNumberOfTrainingJobs" not in limits:
        raise ValidationException(
            f"ResourceLimits.MaxNumberOfTrainingJobs is required with the {strategy} "
            "strategy (only Grid runs as many jobs as its grid has combinations)"
        )
    else:
        jobs = limits["MaxNumberOfTrainingJobs"]
    early_stopping = config.get("TrainingJobEarlyStoppingType", "Off") == "Auto"
    common = {
        "strategy": strategy,
        "space": space,
        "metric": objective["MetricName"],
        "jobs": jobs,
        "maximize": objective["Type"] == "Maximize",
        "parallel": limits["MaxParallelTrainingJobs"],
        "seed": config.get("RandomSeed"),
        "early_stopping": early_stopping,
        "epochs": epochs_of(next((static[key] for key in EPOCH_KEYS if key in static), None)),
    }
    if strategy != "Hyperband":
        if "StrategyConfig" in config:
            raise ValidationException(f"StrategyConfig is for the Hyperband strategy only, not {strategy}")
        return Plan(**common)
    if early_stopping:
        raise ValidationException(
            "TrainingJobEarlyStoppingType must be Off with the Hyperband strategy, which stops jobs early itself"
        )
    hyperband = config.get("StrategyConfig", {}).get("HyperbandStrategyConfig", {})
    epochs = _static_epochs(static)
    max_resource = hyperband.get("MaxResource", epochs)
    if max_resource is None:
        raise ValidationException(
            "HyperbandStrategyConfig.MaxResource is not given and cannot be inferred: "
            f"StaticHyperParameters have none of {', '.join(EPOCH_KEYS)}"
        )
    min_resource = hyperband.get("MinResource", 1)
    if not min_resource <= max_resource <= MAX_RESOURCE:
        raise ValidationException(
            f"HyperbandStrategyConfig: MinResource {min_resource} and MaxResource "
            f"{max_resource} must satisfy MinResource <= MaxResource <= {MAX_RESOURCE}"
        )
    return Plan(
        **common,
        min_resource=min_resource,
        max_resource=max_resource,
        stop_at_max=epochs is None or max_resource < epochs,
    )


def epochs_of(value) -> int | None:
    """A job's epochs as its hyperparameters give them to its script (decoded as the training toolkit decodes them,
    then printed), or None when they give none (or not as a whole number)."""
    try:
        return int(str(decoded_value(value))) if value is not None else None
    except ValueError:
        return None


def _static_epochs(static: dict) -> int | None:
    for key in EPOCH_KEYS:
        if key in static:
            epochs = epochs_of(static[key])
            if epochs is None:
                raise ValidationException(
                    f"StaticHyperParameters {key}={static[key]!r} is not a whole number of "
                    "epochs, which Hyperband takes as MaxResource"
                )
            return epochs
    return None


def _space(ranges: dict, static: dict) -> tuple[Range, ...]:
    if "AutoParameters" in ranges:
        raise ValidationException(
            "ParameterRanges.AutoParameters (Autotune's) is not supported by this local "
            "SageMaker service: give Integer, Continuous or Categorical ranges"
        )
    space = [
        *(_numeric(item, "Integer") for item in ranges.get("IntegerParameterRanges", [])),
        *(_numeric(item, "Continuous") for item in ranges.get("ContinuousParameterRanges", [])),
        *(_categorical(item) for item in ranges.get("CategoricalParameterRanges", [])),
    ]
    names = [r.name for r in space]
    if not names:
        raise ValidationException("ParameterRanges name no hyperparameter to tune")
    if len(names) > MAX_TUNED:
        raise ValidationException(f"ParameterRanges name {len(names)} hyperparameters; at most {MAX_TUNED}")
    if repeated := sorted({n for n in names if names.count(n) > 1}):
        raise ValidationException(f"ParameterRanges name {', '.join(repeated)} more than once")
    if both := sorted(set(names) & set(static)):
        raise ValidationException(f"{', '.join(both)}: a hyperparameter is either static or tuned, not both")
    return tuple(space)


def _numeric(item: dict, kind: str) -> Range:
    name, scaling = item["Name"], item.get("ScalingType", "Auto")
    cast = int if kind == "Integer" else float
    try:
        low, high = cast(item["MinValue"]), cast(item["MaxValue"])
    except ValueError:
        raise ValidationException(
            f"{kind}ParameterRange {name}: MinValue {item['MinValue']!r} and MaxValue "
            f"{item['MaxValue']!r} must be {'integers' if cast is int else 'numbers'}"
        ) from None
    if not (math.isfinite(low) and math.isfinite(high) and low <= high):
        raise ValidationException(f"{kind}ParameterRange {name}: MinValue {low} must not exceed MaxValue {high}")
    if scaling == "Logarithmic" and low <= 0:
        raise ValidationException(
            f"{kind}ParameterRange {name}: Logarithmic scaling works only for ranges of "
            f"values greater than 0, and [{low}, {high}] includes {low}"
        )
    if scaling == "ReverseLogarithmic":
        if kind == "Integer":
            raise ValidationException(
                f"IntegerParameterRange {name}: ReverseLogarithmic scaling is for continuous ranges only"
            )
        if not (low >= 0 and high < 1):
            raise ValidationException(
                f"ContinuousParameterRange {name}: ReverseLogarithmic scaling works only for "
                f"ranges within 0 <= x < 1, and [{low}, {high}] is not"
            )
        return Range(name, FloatDistribution(1 - high, 1 - low, log=True), reverse=True)
    # Auto is linear here: SageMaker leaves its choice unspecified, and a linear scale assumes nothing.
    log_scale = scaling == "Logarithmic"
    distribution = (
        IntDistribution(low, high, log=log_scale) if kind == "Integer" else FloatDistribution(low, high, log=log_scale)
    )
    return Range(name, distribution)


def _categorical(item: dict) -> Range:
    values = item["Values"]
    if repeated := sorted({v for v in values if values.count(v) > 1}):
        raise ValidationException(f"CategoricalParameterRange {item['Name']}: {', '.join(repeated)} repeated")
    return Range(item["Name"], CategoricalDistribution(tuple(values)))
