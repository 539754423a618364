"""The seed sweep end to end in local mode: `mnist_sweep` under `dag.test()`, timed, written as JSON.

Five training jobs (hidden_channels 2, 5, 10, 20, 32; the seed's settings, 2 epochs) on the official MNIST from a
mirror directory, with everything else the DAG does: verify, validate, upload to the local S3 (moto server,
started here), select, deploy the local endpoint, report. Runs in a fresh Airflow home and state directory.

    python bench/bench_sweep.py --mirror ../shared/mnist --out bench/results/sweep.json

Note: `dag.test()` runs one task at a time, so the jobs run one after the other here, each with the threads the
pool would give it when they share the machine; under the scheduler they run side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mirror", required=True, help="directory with the four official MNIST files")
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--hidden-channels", type=int, nargs="+", default=[2, 5, 10, 20, 32])
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    os.environ.update(
        {
            "AIRFLOW_HOME": str(home / "airflow"),
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "MNIST_PIPELINE_STATE_DIR": str(home / "state"),
            "MNIST_PIPELINE_BACKEND": "local",
            "MNIST_CACHE": str(home / "cache"),
        }
    )
    sys.path.insert(0, str(ROOT))
    from tasks.local_aws import LOCAL_CREDENTIALS, connection_uri, start_moto_server

    os.environ.update(LOCAL_CREDENTIALS)
    subprocess.run([Path(sys.executable).with_name("airflow"), "db", "migrate"], check=True, capture_output=True)
    moto, endpoint_url = start_moto_server(log_path=home / "moto.log")
    os.environ["AIRFLOW_CONN_AWS_DEFAULT"] = connection_uri(endpoint_url)
    try:
        from airflow.dag_processing.dagbag import DagBag

        from tasks.config import load_config
        from tasks.local_endpoints import stop_all

        dag = DagBag(str(ROOT / "dags")).dags["mnist_sweep"]
        conf = {"hidden_channels": args.hidden_channels, "mnist_mirror": str(Path(args.mirror).resolve())}
        started = time.monotonic()
        run = dag.test(run_conf=conf)
        seconds = time.monotonic() - started
        stop_all(load_config())
        tasks = [
            {"task_id": ti.task_id, "map_index": ti.map_index, "state": str(ti.state),
             "seconds": round((ti.end_date - ti.start_date).total_seconds(), 1)}
            for ti in sorted(run.get_task_instances(), key=lambda ti: ti.start_date)
            if ti.start_date and ti.end_date
        ]  # fmt: skip
        result = {
            "state": str(run.state),
            "sweep_seconds": round(seconds, 1),
            "training_seconds": round(sum(t["seconds"] for t in tasks if t["task_id"] == "train_local"), 1),
            "jobs": len(args.hidden_channels),
            "cpus": load_config().cpus,
            "tasks": tasks,
        }
    finally:
        moto.kill()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({key: result[key] for key in ("state", "sweep_seconds", "training_seconds", "jobs", "cpus")}))


if __name__ == "__main__":
    main()
