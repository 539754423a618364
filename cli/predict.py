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
        with contextlib.redirect_stdout(sys.stderr):
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
