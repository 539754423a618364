"""`mnist-pipeline`: the command line of the project.

Every subcommand names its implementation as "module:function" and imports it only when run, so `--help`
answers at once and no subcommand pays for another's imports (torch, great_expectations, airflow).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from tasks.names import DEFAULT_ENDPOINT


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
    download.add_argument("--dest", default=None, help="cache directory (default: $MNIST_CACHE or <state_dir>/mnist)")
    validate = _command(data_commands, "validate", "cli.data:validate_command", "validate MNIST files in a directory")
    validate.add_argument("directory", help="directory holding the four MNIST .gz files")
    validate.add_argument("--report", default=None, help="write the result JSON and Data Docs HTML here")
    validate.add_argument("--expect-train", type=int, help="expected training images (default: configured, 60000)")
    validate.add_argument("--expect-test", type=int, help="expected test images (default: configured, 10000)")
    validate.add_argument(
        "--reference", default=None, help="class statistics to hold the data to (default: configured, the official)"
    )
    reference = _command(
        data_commands,
        "reference",
        "cli.data:reference_command",
        "write the class statistics of a sound dataset, for `validate --reference` and mnist_reference",
    )
    reference.add_argument("directory", help="directory holding the four MNIST .gz files, known to be sound")
    reference.add_argument("out", help="the reference file (JSON) to write")

    from inference.serve import add_arguments as add_serve_arguments  # the standard library; torch loads when it serves

    add_serve_arguments(_command(commands, "serve", "inference.serve:serve_command", "serve a model the SageMaker way"))

    _command(commands, "demo", "cli.demo:demo_command", "the README demo: up, the seed sweep, a prediction")

    up = _command(
        commands,
        "up",
        "cli.stack:up_command",
        "start the local stack on 127.0.0.1: local AWS, local SageMaker, Airflow",
    )
    up.add_argument("--port", type=int, default=8080, help="Airflow UI port (another free one when taken; 0: any)")
    _command(commands, "down", "cli.stack:down_command", "stop everything `up` started, and the local endpoints")
    _command(commands, "status", "cli.stack:status_command", "say what of the local stack is running")
    run = _command(commands, "run", "cli.runs:run_command", "trigger the sweep on the local stack and follow it")
    run.add_argument("--conf", default=None, help="params as a JSON object, e.g. '{\"hidden_channels\": [4, 8]}'")
    run.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="one param (JSON value)")
    drift = _command(
        commands,
        "drift",
        "cli.drift:drift_command",
        "run the drift check of an endpoint's captured inputs on the local stack",
    )
    drift.add_argument("--endpoint", default=DEFAULT_ENDPOINT, help=f"endpoint name (default: {DEFAULT_ENDPOINT})")
    drift.add_argument("--min-requests", type=int, default=None, help="fewer since the last check: not judged")
    predict = _command(commands, "predict", "cli.predict:predict_command", "ask the endpoint which digits images show")
    predict.add_argument("images", nargs="+", metavar="IMAGE", help="PNG or JPEG pictures of single digits")
    predict.add_argument("--endpoint", default=DEFAULT_ENDPOINT, help=f"endpoint name (default: {DEFAULT_ENDPOINT})")
    predict.add_argument("--json", action="store_true", help="print the predictions as JSON")

    iam = commands.add_parser("iam", help="the IAM policies the pipeline ships, for AWS")
    iam_commands = iam.add_subparsers(dest="iam_command", required=True, metavar="COMMAND")
    render = _command(
        iam_commands,
        "render",
        "cli.iam:render_command",
        "print the shipped policies filled in for an account, ready for `aws iam put-role-policy`",
    )
    render.add_argument("--account", required=True, help="the AWS account id (12 digits)")
    render.add_argument("--region", required=True, help="the region the pipeline runs in")
    render.add_argument("--bucket", required=True, help="the bucket the pipeline keeps its data in")
    render.add_argument("--prefix", required=True, help="the key prefix the pipeline owns in the bucket")
    render.add_argument("--role", required=True, help="the SageMaker execution role's name")
    render.add_argument(
        "--principal",
        default=None,
        help="the ARN of the principal Airflow runs as (default: user/mnist-pipeline of the account)",
    )
    render.add_argument("--topic", default="mnist-pipeline-alerts", help="the notifications' SNS topic name")
    render.add_argument("--policy", default=None, help="print only this policy (e.g. airflow-policy)")

    models = _command(
        commands,
        "models",
        "cli.registry:models_command",
        "list an endpoint's model versions in the registry, the champion marked",
    )
    models.add_argument(
        "--endpoint", default=DEFAULT_ENDPOINT, help=f"its registry group (default: {DEFAULT_ENDPOINT})"
    )
    models.add_argument("--json", action="store_true", help="print the versions as JSON")
    for name, verb in (
        ("approve", "approve a model version: the next run (or a deploy-only run) serves it"),
        ("reject", "reject a model version: no run serves it"),
    ):
        decide = _command(commands, name, f"cli.registry:{name}_command", verb)
        decide.add_argument("version", metavar="VERSION", help="the version's number in the group, or its ARN")
        decide.add_argument(
            "--endpoint",
            default=DEFAULT_ENDPOINT,
            help=f"the endpoint whose registry group holds it (default: {DEFAULT_ENDPOINT})",
        )
        decide.add_argument("--reason", default=None, help="why (the version's ApprovalDescription)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module_name, function_name = args.target.split(":")
    command = getattr(importlib.import_module(module_name), function_name)
    return int(command(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
