"""`mnist-pipeline`: the command line of the project.

Every subcommand names its implementation as "module:function" and imports it only when run, so `--help`
answers at once and no subcommand pays for another's imports (torch, great_expectations, airflow).
"""

from __future__ import annotations

import argparse
import importlib
import sys


def _command(subparsers, name: str, target: str, help_text: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(name, help=help_text, description=help_text)
    parser.set_defaults(target=target)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mnist-pipeline", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = commands.add_parser("data", help="download and validate the MNIST files")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    download = _command(
        data_commands, "download", "tasks.mnist_data:download_command", "download MNIST and verify its checksums"
    )
    download.add_argument("--mirror", action="append", help="mirror URL or directory (repeat for fallbacks)")
    download.add_argument("--dest", default=None, help="cache directory (default: $MNIST_CACHE or ~/.cache/mnist)")
    validate = _command(
        data_commands, "validate", "data_checks.mnist_suite:validate_command", "validate MNIST files in a directory"
    )
    validate.add_argument("directory", help="directory holding the four MNIST .gz files")
    validate.add_argument("--report", default=None, help="write the result JSON and Data Docs HTML here")
    validate.add_argument("--expect-train", type=int, default=60000, help="expected number of training images")
    validate.add_argument("--expect-test", type=int, default=10000, help="expected number of test images")

    serve = _command(commands, "serve", "inference.serve:serve_command", "serve a model the SageMaker way")
    serve.add_argument("--model-dir", required=True, help="model directory, model.tar.gz, or s3:// URI of one")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--endpoint-name", default="local-endpoint", help="EndpointName dimension of the metrics")
    serve.add_argument("--workers", type=int, default=None, help="server processes (default: from the CPUs)")

    sweep = _command(
        commands, "sweep", "tasks.local_sweep:sweep_command", "train the hidden_channels sweep here and print the table"
    )
    sweep.add_argument("--data", default=None, help="directory with the four MNIST files (default: download)")
    sweep.add_argument("--hidden-channels", type=int, nargs="+", default=[2, 5, 10, 20, 32])
    sweep.add_argument("--epochs", type=int, default=2)
    sweep.add_argument("--parallel", type=int, default=None, help="jobs at once (default: one per 2 cores)")
    sweep.add_argument("--out", default="artifacts/sweep", help="where models and metrics go")

    _command(commands, "demo", "tasks.local_sweep:demo_command", "the README demo: the seed sweep on this machine")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module_name, function_name = args.target.split(":")
    command = getattr(importlib.import_module(module_name), function_name)
    return int(command(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
