"""Content-addressed upload to S3 through the Airflow AWS connection, against moto server on 127.0.0.1.

Faults are real: a proxy between the hook and moto drops the connection or flips a byte of a request body.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import boto3
import pytest

from cli.local_aws import connection_uri
from tasks.config import load_config
from tasks.mnist_data import MANIFEST, UploadError, dataset_sha256, upload_dataset
from tasks.s3 import ContentAddressError
from tests.conftest import KEYS
from training.mnist_idx import MNIST_FILES, load_mnist, write_idx

TRAIN_IMAGES = MNIST_FILES["train_images"]
ROOT = Path(__file__).resolve().parents[1]


class FaultyProxy(BaseHTTPRequestHandler):
    """Forwards every request to moto, except that object PUTs beyond the first ``puts_allowed`` get their
    connection dropped (after ``blocked`` is set, when ``hold`` is set), and the PUT of a key ending in
    ``corrupt_suffix`` has one byte of its body flipped."""

    protocol_version = "HTTP/1.1"  # keep-alive and `Expect: 100-continue`, as botocore uses them
    upstream = ""
    puts_allowed = 1_000
    corrupt_suffix = None
    hold = False
    blocked = threading.Event()
    released = threading.Event()

    def _forward(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.command == "PUT" and "/" in self.path.strip("/"):
            if FaultyProxy.puts_allowed <= 0:
                if self.hold:
                    self.blocked.set()
                    self.released.wait(60)
                self.close_connection = True
                return
            FaultyProxy.puts_allowed -= 1
            if self.corrupt_suffix and self.path.split("?")[0].endswith(self.corrupt_suffix):
                body = body[:1000] + bytes([body[1000] ^ 0xFF]) + body[1001:]
        upstream = http.client.HTTPConnection(self.upstream, timeout=30)
        # The Host the client signed goes on as it was.
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("expect", "connection")}
        upstream.request(self.command, self.path, body=body, headers=headers)
        response = upstream.getresponse()
        payload = response.read()
        self.send_response(response.status)
        for key, value in response.getheaders():
            if key.lower() not in ("connection", "transfer-encoding", "content-length", "server", "date"):
                self.send_header(key, value)
        self.send_header("Content-Length", response.getheader("Content-Length") or str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)
        upstream.close()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

    def log_message(self, *args):
        pass


@pytest.fixture
def proxy(local_aws, monkeypatch):
    """An AWS connection `s3_proxy` that reaches moto through FaultyProxy, with botocore's retries off."""
    FaultyProxy.upstream = local_aws.removeprefix("http://")
    FaultyProxy.puts_allowed, FaultyProxy.corrupt_suffix, FaultyProxy.hold = 1_000, None, False
    FaultyProxy.blocked.clear()
    FaultyProxy.released.clear()
    server = ThreadingHTTPServer(("127.0.0.1", 0), FaultyProxy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    connection = json.loads(connection_uri(f"http://127.0.0.1:{server.server_port}", KEYS.admin))
    connection["extra"]["config_kwargs"] = {"retries": {"total_max_attempts": 1}}
    monkeypatch.setenv("AIRFLOW_CONN_S3_PROXY", json.dumps(connection))
    yield FaultyProxy
    FaultyProxy.released.set()
    server.shutdown()
    server.server_close()


@pytest.fixture
def config(local_aws):
    """A bucket of its own, made beforehand as a deployment's bucket is (the pipeline never creates one)."""
    config = load_config(bucket=f"mnist-{uuid.uuid4().hex[:12]}", prefix="mnist-sweep")
    boto3.client("s3", endpoint_url=local_aws).create_bucket(Bucket=config.bucket)
    return config


@pytest.fixture
def s3(local_aws):
    return boto3.client("s3", endpoint_url=local_aws, region_name="us-east-1")


def stored(s3, bucket, prefix="") -> dict[str, bytes]:
    listing = s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return {o["Key"].rsplit("/", 1)[-1]: s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read() for o in listing}


def test_first_upload_then_a_rerun_skips(small_mnist, config, s3, caplog):
    caplog.set_level(logging.INFO, logger="tasks.mnist_data")
    uri = upload_dataset(small_mnist, config)
    digest = dataset_sha256(small_mnist)
    assert uri == f"s3://{config.bucket}/mnist-sweep/datasets/mnist/{digest}/"
    objects = stored(s3, config.bucket)
    assert set(objects) == {*MNIST_FILES.values(), MANIFEST}
    for name in MNIST_FILES.values():
        assert objects[name] == (small_mnist / name).read_bytes()
    assert objects[MANIFEST].decode().splitlines()[0].endswith(f"  {TRAIN_IMAGES}")
    head = s3.head_object(Bucket=config.bucket, Key=f"mnist-sweep/datasets/mnist/{digest}/{TRAIN_IMAGES}")

    caplog.clear()
    assert upload_dataset(small_mnist, config) == uri
    assert "skipping the upload" in caplog.text
    again = s3.head_object(Bucket=config.bucket, Key=f"mnist-sweep/datasets/mnist/{digest}/{TRAIN_IMAGES}")
    assert again["LastModified"] == head["LastModified"] and again["ETag"] == head["ETag"]


def test_a_changed_dataset_gets_a_new_prefix(small_mnist, config, s3, tmp_path):
    changed = tmp_path / "changed"
    shutil.copytree(small_mnist, changed)
    labels = load_mnist(small_mnist)["test_labels"].copy()
    labels[0] = (labels[0] + 1) % 10
    write_idx(changed / MNIST_FILES["test_labels"], labels)
    first, second = upload_dataset(small_mnist, config), upload_dataset(changed, config)
    assert first != second and second.endswith(f"/{dataset_sha256(changed)}/")
    assert len(s3.list_objects_v2(Bucket=config.bucket)["Contents"]) == 10, "both datasets, five objects each"


def test_an_interrupted_upload_leaves_no_dataset_and_a_rerun_completes_it(small_mnist, config, s3, proxy):
    proxy.puts_allowed = 2  # the connection dies on the third file
    with pytest.raises(UploadError, match=r"t10k-images-idx3-ubyte\.gz: upload failed: Connection was closed"):
        upload_dataset(small_mnist, dataclasses.replace(config, aws_conn_id="s3_proxy"))
    leftovers = stored(s3, config.bucket)
    assert len(leftovers) == 2 and MANIFEST not in leftovers, "two files and no manifest: not a dataset"

    uri = upload_dataset(small_mnist, config)
    assert set(stored(s3, config.bucket)) == {*MNIST_FILES.values(), MANIFEST}
    assert uri.endswith(f"/{dataset_sha256(small_mnist)}/")


def test_a_killed_upload_is_never_a_dataset_and_a_rerun_reuses_its_files(small_mnist, config, s3, proxy, caplog):
    proxy.puts_allowed, proxy.hold = 2, True  # the third PUT hangs until the uploader is killed
    code = f"from tasks.mnist_data import upload_dataset; upload_dataset({str(small_mnist)!r})"
    settings = {"BUCKET": config.bucket, "PREFIX": config.prefix, "BACKEND": "local", "AWS_CONN_ID": "s3_proxy"}
    env = os.environ | {f"MNIST_PIPELINE_{key}": value for key, value in settings.items()}
    process = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env)
    try:
        assert proxy.blocked.wait(60), "the uploader reached its third object"
    finally:
        process.kill()
        process.wait()
    leftovers = stored(s3, config.bucket)
    assert len(leftovers) == 2 and MANIFEST not in leftovers, "two files and no manifest: not a dataset"

    caplog.set_level(logging.INFO, logger="tasks.mnist_data")
    upload_dataset(small_mnist, config)
    assert f"reusing {', '.join(sorted(leftovers))}" in caplog.text
    assert set(stored(s3, config.bucket)) == {*MNIST_FILES.values(), MANIFEST}


def test_a_dataset_without_its_manifest_is_completed_not_skipped(small_mnist, config, s3, caplog):
    caplog.set_level(logging.INFO, logger="tasks.mnist_data")
    upload_dataset(small_mnist, config)
    prefix = f"mnist-sweep/datasets/mnist/{dataset_sha256(small_mnist)}/"
    s3.delete_object(Bucket=config.bucket, Key=prefix + MANIFEST)
    caplog.clear()
    upload_dataset(small_mnist, config)
    assert "skipping" not in caplog.text and f"uploaded and verified {MANIFEST}\n" in caplog.text
    assert MANIFEST in stored(s3, config.bucket, prefix)


def test_a_corrupted_transfer_is_refused_and_stores_nothing(small_mnist, config, s3, proxy):
    proxy.corrupt_suffix = MNIST_FILES["test_images"]  # the third object: two are written before it
    # S3 refuses a body that is not the one signed (its x-amz-content-sha256), before it is stored.
    with pytest.raises(UploadError, match=r"t10k-images-idx3-ubyte\.gz: upload failed: .*XAmzContentSHA256Mismatch"):
        upload_dataset(small_mnist, dataclasses.replace(config, aws_conn_id="s3_proxy"))
    leftovers = stored(s3, config.bucket)
    assert MNIST_FILES["test_images"] not in leftovers and MANIFEST not in leftovers
    assert upload_dataset(small_mnist, config).endswith(f"/{dataset_sha256(small_mnist)}/")


def test_another_body_at_a_datasets_address_is_an_error_naming_it_and_is_left_alone(small_mnist, config, s3):
    prefix = f"mnist-sweep/datasets/mnist/{dataset_sha256(small_mnist)}/"
    s3.put_object(Bucket=config.bucket, Key=prefix + MNIST_FILES["train_labels"], Body=b"planted")
    with pytest.raises(ContentAddressError, match=rf"{prefix}{MNIST_FILES['train_labels']} does not hold the body"):
        upload_dataset(small_mnist, config)
    assert stored(s3, config.bucket, prefix)[MNIST_FILES["train_labels"]] == b"planted"
    assert MANIFEST not in stored(s3, config.bucket, prefix), "never a dataset"


def test_a_missing_bucket_is_an_error_naming_it(small_mnist, config, s3):
    missing = dataclasses.replace(config, bucket=f"{config.bucket}-missing")
    with pytest.raises(UploadError, match=rf"S3 bucket '{missing.bucket}' does not exist"):
        upload_dataset(small_mnist, missing)
    assert missing.bucket not in [b["Name"] for b in s3.list_buckets()["Buckets"]]


@pytest.mark.real_data
def test_the_address_is_the_sha256_of_the_sha256sums_listing(real_mnist):
    import hashlib

    assert dataset_sha256(real_mnist) == hashlib.sha256((real_mnist / "SHA256SUMS").read_bytes()).hexdigest()
