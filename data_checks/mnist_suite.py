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

from data_checks import OFFICIAL_COUNTS
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
SPLITS = ("train", "test")
# Failing rows are named by these columns in the result, the Data Docs and the error.
ROW_ID = ["split", "index", "label"]


class DataValidationError(ValueError):
    """The dataset is malformed or fails expectations; the message has one line per problem."""


def build_suite(expected_counts: tuple[int, int]):
    """The expectation suite for a per-image table (data_checks.image_table) of the given split sizes."""
    import great_expectations as gx
    import great_expectations.expectations as gxe
    from great_expectations.expectations.row_conditions import Column

    low, high = CLASS_SHARE
    expectations = [
        gxe.ExpectColumnValuesToNotBeNull(column="label", description="no null labels"),
        gxe.ExpectColumnValuesToNotBeNull(column="pixel_hash", description="no null pixel hashes"),
        gxe.ExpectColumnValuesToBeInSet(column="label", value_set=list(range(10)), description="labels are 0..9"),
        gxe.ExpectColumnValuesToBeBetween(
            column="min", min_value=0, max_value=0, description="pixel range: every image has black (0) background"
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="max", min_value=MIN_PEAK, max_value=255, description=f"pixel range: ink reaches {MIN_PEAK}..255"
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="ink_pixels", min_value=MIN_INK_PIXELS, description=f"no blank images ({MIN_INK_PIXELS}+ ink pixels)"
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="mean", min_value=IMAGE_MEAN[0], max_value=IMAGE_MEAN[1], description="image mean intensity in band"
        ),
        gxe.ExpectColumnMeanToBeBetween(
            column="mean", min_value=DATASET_MEAN[0], max_value=DATASET_MEAN[1], description="dataset mean intensity"
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="frame_mean",
            max_value=FRAME_MEAN_MAX,
            description="white digits on black: the border is dark (inverted images fail)",
        ),
        gxe.ExpectColumnValuesToBeInSet(
            column="test_in_train",
            value_set=[False],
            description="no train/test leakage: no test image is identical to a training image",
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="class_share",
            min_value=low,
            max_value=high,
            description=f"each class is {low:.0%}..{high:.0%} of its split",
        ),
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
    suite = gx.ExpectationSuite(name="mnist")
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
) -> dict:
    """Validate the four MNIST files in ``directory``; return a summary, raise DataValidationError on any failure.

    ``expected_counts`` (train, test) defaults to the official set's. With ``report_dir``, writes
    validation_result.json and the Data Docs (index.html) there, pass or fail.
    """
    import great_expectations as gx

    expected_counts = expected_counts or OFFICIAL_COUNTS
    started = time.perf_counter()
    directory = Path(directory)
    try:
        table = image_table(load_mnist(directory))
    except IdxFormatError as exc:
        raise DataValidationError(f"malformed MNIST file: {exc}") from exc

    report_dir = Path(report_dir) if report_dir is not None else None
    context = _context(report_dir)
    batch_definition = (
        context.data_sources.add_pandas("mnist")
        .add_dataframe_asset("images")
        .add_batch_definition_whole_dataframe("per-image table")
    )
    validation = context.validation_definitions.add(
        gx.ValidationDefinition(
            name="mnist", data=batch_definition, suite=context.suites.add(build_suite(expected_counts))
        )
    )
    result = validation.run(
        batch_parameters={"dataframe": table},
        result_format={
            "result_format": "SUMMARY",
            "unexpected_index_column_names": ROW_ID,
            "partial_unexpected_count": 5,
        },
    )
    failures = [_failure_line(r) for r in result.results if not r.success]
    summary = {
        "success": not failures,
        "directory": str(directory),
        "counts": {split: int((table["split"] == split).sum()) for split in SPLITS},
        "expected_counts": dict(zip(SPLITS, expected_counts, strict=True)),
        "expectations": len(result.results),
        "failures": failures,
    }
    if report_dir is not None:
        report_dir.mkdir(parents=True, exist_ok=True)
        (report_dir / "validation_result.json").write_text(json.dumps(result.to_json_dict(), indent=1))
        context.build_data_docs()
        summary["report"] = str(report_dir / "index.html")
    summary["seconds"] = round(time.perf_counter() - started, 3)
    if failures:
        raise DataValidationError(
            f"MNIST in {directory} failed {len(failures)} of {len(result.results)} expectations:\n"
            + "\n".join(f"  {line}" for line in failures)
            + (f"\nreport: {summary['report']}" if report_dir is not None else "")
        )
    log.info("MNIST in %s passed %d expectations in %.2f s", directory, len(result.results), summary["seconds"])
    return summary


def _failure_line(result) -> str:
    """One failed expectation: its description and what was observed (the value, or the failing rows)."""
    observed = result.result
    if "observed_value" in observed:
        seen = f"observed {observed['observed_value']}"
    else:
        rows = ", ".join(
            f"{row['split']} #{row['index']} (label {row['label']}): {value}"
            for row, value in zip(
                observed.get("partial_unexpected_index_list") or [],
                observed.get("partial_unexpected_list") or [],
                strict=False,
            )
        )
        seen = f"{observed.get('unexpected_count')} of {observed.get('element_count')} images fail (e.g. {rows})"
    return f"{result.expectation_config.description}: {seen}"
