"""Load-test the local endpoint server against a naive reference server, in the same run, and write JSON.

Single-image JSON requests at 8 and 64 concurrent connections, driven by wrk (its own latency histogram,
through bench/post.lua), for `python -m inference.serve` (metrics published to a local CloudWatch, as in local
mode) and for bench/reference_server.py; then the time of one request of 1,000 images (28x28 JSON; for the
project also as .npy): the server's own time from its Server-Timing header, and the round trip.
Targets on a 2-core machine: >= 3,500 req/s with p99 <= 10 ms at 8 connections, <= 50 ms for 1,000 images.

`runtime`: the path boto3 takes, InvokeEndpoint through the local SageMaker service (an endpoint created through
its API, serving the same artifact), every request signed (SigV4, by the pipeline's user) and checked and authorized
by the runtime as AWS does. Targets: >= 5,000 req/s with p99 <= 10 ms at 8 connections, and at least half of the
server's own `project.c8` in the same run.

`runtime_capture`: the same at 8 connections, to a second endpoint of the same service whose config captures every
invocation's input and output (DataCaptureConfig at 100%, InputAndOutput, JSON) to the local S3, run in turn with
the first endpoint (CAPTURE_PAIRS pairs of runs, so that both meet the same moments of a shared machine), and the
capture's counts after them (local_sagemaker.capture). Target: the median of the pairs' ratios at least 0.9.

    python bench/bench_endpoint.py --out bench/results/endpoint.json [--model-dir DIR] [--duration 10]

Without --model-dir it serves an untrained seed_cnn (hidden_channels 10): serving speed does not depend on the
weights. The load generator shares the machine with the servers, as it would with any client here.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from results_file import write_result  # noqa: E402

from cli.local_aws import StackKeys, start_scratch_aws  # noqa: E402
from inference.artifact import add_code  # noqa: E402
from local_aws import LOCAL_REGION  # noqa: E402
from local_sagemaker.processes import free_port, wait_for_http  # noqa: E402

TARGETS = {"c8_rps": 3500, "c8_p99_ms": 10.0, "batch1000_ms": 50.0}
RUNTIME_TARGETS = {"c8_rps": 5000, "c8_p99_ms": 10.0, "c8_share_of_project": 0.5}
CAPTURE_TARGETS = {"c8_share_of_runtime": 0.9}
CAPTURE_PAIRS = 3
# The capture endpoint's DataCaptureConfig: every invocation, both sides, its JSON bodies as JSON text.
DATA_CAPTURE = {
    "EnableCapture": True,
    "InitialSamplingPercentage": 100,
    "DestinationS3Uri": "s3://bench/capture",
    "CaptureOptions": [{"CaptureMode": "InputAndOutput"}],
    "CaptureContentTypeHeader": {"JsonContentTypes": ["application/json"]},
}
CONNECTIONS = (8, 64)


def require_wrk() -> str:
    wrk = shutil.which("wrk")
    if wrk is None:
        sys.exit("bench_endpoint: the load generator wrk is not installed; install it with `apt-get install -y wrk`")
    return wrk


def untrained_artifact(directory: Path, hidden_channels: int = 10) -> Path:
    import torch

    from training.engine import model_config
    from training.models import NUM_CLASSES, build_model

    kwargs = {"hidden_channels": hidden_channels, "kernel_size": 5, "dropout": 0.2}
    torch.save(build_model("seed_cnn", **kwargs).state_dict(), directory / "model.pth")
    (directory / "model_config.json").write_text(json.dumps(model_config("seed_cnn", kwargs, NUM_CLASSES)))
    add_code(directory)
    return directory


@contextlib.contextmanager
def running(command: list[str], port: int, env: dict, log_path: Path):
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        try:
            wait_for_http(f"http://127.0.0.1:{port}/ping", timeout=180, process=process)
        except (RuntimeError, TimeoutError) as exc:
            sys.exit(f"bench_endpoint: {exc}; its log ends:\n{log_path.read_text()[-3000:]}")
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=30)


def wrk_run(wrk: str, url: str, body_path: Path, connections: int, seconds: int, headers: Path | None = None) -> dict:
    command = [
        wrk,
        "-t1",
        f"-c{connections}",
        f"-d{seconds}s",
        "--timeout",
        "10s",
        "-s",
        str(ROOT / "bench" / "post.lua"),
        url,
        "--",
        str(body_path),
        "application/json",
        *([str(headers)] if headers else []),
    ]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    result = json.loads(output.strip().splitlines()[-1])
    errors = sum(result["errors"].values())
    return {
        "rps": round(result["requests"] / result["duration_us"] * 1e6, 1),
        "p50_ms": round(result["p50_us"] / 1000, 3),
        "p99_ms": round(result["p99_us"] / 1000, 3),
        "max_ms": round(result["max_us"] / 1000, 3),
        "requests": result["requests"],
        "errors": errors,
    }


def batch_ms(url: str, body: bytes, content_type: str = "application/json", repeats: int = 7) -> dict:
    """One request of many images, repeated on a kept-alive connection: the median round trip (which includes
    sending a 3 MB body over loopback and the client's own work) and, where the server says it in its
    Server-Timing header, the median of its own time (reading the request plus the handler)."""
    round_trips, server_times = [], []
    with httpx.Client(base_url=url, timeout=60) as client:
        for attempt in range(repeats + 2):
            started = time.perf_counter()
            reply = client.post("/invocations", content=body, headers={"Content-Type": content_type})
            elapsed = (time.perf_counter() - started) * 1000
            reply.raise_for_status()
            if attempt < 2:  # the first requests warm the server up
                continue
            round_trips.append(elapsed)
            if timing := reply.headers.get("server-timing"):
                server_times.append(sum(float(part.split(";dur=")[1]) for part in timing.split(", ")))
    return {
        "round_trip_ms": round(statistics.median(round_trips), 2),
        "server_ms": round(statistics.median(server_times), 2) if server_times else None,
    }


def measure(wrk: str, url: str, body_path: Path, seconds: int, headers: Path | None = None) -> dict:
    """``url``: where the invocations go (the container's /invocations, or the runtime's InvokeEndpoint path);
    ``headers``: a file of more headers to send (the runtime's SigV4 signature)."""
    wrk_run(wrk, url, body_path, 8, 2, headers)  # warm-up
    return {f"c{n}": wrk_run(wrk, url, body_path, n, seconds, headers) for n in CONNECTIONS}


def signature(url: str, body_path: Path, key, directory: Path, name: str = "signature") -> Path:
    """A file of the SigV4 headers of InvokeEndpoint at ``url`` with the body in ``body_path``, signed with ``key``
    as boto3 signs it: valid for 15 minutes, as any signed request is (the runtime checks each one again)."""
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    netloc = url.split("/")[2]
    request = AWSRequest(
        "POST", url, data=body_path.read_bytes(), headers={"Content-Type": "application/json", "Host": netloc}
    )
    SigV4Auth(Credentials(key.access_key_id, key.secret_access_key), "sagemaker", LOCAL_REGION).add_auth(request)
    path = directory / f"{name}.headers"
    path.write_text(
        "".join(
            f"{name}: {value}\n"
            for name, value in request.headers.items()
            if name.lower() in ("authorization", "x-amz-date")
        )
    )
    return path


@contextlib.contextmanager
def runtime_endpoint(model_dir: Path, moto_url: str, scratch: Path, workers: int | None, keys: StackKeys):
    """The local SageMaker service with two endpoints serving ``model_dir``, ``bench`` and ``bench-capture`` (its
    config with DATA_CAPTURE); yields the service and the InvokeEndpoint URL of each by name."""
    import boto3

    from local_sagemaker import launch
    from tasks.config import PipelineConfig

    s3 = boto3.client("s3", endpoint_url=moto_url)
    s3.create_bucket(Bucket="bench")
    archive = scratch / "model.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(model_dir.rglob("*")):
            if "__pycache__" not in path.parts:
                tar.add(path, arcname=str(path.relative_to(model_dir)), recursive=False)
    s3.upload_file(str(archive), "bench", "model.tar.gz")
    started = launch.start(
        scratch / "sagemaker",
        moto_url,
        credentials=keys.sagemaker.environment(),
        cpus=workers or 0,
        metrics_interval=10,
    )
    try:
        sagemaker = boto3.client("sagemaker", endpoint_url=started.url)
        sagemaker.create_model(
            ModelName="bench",
            ExecutionRoleArn=PipelineConfig().role_arn,  # the scratch account's execution role
            PrimaryContainer={"Image": "pytorch-inference", "ModelDataUrl": "s3://bench/model.tar.gz"},
        )
        variants = [{"VariantName": "AllTraffic", "ModelName": "bench", "InitialInstanceCount": 1}]
        sagemaker.create_endpoint_config(EndpointConfigName="bench", ProductionVariants=variants)
        sagemaker.create_endpoint_config(
            EndpointConfigName="bench-capture", ProductionVariants=variants, DataCaptureConfig=DATA_CAPTURE
        )
        names = ("bench", "bench-capture")
        for name in names:
            sagemaker.create_endpoint(EndpointName=name, EndpointConfigName=name)
        for name in names:
            sagemaker.get_waiter("endpoint_in_service").wait(EndpointName=name, WaiterConfig={"Delay": 1})
        yield started, {name: f"{started.runtime_url}/endpoints/{name}/invocations" for name in names}
    finally:
        launch.stop(started.record)


def capture_run(
    wrk: str, service_url: str, urls: dict[str, str], body_path: Path, seconds: int, headers: dict[str, Path]
) -> dict:
    """c8 runs against ``bench`` and ``bench-capture`` in turn, CAPTURE_PAIRS times, so that both see the same
    moments of a shared machine; the median run of each and the median of the pairs' ratios. Then the capture's
    counts once it has written all it took (or 30 s have passed): every request answered must be a record written,
    none dropped."""
    from local_sagemaker.capture import COUNTS_PATH

    wrk_run(wrk, urls["bench-capture"], body_path, 8, 2, headers["bench-capture"])  # warm-up
    pairs = [
        {name: wrk_run(wrk, urls[name], body_path, 8, seconds, headers[name]) for name in ("bench", "bench-capture")}
        for _ in range(CAPTURE_PAIRS)
    ]
    deadline = time.monotonic() + 30
    while True:
        counts = httpx.get(f"{service_url}{COUNTS_PATH}").json().get("bench-capture", {})
        dropped = sum(counts.get("Dropped", {}).values())
        if counts.get("Written", 0) + dropped >= counts.get("Captured", 0) or time.monotonic() > deadline:
            break
        time.sleep(0.5)

    def median_run(name: str) -> dict:
        return sorted((pair[name] for pair in pairs), key=lambda run: run["rps"])[len(pairs) // 2]

    ratios = [round(pair["bench-capture"]["rps"] / pair["bench"]["rps"], 3) for pair in pairs]
    return {
        "c8": median_run("bench-capture"),
        "runtime_c8": median_run("bench"),
        "c8_ratios": ratios,
        "c8_ratio": statistics.median(ratios),
        "capture_counts": counts,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--model-dir", help="a model artifact directory (default: an untrained seed_cnn)")
    parser.add_argument("--duration", type=int, default=10, help="seconds per load run")
    parser.add_argument("--workers", type=int, default=None, help="the project server's processes")
    args = parser.parse_args()
    wrk = require_wrk()

    with tempfile.TemporaryDirectory(prefix="bench-endpoint-") as scratch:
        scratch = Path(scratch)
        model_dir = Path(args.model_dir) if args.model_dir else untrained_artifact(scratch)
        images = np.random.default_rng(0).integers(0, 256, (1000, 28, 28))
        single = scratch / "single.json"
        single.write_text(json.dumps({"instances": images[:1].tolist()}))
        batch = json.dumps({"instances": images.tolist()}).encode()
        npy_batch = io.BytesIO()
        np.save(npy_batch, images.astype(np.uint8))

        keys = StackKeys.new()
        moto, moto_url = start_scratch_aws(scratch, keys, log_path=scratch / "local-aws.log")
        os.environ.update(
            {**keys.admin.environment(), "AWS_DEFAULT_REGION": os.environ.get("AWS_DEFAULT_REGION", LOCAL_REGION)}
        )
        # The server reaches the local CloudWatch as the SageMaker container reaches AWS: by its environment.
        env = {**os.environ, "AWS_ENDPOINT_URL": moto_url}
        load_before = os.getloadavg()
        try:
            port = free_port()
            project = [
                sys.executable,
                "-m",
                "inference.serve",
                "--model-dir",
                str(model_dir),
                "--port",
                str(port),
                "--endpoint-name",
                "bench",
            ]
            if args.workers:
                project += ["--workers", str(args.workers)]
            with running(project, port, env, scratch / "project.log") as url:
                results = {"project": measure(wrk, f"{url}/invocations", single, args.duration)}
                results["project"]["batch1000"] = batch_ms(url, batch)
                results["project"]["batch1000_npy"] = batch_ms(url, npy_batch.getvalue(), "application/x-npy")
            port = free_port()
            reference = [
                sys.executable,
                str(ROOT / "bench" / "reference_server.py"),
                "--model-dir",
                str(model_dir),
                "--port",
                str(port),
            ]
            with running(reference, port, env, scratch / "reference.log") as url:
                results["reference"] = measure(wrk, f"{url}/invocations", single, args.duration)
                results["reference"]["batch1000"] = batch_ms(url, batch)
            with runtime_endpoint(model_dir, moto_url, scratch, args.workers, keys) as (service, urls):
                url = urls["bench"]
                results["runtime"] = measure(
                    wrk, url, single, args.duration, signature(url, single, keys.pipeline, scratch)
                )
                signed = {name: signature(url, single, keys.pipeline, scratch, name) for name, url in urls.items()}
                results["runtime_capture"] = capture_run(wrk, service.url, urls, single, args.duration, signed)
        finally:
            moto.terminate()
            moto.wait()

    project, reference, runtime = results["project"], results["reference"], results["runtime"]
    capture = results["runtime_capture"]
    # The server's own time where it says it (the project's), else the round trip (the reference's).
    project["batch1000_ms"] = project["batch1000"]["server_ms"]
    reference["batch1000_ms"] = reference["batch1000"]["round_trip_ms"]
    cpus = len(os.sched_getaffinity(0))
    report = {
        **results,
        "ratio_vs_reference": {
            f"c{n}_rps": round(project[f"c{n}"]["rps"] / reference[f"c{n}"]["rps"], 2) for n in CONNECTIONS
        },
        "runtime_share_of_project": {
            f"c{n}_rps": round(runtime[f"c{n}"]["rps"] / project[f"c{n}"]["rps"], 2) for n in CONNECTIONS
        },
        "runtime_capture_share_of_runtime": {"c8_rps": round(capture["c8_ratio"], 2)},
        "targets": {**TARGETS, "runtime": RUNTIME_TARGETS, "runtime_capture": CAPTURE_TARGETS},
        "meets_targets": {
            "c8_rps": project["c8"]["rps"] >= TARGETS["c8_rps"],
            "c8_p99_ms": project["c8"]["p99_ms"] <= TARGETS["c8_p99_ms"],
            "batch1000_ms": project["batch1000_ms"] <= TARGETS["batch1000_ms"],
            "runtime": {
                "c8_rps": runtime["c8"]["rps"] >= RUNTIME_TARGETS["c8_rps"],
                "c8_p99_ms": runtime["c8"]["p99_ms"] <= RUNTIME_TARGETS["c8_p99_ms"],
                "c8_share_of_project": runtime["c8"]["rps"]
                >= RUNTIME_TARGETS["c8_share_of_project"] * project["c8"]["rps"],
            },
            "runtime_capture": {
                "c8_share_of_runtime": capture["c8_ratio"] >= CAPTURE_TARGETS["c8_share_of_runtime"],
            },
        },
        # Other work on the machine shows here: the figures are only as quiet as the machine was.
        "machine": {"cpus": cpus, "load_average_before": load_before, "load_average_after": os.getloadavg()},
        "settings": {
            "duration_s": args.duration,
            "workers": args.workers or cpus,
            "model": args.model_dir or "untrained seed_cnn, hidden_channels 10",
            "load_generator": "wrk -t1, bench/post.lua",
        },
    }
    write_result(args.out, report)


if __name__ == "__main__":
    main()
