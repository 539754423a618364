"""The drift check (tasks/drift.py: check) over 100,000 captured requests, end to end, as JSON.

    .venv/bin/python bench/bench_drift_check.py --mirror ../shared/mnist --out bench/results/drift_check.json

1. A real model answers: seed_cnn trained one epoch on the official training set (bench_drift.train_model).
2. 100,000 invocations, the official test digits ten times over, one JSON request each with the model's JSON answer
   (as the handler's output_fn writes it), go through the local SageMaker service's own data capture
   (local_sagemaker/capture.py: DataCapture, its request path and its writer) into the local AWS's S3: objects of
   1,000 records under <s3_root>/capture/<endpoint>/AllTraffic/yyyy/mm/dd/hh/, as an endpoint at 100% writes them.
3. The check, timed whole: the position read, the objects listed and read, every input decoded by the model
   handler's input_fn, the six figures, the report (Markdown, HTML, the atypical inputs' PNG) written here and to
   S3, the figures published to CloudWatch, the position moved. Median of three runs, the position removed between
   them, each run a new run id. Target: under 30 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from results_file import write_result  # noqa: E402

from bench.bench_drift import train_model  # noqa: E402
from training.mnist_idx import load_mnist  # noqa: E402

REQUESTS = 100_000
TARGET_S = 30.0
ENDPOINT = "bench-drift"
BUCKET = "bench-drift"


async def capture(settings, images: np.ndarray, probabilities: np.ndarray, put) -> dict:
    """Every image as one captured invocation, through the runtime's DataCapture and its writer; its counts."""
    from local_sagemaker.capture import BATCH_RECORDS, DataCapture

    data_capture = DataCapture(roles=None, endpoint_arn=lambda name: name, put=put)
    data_capture.start()
    for index, (image, answer) in enumerate(zip(images, probabilities, strict=True)):
        body = json.dumps({"instances": [image.tolist()]}).encode()
        output = json.dumps({"predictions": [{"label": int(answer.argmax()), "probabilities": answer.tolist()}]})
        request = SimpleNamespace(headers={"Content-Type": "application/json"}, fields={}, body=body)
        reply = SimpleNamespace(headers={"content-type": "application/json"}, body=output.encode())
        data_capture.record(ENDPOINT, settings, "AllTraffic", request, reply)
        if index % BATCH_RECORDS == BATCH_RECORDS - 1:
            await asyncio.sleep(0.05)  # the writer's turn, as the runtime's loop gives it between requests
    await data_capture.close()
    return data_capture.counts()[ENDPOINT]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mirror", default=str(ROOT.parent / "shared" / "mnist"), help="the official MNIST files")
    parser.add_argument("--out", required=True)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    from cli.local_aws import StackKeys, connection_uri, start_scratch_aws

    arrays = load_mnist(Path(args.mirror))
    answer, model = train_model(arrays, epochs=1, seed=0)
    test_images = arrays["test_images"]
    images = np.concatenate([test_images] * (REQUESTS // len(test_images)))
    probabilities = np.concatenate([answer(test_images)] * (REQUESTS // len(test_images)))

    with tempfile.TemporaryDirectory(prefix="bench-drift-check-") as scratch:
        scratch = Path(scratch)
        keys = StackKeys.new()
        moto, moto_url = start_scratch_aws(scratch, keys, log_path=scratch / "local-aws.log")
        os.environ.update(
            {
                **keys.admin.environment(),
                "AWS_DEFAULT_REGION": "us-east-1",
                "AIRFLOW_CONN_AWS_DEFAULT": connection_uri(moto_url, keys.admin),
                "MNIST_PIPELINE_BUCKET": BUCKET,
                "MNIST_PIPELINE_STATE_DIR": str(scratch / "state"),
                "AIRFLOW_HOME": str(scratch / "airflow"),  # the provider's hooks import Airflow: none of the user's
            }
        )
        try:
            import boto3

            from local_sagemaker.capture import settings as capture_settings
            from tasks.config import load_config
            from tasks.deployment import data_capture_config
            from tasks.drift import check

            config = load_config()
            s3 = boto3.client("s3", endpoint_url=moto_url)
            s3.create_bucket(Bucket=BUCKET)
            settings = capture_settings(data_capture_config(config, 100), config.role_arn)

            def put(role, source, bucket, key, body):
                s3.put_object(Bucket=bucket, Key=key, Body=body)

            started = time.perf_counter()
            counts = asyncio.run(capture(settings, images, probabilities, put))
            capture_seconds = time.perf_counter() - started
            assert counts["Written"] == REQUESTS and not counts["Dropped"], counts
            runs, results = [], []
            for run in range(args.runs):
                s3.delete_object(Bucket=BUCKET, Key=f"{config.prefix}/drift/{ENDPOINT}/position.json")
                started = time.perf_counter()
                results.append(check(config, ENDPOINT, f"bench__{run}", min_requests=500, max_requests=REQUESTS))
                runs.append(round(time.perf_counter() - started, 2))
        finally:
            moto.terminate()
            moto.wait()

    result = results[-1]
    assert result["requests"] == REQUESTS, result
    median = statistics.median(runs)
    report = {
        "requests": REQUESTS,
        "capture": {"objects": counts["Objects"], "written": counts["Written"], "seconds": round(capture_seconds, 1)},
        "check": {"runs_s": runs, "median_s": median, "target_s": TARGET_S, "meets_target": median < TARGET_S},
        "verdict": result["verdict"],
        "figures": result["figures"],
        "model": model,
        "machine": {"cpus": len(os.sched_getaffinity(0)), "load_average": os.getloadavg()},
    }
    write_result(args.out, report, report["check"])


if __name__ == "__main__":
    main()
