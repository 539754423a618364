"""Batch transform over the 10,000 official MNIST test images on the local SageMaker service, beside an endpoint of
the same model invoked through boto3 for the same images, in the same run; writes JSON.

moto and the local SageMaker service are started as the local stack starts them; the model (an untrained seed_cnn,
hidden_channels 10, unless --model-dir: serving speed does not depend on the weights; either way with this checkout's
handler in code/) goes to S3 as model.tar.gz and into the service by CreateModel. Two layouts of the test images,
one transform job each:

- `npy`: 10 .npy objects of 1,000 images (SplitType None: one request per object), MaxConcurrentTransforms 4; once
  in float32 and once in bfloat16 (the job's Environment sets MNIST_INFERENCE_PRECISION), run by run in turn;
- `csv`: one CSV object of 10,000 rows (SplitType Line, MultiRecord: as many rows per request as fit in 6 MB),
  MaxConcurrentTransforms 2.

Each job's figures are the service's own, from the line its log ends with in CloudWatch Logs: the transform phase
(first request sent to last answer received: no server start, no S3 transfer) and end to end (download, server
start, transform, upload). The endpoint (one instance, as many workers as the transform's server) is invoked with
boto3's sagemaker-runtime for the same images: one image per request from 4 threads, and 1,000 images (.npy) per
request from 2 threads, after a request each to warm it up (the transform's phase starts on a fresh server: its
first large batches, slower, count). Target: >= 20,000 images/s of model time for the best layout on a 2-core
machine.

    python bench/bench_transform.py --out bench/results/transform.json [--mirror ../shared/mnist] [--model-dir DIR]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_endpoint import untrained_artifact  # noqa: E402
from results_file import write_result  # noqa: E402

from cli.local_aws import StackKeys, start_scratch_aws  # noqa: E402
from inference.artifact import add_code, load_handler  # noqa: E402
from local_aws import LOCAL_REGION  # noqa: E402
from training.mnist_idx import load_mnist  # noqa: E402

TARGET_IMAGES_PER_SECOND = 20_000
BUCKET = "bench-transform"
LOG_GROUP = "/aws/sagemaker/TransformJobs"
NPY_PARTS = 10
SINGLE_THREADS, BATCH_THREADS, BATCH = 4, 2, 1000


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def labels_of(body: bytes) -> list[int]:
    """The labels of an output: the answers (JSON documents) back to back, as AssembleWith None leaves them."""
    decoder, text, found, at = json.JSONDecoder(), body.decode(), [], 0
    while at < len(text):
        document, at = decoder.raw_decode(text, at)
        found += [prediction["label"] for prediction in document["predictions"]]
    return found


def run_job(
    sagemaker,
    s3,
    logs,
    name: str,
    prefix: str,
    content_type: str,
    outputs: list[str],
    environment: dict[str, str] | None = None,
    **settings,
) -> dict:
    """One transform job over ``prefix``; its figures, and the labels of ``outputs`` (keys under its output path)."""
    sagemaker.create_transform_job(
        Environment=environment or {},
        TransformJobName=name,
        ModelName="bench",
        TransformInput={
            "DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": f"s3://{BUCKET}/{prefix}"}},
            "ContentType": content_type,
            "SplitType": settings.pop("SplitType", "None"),
        },
        TransformOutput={"S3OutputPath": f"s3://{BUCKET}/out/{name}/", "Accept": "application/json"},
        TransformResources={"InstanceType": "ml.m5.large", "InstanceCount": 1},
        **settings,
    )
    while (described := sagemaker.describe_transform_job(TransformJobName=name))["TransformJobStatus"] in (
        "InProgress",
        "Stopping",
    ):
        time.sleep(0.2)
    if described["TransformJobStatus"] != "Completed":
        sys.exit(f"bench_transform: job {name} {described['TransformJobStatus']}: {described.get('FailureReason')}")
    (stream,) = logs.describe_log_streams(logGroupName=LOG_GROUP, logStreamNamePrefix=f"{name}/")["logStreams"]
    events = logs.get_log_events(logGroupName=LOG_GROUP, logStreamName=stream["logStreamName"], startFromHead=True)
    (figures,) = [
        json.loads(event["message"].removeprefix("Figures: "))
        for event in events["events"]
        if event["message"].startswith("Figures: ")
    ]
    labels = [
        label
        for key in outputs
        for label in labels_of(s3.get_object(Bucket=BUCKET, Key=f"out/{name}/{key}")["Body"].read())
    ]
    return {
        "images": figures["images"],
        "requests": figures["requests"],
        "transform_seconds": figures["transform_seconds"],
        "images_per_second": figures["images_per_second"],
        "end_to_end_seconds": figures["end_to_end_seconds"],
        "describe_seconds": round((described["TransformEndTime"] - described["CreationTime"]).total_seconds(), 2),
        "settings": {
            key: described.get(key)
            for key in ("MaxConcurrentTransforms", "MaxPayloadInMB", "BatchStrategy", "Environment")
        },
        "labels": labels,
    }


def invoke_all(url: str, bodies: list[bytes], threads: int) -> tuple[float, list[list[int]]]:
    """Every body through InvokeEndpoint (boto3), ``threads`` at a time; the seconds and each answer's labels."""
    import boto3
    from botocore.config import Config

    answers: list[list[int] | None] = [None] * len(bodies)

    def work(client, indices: range) -> None:
        for index in indices:
            reply = client.invoke_endpoint(EndpointName="bench", Body=bodies[index], ContentType="application/x-npy")
            answers[index] = labels_of(reply["Body"].read())

    # A client per thread, made and used once before the clock starts: no set-up, and the server's first request
    # of this kind, in the figure.
    clients = [
        boto3.client("sagemaker-runtime", endpoint_url=url, config=Config(retries={"total_max_attempts": 1}))
        for _ in range(threads)
    ]
    for client in clients:
        work(client, range(1))
    workers = [
        threading.Thread(target=work, args=(client, range(start, len(bodies), threads)))
        for start, client in enumerate(clients)
    ]
    began = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return time.perf_counter() - began, answers


def endpoint_figures(sagemaker, runtime_url: str, images: np.ndarray) -> dict:
    sagemaker.create_endpoint_config(
        EndpointConfigName="bench",
        ProductionVariants=[{"VariantName": "AllTraffic", "ModelName": "bench", "InitialInstanceCount": 1}],
    )
    sagemaker.create_endpoint(EndpointName="bench", EndpointConfigName="bench")
    sagemaker.get_waiter("endpoint_in_service").wait(EndpointName="bench", WaiterConfig={"Delay": 1})
    figures = {}
    for kind, bodies, threads in (
        ("single", [npy(image) for image in images], SINGLE_THREADS),
        ("batch1000", [npy(images[i : i + BATCH]) for i in range(0, len(images), BATCH)], BATCH_THREADS),
    ):
        seconds, answers = invoke_all(runtime_url, bodies, threads)
        figures[kind] = {
            "requests": len(bodies),
            "threads": threads,
            "seconds": round(seconds, 3),
            "images_per_second": round(len(images) / seconds),
            "labels": [label for answer in answers for label in answer],
        }
    return figures


def trained_artifact(model_dir: Path, scratch: Path) -> Path:
    """A copy of a trained model's weights and configuration with this checkout's handler (the artifact's own
    code/ is what its training job copied then)."""
    directory = scratch / "model"
    directory.mkdir()
    for name in ("model.pth", "model_config.json"):
        shutil.copy(model_dir / name, directory / name)
    add_code(directory)
    return directory


def median_job(jobs: list[dict]) -> dict:
    """The job of median speed, with every run's images/s beside it."""
    ranked = sorted(jobs, key=lambda job: job["images_per_second"])
    return {**ranked[len(ranked) // 2], "runs_images_per_second": [job["images_per_second"] for job in jobs]}


def main() -> None:
    import boto3

    from local_sagemaker import launch
    from tasks.config import PipelineConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--mirror", default=str(ROOT.parent / "shared" / "mnist"), help="the official MNIST files")
    parser.add_argument("--model-dir", help="a model artifact directory (default: an untrained seed_cnn)")
    parser.add_argument("--repeats", type=int, default=3, help="transform jobs of each layout; the median is kept")
    args = parser.parse_args()
    data = load_mnist(Path(args.mirror))
    images, labels = data["test_images"], data["test_labels"]
    assert len(images) == 10_000, f"{args.mirror}: expected the 10,000 official test images, got {len(images)}"

    with tempfile.TemporaryDirectory(prefix="bench-transform-") as scratch:
        scratch = Path(scratch)
        model_dir = trained_artifact(Path(args.model_dir), scratch) if args.model_dir else untrained_artifact(scratch)
        handler = load_handler(model_dir)  # its names for the precision setting
        keys = StackKeys.new()
        moto, moto_url = start_scratch_aws(scratch, keys, log_path=scratch / "local-aws.log")
        os.environ.update({**keys.admin.environment(), "AWS_DEFAULT_REGION": LOCAL_REGION})
        load_before = os.getloadavg()
        try:
            s3 = boto3.client("s3", endpoint_url=moto_url)
            s3.create_bucket(Bucket=BUCKET)
            archive = io.BytesIO()
            with tarfile.open(fileobj=archive, mode="w:gz") as tar:
                for path in sorted(model_dir.rglob("*")):
                    if "__pycache__" not in path.parts:
                        tar.add(path, arcname=str(path.relative_to(model_dir)), recursive=False)
            s3.put_object(Bucket=BUCKET, Key="model/model.tar.gz", Body=archive.getvalue())
            parts = np.array_split(images, NPY_PARTS)
            for index, part in enumerate(parts):
                s3.put_object(Bucket=BUCKET, Key=f"in/npy/part-{index:02d}.npy", Body=npy(part))
            rows = io.StringIO()
            np.savetxt(rows, images.reshape(len(images), -1), fmt="%d", delimiter=",")
            s3.put_object(Bucket=BUCKET, Key="in/csv/test.csv", Body=rows.getvalue().encode())
            started = launch.start(
                scratch / "sagemaker", moto_url, credentials=keys.sagemaker.environment(), metrics_interval=10
            )
            try:
                sagemaker = boto3.client("sagemaker", endpoint_url=started.url)
                logs = boto3.client("logs", endpoint_url=moto_url)
                sagemaker.create_model(
                    ModelName="bench",
                    ExecutionRoleArn=PipelineConfig().role_arn,  # the scratch account's role
                    PrimaryContainer={
                        "Image": "pytorch-inference",
                        "ModelDataUrl": f"s3://{BUCKET}/model/model.tar.gz",
                    },
                )
                # Each layout several times, the median kept: one run's figure depends on what else the machine does.
                # The two precisions take turns, so that a busy spell slows both.
                npy_jobs = {precision: [] for precision in handler.predictor.PRECISIONS}
                for run in range(args.repeats):
                    for precision, jobs in npy_jobs.items():
                        jobs.append(
                            run_job(
                                sagemaker,
                                s3,
                                logs,
                                f"bench-npy-{precision}-{run}",
                                "in/npy/",
                                "application/x-npy",
                                [f"part-{i:02d}.npy.out" for i in range(NPY_PARTS)],
                                {handler.predictor.PRECISION_VARIABLE: precision},
                                MaxConcurrentTransforms=4,
                            )
                        )
                npy_job, npy_bf16_job = (median_job(jobs) for jobs in npy_jobs.values())
                csv_job = median_job(
                    [
                        run_job(
                            sagemaker,
                            s3,
                            logs,
                            f"bench-csv-{run}",
                            "in/csv/",
                            "text/csv",
                            ["test.csv.out"],
                            SplitType="Line",
                            BatchStrategy="MultiRecord",
                            MaxPayloadInMB=6,
                            MaxConcurrentTransforms=2,
                        )
                        for run in range(args.repeats)
                    ]
                )
                endpoint = endpoint_figures(sagemaker, started.runtime_url, images)
            finally:
                launch.stop(started.record)
        finally:
            moto.terminate()
            moto.wait()

    # Every way gave each image the same label (the same model), and as many labels as images.
    reference = endpoint["single"]["labels"]
    agreement = {
        name: round(float(np.mean(np.array(figures.pop("labels")) == reference)), 4)
        for name, figures in (
            ("transform_npy", npy_job),
            ("transform_npy_bfloat16", npy_bf16_job),
            ("transform_csv", csv_job),
            ("endpoint_batch1000", endpoint["batch1000"]),
        )
    }
    endpoint["single"].pop("labels")
    best = max(npy_job["images_per_second"], npy_bf16_job["images_per_second"], csv_job["images_per_second"])
    report = {
        "transform": {"npy": npy_job, "npy_bfloat16": npy_bf16_job, "csv": csv_job},
        "endpoint": endpoint,
        "ratio": {
            "transform_npy_bfloat16_vs_float32": round(
                npy_bf16_job["images_per_second"] / npy_job["images_per_second"], 2
            ),
            "transform_npy_vs_endpoint_single": round(
                npy_job["images_per_second"] / endpoint["single"]["images_per_second"], 1
            ),
            "transform_npy_vs_endpoint_batch1000": round(
                npy_job["images_per_second"] / endpoint["batch1000"]["images_per_second"], 2
            ),
        },
        "label_agreement_with_endpoint_single": agreement,
        # Of the model's labels against the test labels: chance (~0.1) for the untrained model.
        "model_accuracy": round(float(np.mean(np.array(reference) == labels)), 4),
        "target_images_per_second": TARGET_IMAGES_PER_SECOND,
        "meets_target": best >= TARGET_IMAGES_PER_SECOND,
        "machine": {
            "cpus": len(os.sched_getaffinity(0)),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
        },
        "settings": {
            "model": args.model_dir
            or "untrained seed_cnn, hidden_channels 10 (serving speed does not depend on the weights)",
            "images": len(images),
            "npy_objects": NPY_PARTS,
            "endpoint_single_threads": SINGLE_THREADS,
            "endpoint_batch_threads": BATCH_THREADS,
            "endpoint_batch_images": BATCH,
        },
    }
    write_result(args.out, report)


if __name__ == "__main__":
    main()
