"""`mnist-pipeline sweep`: the seed's hidden_channels sweep, trained on this machine without Airflow or S3.

Each value is one run of the script-mode entry point (training/train.py) with the SageMaker SM_* environment,
through the local backend's `run_script`; jobs run in parallel with the cores split between them. Then the
trial table, as the seed's notebook showed it.
"""

from __future__ import annotations

import json
import logging
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tasks.config import load_config
from tasks.trials import format_trial_table, summarize_trial

log = logging.getLogger(__name__)

TRAINING_DIR = Path(__file__).resolve().parents[1] / "training"


class SweepError(RuntimeError):
    """A training job of the sweep failed; the message ends with the tail of its log."""


def train_one(hidden_channels: int, *, data: Path, out: Path, epochs: int, threads: int) -> dict:
    """Train one job (hidden_channels, seed settings otherwise); return its trial row."""
    from tasks.local_backend import run_script

    job_dir = out / f"hidden-channels-{hidden_channels}"
    job_log = job_dir / "train.log"
    job_dir.mkdir(parents=True, exist_ok=True)
    with job_log.open("w") as stream:

        def on_line(line: str) -> None:
            stream.write(line + "\n")
            if "Test Accuracy" in line:  # one progress line per epoch
                print(f"[hidden_channels {hidden_channels:>2}] {line.split(' ', 2)[-1]}", flush=True)

        result = run_script(
            "train.py",
            TRAINING_DIR,
            {"hidden_channels": str(hidden_channels), "epochs": str(epochs)},
            ml_dir=job_dir,
            channels={"training": data},
            job_name=f"sweep-hidden-channels-{hidden_channels}",
            cpus=threads,
            on_line=on_line,
        )
    if not result.ok:
        tail = "\n".join(result.log_tail[-15:])
        raise SweepError(f"hidden_channels {hidden_channels}: training failed (exit {result.returncode}):\n{tail}")
    metrics = json.loads((job_dir / "output" / "data" / "metrics.json").read_text())
    return summarize_trial(metrics, name=job_dir.name)


def run_sweep(
    hidden_channels: list[int], *, data: Path, out: Path, epochs: int = 2, parallel: int | None = None
) -> list[dict]:
    """Train every value, ``parallel`` jobs at a time, and return their trial rows in sweep order."""
    from tasks.local_backend import threads_per_job

    cpus = load_config().cpus
    parallel = parallel or max(1, cpus // 2)  # two threads a job use a small CPU best (fewer idle waits)
    threads = threads_per_job(cpus, parallel)
    print(f"Training {len(hidden_channels)} jobs, {parallel} at a time with {threads} thread(s) each, into {out}")
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        jobs = [
            pool.submit(train_one, value, data=data, out=out, epochs=epochs, threads=threads)
            for value in hidden_channels
        ]
        return [job.result() for job in jobs]


def _data_dir(directory: str | None) -> Path:
    """The given directory as is, else the verified download (from $MNIST_MIRROR, else the official mirrors)."""
    if directory:
        return Path(directory)
    from tasks.mnist_data import download_mnist

    return download_mnist()


def sweep_command(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        data = _data_dir(args.data)
        trials = run_sweep(args.hidden_channels, data=data, out=Path(args.out), epochs=args.epochs,
                           parallel=args.parallel)  # fmt: skip
    except (RuntimeError, ValueError, OSError) as exc:  # a bad mirror, a failed download or job: one clear line
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(format_trial_table(trials, title=f"hidden_channels sweep, {args.epochs} epochs"))
    return 0
