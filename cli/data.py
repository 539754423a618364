"""`mnist-pipeline data validate`: the data checks on a directory, with the counts the configuration expects."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from data_checks.mnist_suite import DataValidationError, validate_mnist


def validate_command(args) -> int:
    """`mnist-pipeline data validate DIR [--report DIR] [--expect-train N] [--expect-test N]`: 1 on any failure."""
    counts, reference = (args.expect_train, args.expect_test), args.reference
    if None in counts or reference is None:
        from tasks.config import load_config

        config = load_config()
        counts = tuple(given or default for given, default in zip(counts, config.expected_counts, strict=True))
        reference = reference or config.mnist_reference
    try:
        summary = validate_mnist(args.directory, report_dir=args.report, expected_counts=counts, reference=reference)
    except DataValidationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        f"MNIST in {args.directory} passed {summary['expectations']} expectations "
        f"({summary['counts']['train']} train / {summary['counts']['test']} test images) "
        f"in {summary['seconds']:.2f} s" + (f"; report: {summary['report']}" if args.report else "")
    )
    return 0


def reference_command(args) -> int:
    """`mnist-pipeline data reference DIR OUT`: the class statistics of DIR's dataset, written to OUT."""
    from data_checks.class_stats import write_reference
    from training.mnist_idx import IdxFormatError, load_mnist

    try:
        arrays = load_mnist(args.directory)
    except IdxFormatError as exc:
        print(f"error: malformed MNIST file: {exc}", file=sys.stderr)
        return 1
    from training.mnist_idx import MNIST_FILES

    # The files it was computed from, by MD5 (the sums MNIST is published with).
    source = {
        name: hashlib.md5((Path(args.directory) / name).read_bytes()).hexdigest() for name in MNIST_FILES.values()
    }
    path = write_reference(arrays, args.out, source=source)
    print(f"wrote the class statistics of {args.directory} to {path}")
    return 0
