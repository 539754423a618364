"""The MNIST expectation suite: the data must make sense before anything trains on it (great-expectations 1.x).

The four files are decoded first (a malformed file fails here, naming the file), then one row per image is checked
in an ephemeral GX context. The validation result (JSON) and the Data Docs (HTML) go to a report directory. Any
failed expectation raises DataValidationError with one line per failure and what was observed: fail closed.

pandas and great_expectations are imported inside the functions: DAG files import this module.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from data_checks import OFFICIAL_COUNTS, SPLITS
from data_checks.class_stats import RECALL_DROP_MAX, class_statistics, comparison_table, load_reference
from data_checks.image_table import image_table
from training.mnist_idx import IdxFormatError, load_mnist

log = logging.getLogger(__name__)
# GX logs hundreds of INFO lines about its own API registry when imported: keep task logs readable.
logging.getLogger("great_expectations").setLevel(logging.WARNING)

# The bands, from the official files: each class is 8.9%-11.4% of its split; an image's mean intensity is 6.5-101
# (white ink on black: an inverted digit averages ~220), 33.3 over the training set; every image has 34 or more
# ink pixels, a border frame averaging 11 or less, black background and a brightest pixel of 254 or 255.
CLASS_SHARE = (0.07, 0.13)
IMAGE_MEAN = (2.0, 128.0)
DATASET_MEAN = (20.0, 50.0)
FRAME_MEAN_MAX = 40.0
MIN_INK_PIXELS = 10
MIN_PEAK = 128
# Each class of each split against the reference (data_checks.class_stats). Between the official training and test
# splits, mean images correlate 0.994 or more, where two different digits reach 0.90; centres of mass differ by
# 0.05 px and slants by 0.04, and no image repeats. How far nearest-centroid recall may drop is class_stats'
# (RECALL_DROP_MAX, more for a class too small to measure it).
MEAN_IMAGE_CORR_MIN = 0.97
INTENSITY_RATIO = (0.85, 1.15)
CENTRE_SHIFT_MAX = 1.0
SLANT_SHIFT_MAX = 0.1
REPEAT_SHARE_MAX = 0.01
# Failing rows are named by these columns in the result, the Data Docs and the error.
ROW_ID = ["split", "index", "label"]
CLASS_ROW_ID = ["split", "label"]


class DataValidationError(ValueError):
    """The dataset is malformed or fails expectations; the message has one line per problem."""


def build_suite(expected_counts: tuple[int, int]):
    """The expectation suite for a per-image table (data_checks.image_table) of the given split sizes."""
    import great_expectations.expectations as gxe
    from great_expectations.expectations.row_conditions import Column

    low, high = CLASS_SHARE
    expectations = [
        gxe.ExpectColumnValuesToNotBeNull(column="label", description="no null labels"),
        gxe.ExpectColumnValuesToNotBeNull(column="pixel_hash", description="no null pixel hashes"),
        gxe.ExpectColumnValuesToBeInSet(column="label", value_set=list(range(10)), description="labels are 0..9"),
        _between("min", "pixel range: every image has black (0) background", min_value=0, max_value=0),
        _between("max", f"pixel range: ink reaches {MIN_PEAK}..255", min_value=MIN_PEAK, max_value=255),
        _between("ink_pixels", f"no blank images ({MIN_INK_PIXELS}+ ink pixels)", min_value=MIN_INK_PIXELS),
        _between("mean", "image mean intensity in band", min_value=IMAGE_MEAN[0], max_value=IMAGE_MEAN[1]),
        gxe.ExpectColumnMeanToBeBetween(
            column="mean", min_value=DATASET_MEAN[0], max_value=DATASET_MEAN[1], description="dataset mean intensity"
        ),
        _between(
            "frame_mean", "white digits on black: the border is dark (inverted images fail)", max_value=FRAME_MEAN_MAX
        ),
        gxe.ExpectColumnValuesToBeInSet(
            column="test_in_train",
            value_set=[False],
            description="no train/test leakage: no test image is identical to a training image",
        ),
        _between("class_share", f"each class is {low:.0%}..{high:.0%} of its split", min_value=low, max_value=high),
    ]
    for split, count in zip(SPLITS, expected_counts, strict=True):
        in_split = Column("split") == split
        expectations += [
            gxe.ExpectTableRowCountToEqual(value=count, row_condition=in_split, description=f"{split}: {count} images"),
            gxe.ExpectColumnDistinctValuesToEqualSet(
                column="label",
                value_set=list(range(10)),
                row_condition=in_split,
                description=f"{split}: all 10 classes",
            ),
        ]
    return _suite("mnist", expectations)


def build_class_suite():
    """The expectation suite for a per-class comparison with the reference (data_checks.class_stats)."""
    import great_expectations.expectations as gxe

    low, high = INTENSITY_RATIO
    expectations = [
        _between(
            "mean_image_corr",
            f"each class looks like its reference digit (mean images correlate {MEAN_IMAGE_CORR_MIN}+)",
            min_value=MEAN_IMAGE_CORR_MIN,
        ),
        _between(
            "intensity_ratio",
            f"each class's mean intensity is {low}..{high} of the reference's",
            min_value=low,
            max_value=high,
        ),
        _between(
            "centre_shift",
            f"each class's centre of mass is within {CENTRE_SHIFT_MAX} px of the reference's",
            max_value=CENTRE_SHIFT_MAX,
        ),
        _between(
            "slant_shift",
            f"each class slants as the reference's (within {SLANT_SHIFT_MAX}; mirrored images fail)",
            max_value=SLANT_SHIFT_MAX,
        ),
        _between(
            "repeat_share",
            f"at most {REPEAT_SHARE_MAX:.0%} of each class's images repeat another of its split",
            max_value=REPEAT_SHARE_MAX,
        ),
        gxe.ExpectColumnPairValuesAToBeGreaterThanB(
            column_A="recall_allowed",
            column_B="recall_drop",
            or_equal=True,
            description=f"labels agree with pixels (nearest-centroid recall within {RECALL_DROP_MAX} of the reference's, "
            "more in a class too small to measure it to that)",
        ),
    ]
    return _suite("mnist-classes", expectations)


def _between(column: str, description: str, **bounds):
    """ExpectColumnValuesToBeBetween on ``column``, held by ``bounds``: min_value, max_value or both (a bound left
    out is no bound, not a bound of None)."""
    import great_expectations.expectations as gxe

    return gxe.ExpectColumnValuesToBeBetween(column=column, **bounds, description=description)


def _suite(name: str, expectations: list):
    import great_expectations as gx

    suite = gx.ExpectationSuite(name=name)
    for expectation in expectations:
        suite.add_expectation(expectation)
    return suite


def _context(report_dir: Path | None):
    """An in-memory GX context; with a report directory, a Data Docs site in it."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    sites = {}
    if report_dir is not None:
        sites["mnist"] = {
            "class_name": "SiteBuilder",
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(report_dir)},
        }
    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(),
        data_docs_sites=sites,
        progress_bars=ProgressBarsConfig(globally=False),
        analytics_enabled=False,
    )
    return gx.get_context(mode="ephemeral", project_config=config)


def validate_mnist(
    directory: str | os.PathLike,
    report_dir: str | os.PathLike | None = None,
    expected_counts: tuple[int, int] | None = None,
    reference: str | os.PathLike | None = None,
) -> dict:
    """Validate the four MNIST files in ``directory``; return a summary, raise DataValidationError on any failure.

    ``expected_counts`` (train, test) defaults to the official set's, and ``reference`` (a file of class statistics,
    data_checks.class_stats) to the official set's statistics. With ``report_dir``, writes validation_result.json
    and the Data Docs (index.html) there, pass or fail.
    """
    expected_counts = expected_counts or OFFICIAL_COUNTS
    started = time.perf_counter()
    directory = Path(directory)
    try:
        reference_classes = load_reference(reference)
    except ValueError as exc:
        raise DataValidationError(str(exc)) from exc
    try:
        arrays = load_mnist(directory)
    except IdxFormatError as exc:
        raise DataValidationError(f"malformed MNIST file: {exc}") from exc
    return validate_arrays(arrays, report_dir, expected_counts, reference_classes, f"MNIST in {directory}", started)


def validate_arrays(
    arrays: dict,
    report_dir: str | os.PathLike | None,
    expected_counts: tuple[int, int],
    reference_classes: dict,
    name: str,
    started: float | None = None,
) -> dict:
    """``validate_mnist`` on decoded arrays (``training.mnist_idx.load_mnist``'s), held to reference class statistics
    (``load_reference``'s); ``name`` names the data in the summary and the error."""
    import great_expectations as gx

    started = started or time.perf_counter()
    images = image_table(arrays)
    classes = comparison_table(class_statistics(arrays), reference_classes)
    report_dir = Path(report_dir) if report_dir is not None else None
    context = _context(report_dir)  # before the suites: GX binds each to the current context
    tables = {
        "images": (images, build_suite(expected_counts), ROW_ID),
        "classes": (classes, build_class_suite(), CLASS_ROW_ID),
    }
    source = context.data_sources.add_pandas("mnist")
    results = []
    for asset, (table, suite, row_id) in tables.items():
        batch_definition = source.add_dataframe_asset(asset).add_batch_definition_whole_dataframe(asset)
        validation = context.validation_definitions.add(
            gx.ValidationDefinition(name=suite.name, data=batch_definition, suite=context.suites.add(suite))
        )
        results.append(
            validation.run(
                batch_parameters={"dataframe": table},
                result_format={
                    "result_format": "SUMMARY",
                    "unexpected_index_column_names": row_id,
                    "partial_unexpected_count": 5,
                },
            )
        )
    checked = [r for result in results for r in result.results]
    failures = [_failure_line(r) for r in checked if not r.success]
    summary = {
        "success": not failures,
        "data": name,
        "counts": {split: int((images["split"] == split).sum()) for split in SPLITS},
        "expected_counts": dict(zip(SPLITS, expected_counts, strict=True)),
        "expectations": len(checked),
        "failures": failures,
    }
    if report_dir is not None:
        report_dir.mkdir(parents=True, exist_ok=True)
        (report_dir / "validation_result.json").write_text(
            json.dumps({"success": not failures, "results": [r.to_json_dict() for r in results]}, indent=1)
        )
        context.build_data_docs()
        summary["report"] = str(report_dir / "index.html")
    summary["seconds"] = round(time.perf_counter() - started, 3)
    if failures:
        raise DataValidationError(
            f"{name} failed {len(failures)} of {len(checked)} expectations:\n"
            + "\n".join(f"  {line}" for line in failures)
            + (f"\nreport: {summary['report']}" if report_dir is not None else "")
        )
    log.info("%s passed %d expectations in %.2f s", name, len(checked), summary["seconds"])
    return summary


def _failure_line(result) -> str:
    """One failed expectation: its description and what was observed (the value, or the failing rows)."""
    observed = result.result
    if "observed_value" in observed:
        seen = f"observed {observed['observed_value']}"
    else:
        index = observed.get("partial_unexpected_index_list") or []
        per_class = bool(index) and "index" not in index[0]
        rows = ", ".join(
            (
                f"{row['split']} class {row['label']}"
                if per_class
                else f"{row['split']} #{row['index']} (label {row['label']})"
            )
            + f": {_shown(value, result.expectation_config.kwargs)}"
            for row, value in zip(index, observed.get("partial_unexpected_list") or [], strict=False)
        )
        unit = "classes" if per_class else "images"
        seen = f"{observed.get('unexpected_count')} of {observed.get('element_count')} {unit} fail (e.g. {rows})"
    return f"{result.expectation_config.description}: {seen}"


def _shown(value, kwargs) -> str:
    """A failing value as the error shows it: a column pair's (A, B) as B and the A it is held to, by name."""
    if isinstance(value, tuple):
        bound, figure = (float(v) for v in value)  # a numpy scalar's repr would name its type
        return f"{kwargs['column_B']} {figure} ({kwargs['column_A']} {bound})"
    return str(value)
