"""The local AWS: moto in server mode on loopback, reached like AWS through the connection's `endpoint_url`.

S3, CloudWatch and CloudWatch Logs are real HTTP services here; the code that talks to them is the code that
talks to AWS. Used by the local stack (`mnist-pipeline up`), by the tests, and in the foreground by the
docker-compose service, with its state in a volume:

    python -m cli.local_aws [--host 127.0.0.1] [--port 5000] [--state-file FILE] [--ready-file FILE]

moto answers as soon as it listens, before the replay has brought its state back: the ready file (written once the
replay is done, removed at the start) is what a health check waits for.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import logging
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections import defaultdict, deque
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from local_sagemaker import processes
from local_sagemaker.processes import free_port

log = logging.getLogger(__name__)

# moto accepts any credentials; these make boto3 sign requests without looking for real ones.
LOCAL_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "local", "AWS_SECRET_ACCESS_KEY": "local"}

# `python -m moto.server`, with the recorder's appends serialized. moto writes each request to the recording in two
# writes (its JSON, then a newline) from the request's own thread: two concurrent requests with bodies over 8 KiB
# interleave into lines that cannot be read back (a third of the lines, with 8 threads uploading 1 MiB objects).
_MOTO_SERVER = """
import threading
from moto.moto_api import recorder
from moto.server import main
lock, record = threading.Lock(), recorder._record_request
def record_whole(*args, **kwargs):
    with lock:
        return record(*args, **kwargs)
recorder._record_request = record_whole
main()
"""
_UPLOAD_ID = re.compile(rb"<UploadId>([^<]+)</UploadId>")


def start_moto_server(
    host: str = "127.0.0.1", port: int | None = None, log_path: Path | None = None, state_file: Path | None = None
) -> tuple[subprocess.Popen, str]:
    """Start moto server in its own process (session) and return it with its endpoint URL once it answers.

    With ``state_file`` the state outlives the process: moto's recorder appends every request it gets to that file
    (JSON lines), and the next start replays the file before it returns (see `_replay`). Without it the state
    lives and dies with the process. Either way moto answers no cross-origin browser request: it would otherwise
    let any web page the user visits read and write the local buckets.
    """
    port = port or free_port(host)
    env = {**os.environ, "MOTO_DISABLE_GLOBAL_CORS": "true"}
    if state_file is not None:
        state_file = Path(state_file).resolve()
        state_file.parent.mkdir(parents=True, exist_ok=True)
        # Recording stays off until the replay is done, or it would append the replayed requests to the file.
        env.pop("MOTO_ENABLE_RECORDING", None)
        env["MOTO_RECORDER_FILEPATH"] = str(state_file)
    process, _ = processes.spawn([sys.executable, "-c", _MOTO_SERVER, "-H", host, "-p", str(port)], env=env,
                                 log_path=log_path)  # fmt: skip
    endpoint_url = f"http://{host}:{port}"
    try:
        processes.wait_for_http(f"{endpoint_url}/moto-api/", process=process)
        if state_file is not None:
            if state_file.exists():
                _replay(state_file, host, port)
            urllib.request.urlopen(
                urllib.request.Request(f"{endpoint_url}/moto-api/recorder/start-recording", method="POST"), timeout=10
            ).close()
    except BaseException:
        process.kill()
        raise
    return process, endpoint_url


def _replay(state_file: Path, host: str, port: int) -> None:
    """Send the requests recorded in ``state_file`` to the server again, in order, and keep in the file only those
    that may have changed the state.

    Not moto's own replay (`/moto-api/recorder/replay-recording`): that stops at the first unreadable line, and
    loses every multipart upload, since moto draws upload IDs from os.urandom and the recorded parts name an upload
    the replayed server never created. Here an unreadable line (the last one, cut short by a crash) is skipped with
    a warning, and each recorded upload ID is swapped for the one the replayed CreateMultipartUpload got for the
    same object (several uploads of one object are paired in creation order: any pairing yields the same objects).
    Requests that failed when recorded (moto records a request before it handles it) fail the same way again.
    Reads (GET, HEAD, OPTIONS, but for query-API actions) change nothing: they are neither replayed nor kept. The
    file is rewritten and swapped in at the end, so a crash during the replay leaves it as it was, and a replay of
    a file without reads or unreadable lines rewrites it unchanged.

    Limits: the file only grows with what is written (every object ever put, base64-encoded, even once deleted or
    overwritten), and the replay takes as long as sending all of it; IDs the server makes up other than upload IDs
    (S3 version IDs, SNS subscription ARNs) and times it stamps (LastModified, datapoints sent without one) come
    out new; log events older than 14 days are refused, as CloudWatch Logs refuses them; and moto records a
    request sent with `Transfer-Encoding: chunked` without its body (boto3 sends chunked uploads only over HTTPS,
    which this server does not speak).
    """
    connection = http.client.HTTPConnection(host, port, timeout=60)
    upload_ids: dict[str, str] = {}  # recorded upload ID -> the replayed upload's
    created: dict[tuple[str, str], deque[str]] = defaultdict(deque)  # (host, object path) -> uploads not yet matched
    replayed = failed = 0
    kept = state_file.with_name(f"{state_file.name}.replaying")
    try:
        with state_file.open("rb") as recording, kept.open("wb") as compacted:
            # Only what the file held at the start: were recording turned on meanwhile, the replay would read its
            # own requests back without end.
            end = os.fstat(recording.fileno()).st_size
            for number, line in enumerate(recording, start=1):
                if recording.tell() > end:
                    break
                try:
                    entry = json.loads(line)
                    method, url, headers = entry["method"], urlsplit(entry["url"]), entry["headers"]
                except (ValueError, KeyError, TypeError):
                    log.warning("%s:%d: skipping a recorded request that cannot be read", state_file, number)
                    continue
                query = parse_qs(url.query, keep_blank_values=True)
                if method in ("GET", "HEAD", "OPTIONS") and "Action" not in query:
                    continue
                compacted.write(line.rstrip(b"\n") + b"\n")

                body = entry.get("body") or ""
                body = base64.b64decode(body) if entry.get("body_encoded") else body.encode()
                # The body goes whole, with the length http.client gives it.
                headers = {name: value for name, value in headers.items() if name.lower() != "transfer-encoding"}
                target = url.path + (f"?{url.query}" if url.query else "")
                upload = (headers.get("Host", "").rsplit(":", 1)[0], url.path)
                if "uploadId" in query:
                    recorded_id = query["uploadId"][0]
                    if recorded_id not in upload_ids and created[upload]:
                        upload_ids[recorded_id] = created[upload].popleft()
                    if recorded_id in upload_ids:  # upload IDs are alphanumeric: no quoting to mind
                        target = target.replace(f"uploadId={recorded_id}", f"uploadId={upload_ids[recorded_id]}")

                connection.request(method, target, body=body, headers=headers)
                response = connection.getresponse()
                answer = response.read()
                replayed += 1
                if response.status >= 400:
                    failed += 1
                elif method == "POST" and "uploads" in query and (created_id := _UPLOAD_ID.search(answer)):
                    created[upload].append(created_id.group(1).decode())
            compacted.flush()
            os.fsync(compacted.fileno())
        os.replace(kept, state_file)
    except BaseException:
        kept.unlink(missing_ok=True)
        raise
    finally:
        connection.close()
    log.info("replayed %d recorded requests from %s (%d answered with an error)", replayed, state_file, failed)


def connection_uri(
    endpoint_url: str,
    region: str = "us-east-1",
    sagemaker_endpoint: str | None = None,
    runtime_endpoint: str | None = None,
) -> str:
    """An Airflow AWS connection (JSON form, for AIRFLOW_CONN_<ID>): every service at the local AWS
    (``endpoint_url``), and with ``sagemaker_endpoint`` and ``runtime_endpoint`` SageMaker's two APIs at the local
    SageMaker service (its control plane and its runtime), by the provider's per-service ``service_config``."""
    extra: dict = {"endpoint_url": endpoint_url, "region_name": region}
    if sagemaker_endpoint or runtime_endpoint:
        if not (sagemaker_endpoint and runtime_endpoint):
            raise ValueError("the local SageMaker service takes both endpoints: the control plane's and the runtime's")
        extra["service_config"] = {
            "sagemaker": {"endpoint_url": sagemaker_endpoint},
            "sagemaker-runtime": {"endpoint_url": runtime_endpoint},
        }
    return json.dumps(
        {
            "conn_type": "aws",
            "login": LOCAL_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            "password": LOCAL_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            "extra": extra,
        }
    )


def main(argv: list[str] | None = None) -> None:
    """Serve the local AWS in the foreground until SIGTERM or SIGINT, keeping its state in ``--state-file``."""
    parser = argparse.ArgumentParser(prog="python -m cli.local_aws", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--state-file", type=Path, help="moto's recording, replayed at start (default: no state kept)")
    parser.add_argument("--ready-file", type=Path, help="written once the state is back and requests are recorded")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.ready_file:
        args.ready_file.unlink(missing_ok=True)
    process, endpoint_url = start_moto_server(args.host, args.port, Path("/dev/stdout"), args.state_file)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: process.terminate())
    if args.ready_file:
        args.ready_file.write_text(endpoint_url)
    log.info(
        "the local AWS answers on %s%s", endpoint_url, f", its state in {args.state_file}" if args.state_file else ""
    )
    try:
        sys.exit(process.wait())
    finally:
        if args.ready_file:
            args.ready_file.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
