"""Time the MNIST validation of the full 70,000 images (target: 5 s after imports) and write it as JSON.

Reference measured in the same run: decoding the four IDX files alone, the floor any validation starts from.
    python bench/bench_validation.py --data ../shared/mnist --out bench/results/validation.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from results_file import write_result

TARGET_S = 5.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "mnist"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench/results/validation.json")
    args = parser.parse_args()

    started = time.perf_counter()
    import great_expectations  # noqa: F401 - the imports are timed apart from the validation
    import pandas  # noqa: F401

    from data_checks.mnist_suite import validate_mnist
    from training.mnist_idx import load_mnist

    import_seconds = time.perf_counter() - started
    decode, validate, with_report = [], [], []
    for _ in range(args.repeats):
        started = time.perf_counter()
        load_mnist(args.data)
        decode.append(time.perf_counter() - started)
        validate.append(validate_mnist(args.data, expected_counts=(60000, 10000))["seconds"])
        with tempfile.TemporaryDirectory() as report:
            with_report.append(validate_mnist(args.data, report_dir=report, expected_counts=(60000, 10000))["seconds"])
    result = {
        "images": 70000,
        "target_s": TARGET_S,
        "import_s": round(import_seconds, 3),
        "decode_s": round(statistics.median(decode), 3),
        "validate_s": round(statistics.median(validate), 3),
        "validate_with_report_s": round(statistics.median(with_report), 3),
        "first_validate_with_report_s": round(with_report[0], 3),
        "validate_to_decode_ratio": round(statistics.median(validate) / statistics.median(decode), 2),
        "max_validate_with_report_s": round(max(with_report), 3),
        "meets_target": statistics.median(with_report) <= TARGET_S,
    }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
