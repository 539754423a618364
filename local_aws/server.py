"""The local AWS as a process: moto's services behind the gateway that signs off every request, on one port.

    python -m local_aws --principals FILE [--host 127.0.0.1] [--port 5000] [--region us-east-1]
        [--state-file FILE] [--decision-log FILE] [--ready-file FILE]

``--principals``: the stack's users, roles and service credentials (local_aws.identities), made at the start.
``--state-file``: moto's recording of every request it served, replayed at the start (in this process, past the
gateway: the recorded requests were authorized when they were made), so that buckets, objects, metrics, logs and IAM
changes outlive a restart. ``--decision-log``: every IAM decision, as JSON lines. The server answers
``/_local/health`` with 200 once the replay is done; the ready file is written then too.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import signal
import sys
import threading
from collections import defaultdict, deque
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from local_aws import LOCAL_ACCOUNT, LOCAL_REGION

log = logging.getLogger(__name__)

DEFAULT_PORT = 5000


def configure_moto(account: str) -> None:
    """moto's settings for the local AWS; before moto is imported. Buckets are named by the path only (what the
    gateway authorizes is what moto serves), CORS answers nothing (a web page must not reach the buckets), and every
    resource is in ``account``."""
    os.environ["S3_IGNORE_SUBDOMAIN_BUCKETNAME"] = "true"
    os.environ["MOTO_DISABLE_GLOBAL_CORS"] = "true"
    os.environ["MOTO_ACCOUNT_ID"] = account
    os.environ.pop("MOTO_ENABLE_RECORDING", None)
    os.environ.pop("INITIAL_NO_AUTH_ACTION_COUNT", None)


def build(principals: dict, *, region: str, state_file: Path | None, decision_log: Path | None):
    """The gateway over moto's app, with the principals made and the recorded state replayed."""
    account = principals.get("account", LOCAL_ACCOUNT)
    configure_moto(account)
    from moto.moto_api import recorder
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

    from local_aws.authorizer import Authorizer
    from local_aws.evaluator import Evaluator
    from local_aws.gateway import Gateway
    from local_aws.identities import Identities
    from local_aws.resource_policies import ResourcePolicies

    # moto writes each recorded request in two writes from the request's own thread: concurrent requests with large
    # bodies would interleave into lines that cannot be read back.
    lock, record = threading.Lock(), recorder._record_request

    def record_whole(*args, **kwargs):
        with lock:
            return record(*args, **kwargs)

    recorder._record_request = record_whole
    # moto checks a bucket's policy on object requests itself, reading no Condition: a Deny that holds only under a
    # condition would refuse every request. The gateway has evaluated the policy in full before moto sees a request.
    from moto.iam.access_control import PermissionResult
    from moto.s3.models import FakeBucket

    FakeBucket.get_permission = lambda self, action, resource: PermissionResult.NEUTRAL
    app = DomainDispatcherApplication(create_backend_app)
    identities = Identities(account, region)
    authorizer = Authorizer(
        account=account,
        region=region,
        evaluator=Evaluator(),
        policies=identities.identity_policies,
        resource_policy=ResourcePolicies(identities).get,
        decision_log=decision_log,
    )
    gateway = Gateway(app, identities, authorizer, region=region)
    identities.bootstrap(principals)
    if state_file is not None:
        state_file.parent.mkdir(parents=True, exist_ok=True)
        if state_file.exists():
            replay(app, state_file)
            identities.bootstrap(principals)  # the spec's principals are as it says, whatever was recorded
        recorder._location = str(state_file)
        recorder.start_recording()
    return gateway


def replay(app, state_file: Path) -> None:
    """Send the requests recorded in ``state_file`` to moto's ``app`` again, in order, and keep in the file only those
    that may have changed the state.

    Not moto's own replay: that stops at the first unreadable line, and loses every multipart upload, since moto draws
    upload IDs from os.urandom and the recorded parts name an upload the replayed server never created. Here an
    unreadable line (the last one, cut short by a crash) is skipped with a warning, and each recorded upload ID is
    swapped for the one the replayed CreateMultipartUpload got for the same object (several uploads of one object are
    paired in creation order: any pairing yields the same objects). Requests that failed when recorded fail the same
    way again. Reads (GET, HEAD, OPTIONS, but for query-API actions) change nothing, and STS's sessions end with the
    process that issued them: neither is replayed nor kept. The file is rewritten and swapped in at the end, so a
    crash during the replay leaves it as it was.

    Limits: the file only grows with what is written (every object ever put, base64-encoded, even once deleted or
    overwritten), and the replay takes as long as serving all of it again; IDs moto makes up other than upload IDs
    (S3 version IDs, SNS subscription ARNs) and times it stamps (LastModified, datapoints sent without one) come out
    new; log events older than 14 days are refused, as CloudWatch Logs refuses them.
    """
    import re

    from werkzeug.test import EnvironBuilder, run_wsgi_app

    upload_pattern = re.compile(rb"<UploadId>([^<]+)</UploadId>")
    upload_ids: dict[str, str] = {}  # recorded upload ID -> the replayed upload's
    created: dict[str, deque[str]] = defaultdict(deque)  # object path -> uploads not yet matched
    replayed = failed = 0
    kept = state_file.with_name(f"{state_file.name}.replaying")
    try:
        with state_file.open("rb") as recording, kept.open("wb") as compacted:
            for number, line in enumerate(recording, start=1):
                try:
                    entry = json.loads(line)
                    method, url, headers = entry["method"], urlsplit(entry["url"]), entry["headers"]
                except (ValueError, KeyError, TypeError):
                    log.warning("%s:%d: skipping a recorded request that cannot be read", state_file, number)
                    continue
                body = entry.get("body") or ""
                body = base64.b64decode(body) if entry.get("body_encoded") else body.encode()
                query = parse_qs(url.query, keep_blank_values=True)
                form = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True) if method == "POST" else {}
                if method in ("GET", "HEAD", "OPTIONS") and "Action" not in query:
                    continue
                if "2011-06-15" in query.get("Version", []) + form.get("Version", []):  # STS
                    continue
                compacted.write(line.rstrip(b"\n") + b"\n")
                target = url.query
                if "uploadId" in query:
                    recorded_id = query["uploadId"][0]
                    if recorded_id not in upload_ids and created[url.path]:
                        upload_ids[recorded_id] = created[url.path].popleft()
                    if recorded_id in upload_ids:  # upload IDs are alphanumeric: no quoting to mind
                        target = target.replace(f"uploadId={recorded_id}", f"uploadId={upload_ids[recorded_id]}")
                headers = {
                    name: value
                    for name, value in headers.items()
                    if name.lower() not in ("transfer-encoding", "content-length")
                }
                environ = EnvironBuilder(
                    method=method, path=unquote(url.path), query_string=target, headers=headers, data=body
                ).get_environ()
                environ["RAW_URI"] = url.path + (f"?{target}" if target else "")
                answer, status, _ = run_wsgi_app(app, environ, buffered=True)
                answer = b"".join(answer)
                replayed += 1
                if int(status.split(" ", 1)[0]) >= 400:
                    failed += 1
                elif method == "POST" and "uploads" in query and (created_id := upload_pattern.search(answer)):
                    created[url.path].append(created_id.group(1).decode())
            compacted.flush()
            os.fsync(compacted.fileno())
        os.replace(kept, state_file)
    except BaseException:
        kept.unlink(missing_ok=True)
        raise
    log.info("replayed %d recorded requests from %s (%d answered with an error)", replayed, state_file, failed)


def serve(gateway, host: str, port: int, ready_file: Path | None = None) -> None:
    """Serve ``gateway`` on ``host:port`` until SIGTERM or SIGINT."""
    from moto.moto_server.werkzeug_app import MotoRequestHandler
    from werkzeug.serving import make_server

    server = make_server(host, port, gateway, threaded=True, request_handler=MotoRequestHandler)
    server.socket.listen(128)

    def stop(*_):
        threading.Thread(target=server.shutdown, daemon=True).start()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)
    gateway.ready.set()
    if ready_file is not None:
        ready_file.write_text(f"http://{host}:{server.port}")
    log.info("the local AWS answers on http://%s:%d", host, server.port)
    try:
        server.serve_forever()
    finally:
        gateway.authorizer.evaluator.close()
        if ready_file is not None:
            ready_file.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m local_aws", description=__doc__.splitlines()[0])
    parser.add_argument("--principals", type=Path, required=True, help="the stack's principals (JSON, mode 0600)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--region", default=os.environ.get("AWS_DEFAULT_REGION", LOCAL_REGION))
    parser.add_argument("--state-file", type=Path, help="moto's recording, replayed at start (default: no state kept)")
    parser.add_argument("--decision-log", type=Path, help="every IAM decision, appended as JSON lines")
    parser.add_argument("--ready-file", type=Path, help="written once the state is back and requests are served")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.ready_file:
        args.ready_file.unlink(missing_ok=True)
    principals = json.loads(args.principals.read_text())
    gateway = build(principals, region=args.region, state_file=args.state_file, decision_log=args.decision_log)
    serve(gateway, args.host, args.port, args.ready_file)
    sys.exit(0)


if __name__ == "__main__":
    main()
