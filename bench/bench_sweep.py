"""The seed sweep end to end, as `make demo` runs it: the local stack, `mnist_sweep` triggered through the REST
API, timed, written as JSON.

Five training jobs (seed_cnn at hidden_channels 2, 5, 10, 20, 32, with the seed preset's 2 epochs of SGD) on the
official MNIST from a mirror directory, with everything else the DAG does: verify, validate, upload to the local
S3, train on the local SageMaker service, select, gate, deploy, the monitoring check, report. The stack gets a
fresh state directory and is stopped at the end.

    python bench/bench_sweep.py --mirror ../shared/mnist --out bench/results/sweep.json
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _seconds(ti: dict) -> float | None:
    if not (ti.get("start_date") and ti.get("end_date")):
        return None
    start, end = (datetime.datetime.fromisoformat(ti[key]) for key in ("start_date", "end_date"))
    return round((end - start).total_seconds(), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mirror", required=True, help="directory with the four official MNIST files")
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--hidden-channels", type=int, nargs="+", default=[2, 5, 10, 20, 32])
    args = parser.parse_args()

    os.environ["MNIST_PIPELINE_STATE_DIR"] = tempfile.mkdtemp(prefix="bench-sweep-")
    os.environ["MNIST_MIRROR"] = str(Path(args.mirror).resolve())  # the administrator's mirror: allowed
    sys.path.insert(0, str(ROOT))
    from rich.console import Console

    from cli import stack
    from cli.airflow_api import task_instances
    from cli.runs import run_sweep
    from tasks.config import load_config
    from tasks.names import DAG_ID

    config = load_config()
    console = Console(file=io.StringIO())  # the run's progress is not the benchmark's output
    try:
        stack.up(config, port=0)
        conf = {"hidden_channels": args.hidden_channels, "mnist_mirror": str(Path(args.mirror).resolve())}
        outcome = run_sweep(conf, console, config)
        state = stack.read_state(stack.stack_paths(config))
        api = stack.api_for(state, stack.stack_paths(config))
        tis = task_instances(api, DAG_ID, outcome["run_id"])
    finally:
        stack.down(config)
    tasks = sorted(
        (
            {"task_id": ti["task_id"], "map_index": ti["map_index"], "state": ti["state"], "seconds": _seconds(ti)}
            for ti in tis
        ),
        key=lambda task: (task["task_id"], task["map_index"]),
    )
    by_task = {task["task_id"]: task["seconds"] for task in tasks if task["map_index"] < 0}
    result = {
        "state": outcome["state"],
        "sweep_seconds": outcome["seconds"],
        "monitor_seconds": by_task.get("monitor"),
        "training_seconds": max((t["seconds"] or 0 for t in tasks if t["task_id"] == "train"), default=None),
        "best": outcome["best"] and {k: outcome["best"][k] for k in ("hidden_channels", "test_accuracy")},
        "jobs": len(args.hidden_channels),
        "cpus": config.cpus,
        "targets": {"sweep_seconds": 60, "monitor_seconds": 10},
        "tasks": tasks,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(
        json.dumps(
            {
                key: result[key]
                for key in ("state", "sweep_seconds", "monitor_seconds", "training_seconds", "best", "cpus")
            }
        )
    )


if __name__ == "__main__":
    main()
