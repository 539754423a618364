"""`mnist-pipeline predict`: which digits pictures show, by the endpoint's answers, through the pipeline's AWS
connection (the running local stack's when the environment names no other)."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

from cli import new_console
from cli.stack import use_stack_connection
from tasks.config import load_config

# The Amazon provider's connection wrapper tells at info level where it found the connection's keys, once for each
# hook the prediction makes: between a command's own lines that is noise, and its warnings still show.
CONNECTION_WRAPPER_LOGGER = "airflow.providers.amazon.aws.utils.connection_wrapper"


@contextlib.contextmanager
def without_info_from(logger_name: str):
    """While the block runs, this process's Airflow logging drops the debug and info events of ``logger_name`` and of
    the loggers under it; every other logger, in this process and in the stack's, logs as before."""
    # Importing Airflow configures its logging: done first, so that it cannot replace the filter afterwards.
    import airflow  # noqa: F401
    import structlog

    processors = structlog.get_config()["processors"]

    def drop(logger, method_name: str, event_dict):
        # Airflow's structlog loggers write through a logger that carries their name.
        name = getattr(logger, "name", None) or ""
        if method_name in ("debug", "info") and (name == logger_name or name.startswith(f"{logger_name}.")):
            raise structlog.DropEvent
        return event_dict

    structlog.configure(processors=[drop, *processors])
    try:
        yield
    finally:
        structlog.configure(processors=processors)


def predict_command(args) -> int:
    """`mnist-pipeline predict`: through the AWS connection, the running stack's when there is no other."""
    from botocore.exceptions import BotoCoreError, ClientError
    from rich.table import Table

    from tasks.predict import PredictError, predict

    console = new_console()
    config = load_config()
    use_stack_connection(config)
    try:
        # Airflow's hooks log to stdout; stdout is the answer's (JSON with --json).
        with contextlib.redirect_stdout(sys.stderr), without_info_from(CONNECTION_WRAPPER_LOGGER):
            results = predict([Path(image) for image in args.images], args.endpoint, config)
    except (PredictError, ClientError, BotoCoreError) as error:
        console.print(f"[red]error:[/] {error}")
        return 1
    if args.json:
        print(json.dumps(results))
        return 0
    table = Table("image", "digit", "confidence", title=f"endpoint {args.endpoint}")
    for result in results:
        table.add_row(result["image"], str(result["digit"]), f"{100 * result['confidence']:.1f}%")
    console.print(table)
    return 0
