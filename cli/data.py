"""`mnist-pipeline data validate`: the data checks on a directory, with the counts the configuration expects."""

from __future__ import annotations

import sys

from data_checks.mnist_suite import DataValidationError, validate_mnist


def validate_command(args) -> int:
    """`mnist-pipeline data validate DIR [--report DIR] [--expect-train N] [--expect-test N]`: 1 on any failure."""
    counts = (args.expect_train, args.expect_test)
    if None in counts:
        from tasks.config import load_config

        configured = load_config().expected_counts
        counts = tuple(given or default for given, default in zip(counts, configured, strict=True))
    try:
        summary = validate_mnist(args.directory, report_dir=args.report, expected_counts=counts)
    except DataValidationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        f"MNIST in {args.directory} passed {summary['expectations']} expectations "
        f"({summary['counts']['train']} train / {summary['counts']['test']} test images) "
        f"in {summary['seconds']:.2f} s" + (f"; report: {summary['report']}" if args.report else "")
    )
    return 0
