"""SageMaker endpoint metrics for the local server, published to CloudWatch the way SageMaker names them.

Each server process counts its invocations in memory (a few additions per request, in the event loop) and
sends its totals every interval as one UDP datagram to a collector thread in the main process. The collector
merges them, samples CPU and memory of the server's processes, and publishes one aggregate per interval with
`put_metric_data` through the Airflow AWS connection (the local CloudWatch, moto server, in local mode).
Requests never wait for CloudWatch: a slow or dead CloudWatch only costs the collector thread its datapoints.

Real SageMaker endpoints publish these metrics themselves (and CloudWatch reserves the `AWS/` namespaces);
this module stands in for that on the local backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import threading
import time
from datetime import UTC, datetime

log = logging.getLogger(__name__)

NAMESPACE = "AWS/SageMaker"
INSTANCE_NAMESPACE = "/aws/sagemaker/Endpoints"
DEFAULT_VARIANT = "AllTraffic"
UNITS = {
    "Invocations": "None",
    "Invocation4XXErrors": "None",
    "Invocation5XXErrors": "None",
    "ModelLatency": "Microseconds",
    "OverheadLatency": "Microseconds",
}
_STATISTICS = ("SampleCount", "Sum", "Minimum", "Maximum")


class InvocationStats:
    """One interval's samples, summed up per metric as CloudWatch StatisticValues (count, sum, min, max).

    Each invocation adds a 1 to Invocations, a 0 or a 1 to each error metric (so their Average is the error
    rate, as on SageMaker), its latencies in microseconds, and no ModelLatency when it never reached the model.
    """

    def __init__(self, summaries: dict[str, list[float]] | None = None):
        self.summaries = summaries or {}

    def __bool__(self) -> bool:
        return bool(self.summaries)

    def add(self, name: str, count: float, total: float, low: float, high: float) -> None:
        summary = self.summaries.get(name)
        if summary is None:
            self.summaries[name] = [count, total, low, high]
        else:
            summary[0] += count
            summary[1] += total
            summary[2] = min(summary[2], low)
            summary[3] = max(summary[3], high)

    def record(self, status: int, model_us: float | None, overhead_us: float) -> None:
        samples = {"Invocations": 1, "Invocation4XXErrors": int(400 <= status < 500),
                   "Invocation5XXErrors": int(status >= 500), "ModelLatency": model_us,
                   "OverheadLatency": overhead_us}  # fmt: skip
        for name, value in samples.items():
            if value is not None:
                self.add(name, 1, value, value, value)

    def merge(self, other: InvocationStats) -> None:
        for name, summary in other.summaries.items():
            self.add(name, *summary)

    def metric_data(self, dimensions: list[dict], timestamp: datetime) -> list[dict]:
        return [
            {"MetricName": name, "Dimensions": dimensions, "Timestamp": timestamp, "Unit": UNITS[name],
             "StatisticValues": dict(zip(_STATISTICS, summary, strict=True))}
            for name, summary in self.summaries.items()
        ]  # fmt: skip


class StatsSender:
    """In a server process: counts invocations, and sends the totals to the collector every interval."""

    def __init__(self, collector_port: int | None, interval: float):
        self.stats = InvocationStats()
        self._address = ("127.0.0.1", collector_port) if collector_port else None
        self._interval = interval
        self._socket = None
        self._task = None

    def record(self, status: int, model_us: float | None, overhead_us: float) -> None:
        self.stats.record(status, model_us, overhead_us)

    def start(self) -> None:
        if self._address:
            self._socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self._socket.setblocking(False)
            self._task = asyncio.get_running_loop().create_task(self._send_every_interval())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            self.flush()
            self._socket.close()

    def flush(self) -> None:
        stats, self.stats = self.stats, InvocationStats()
        if stats and self._socket:
            try:
                self._socket.sendto(json.dumps(stats.summaries).encode(), self._address)
            except OSError as exc:  # the collector is gone (server shutting down): nothing to report to
                log.debug("metrics datagram not sent: %s", exc)

    async def _send_every_interval(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            self.flush()


class MetricsPublisher(threading.Thread):
    """In the main server process: collects the processes' totals and publishes them to CloudWatch."""

    def __init__(self, endpoint_name: str, variant_name: str, aws_conn_id: str | None, interval: float):
        super().__init__(name="cloudwatch-metrics", daemon=True)
        self.dimensions = [{"Name": "EndpointName", "Value": endpoint_name},
                           {"Name": "VariantName", "Value": variant_name}]  # fmt: skip
        self.aws_conn_id = aws_conn_id
        self.interval = interval
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self._stopping = threading.Event()
        self._client = None
        self._processes = {}
        self._failures = 0

    def run(self) -> None:
        # Build the client now, while the server processes load the model: importing Airflow's hook takes a core
        # for a second or more, which at the first publish would come out of the requests' time. Failing here is
        # no matter: each publish tries again, and says why.
        with contextlib.suppress(Exception):
            self._cloudwatch()
        stats = InvocationStats()
        deadline = time.monotonic() + self.interval
        while True:
            datagram = self._receive(until=deadline)
            if datagram:
                try:
                    stats.merge(InvocationStats(json.loads(datagram)))
                except (ValueError, TypeError) as exc:
                    log.warning("ignoring a malformed metrics datagram: %s", exc)
                continue
            self._publish(stats)  # the interval is over, or stop() woke us up with an empty datagram
            if self._stopping.is_set():
                return
            stats, deadline = InvocationStats(), time.monotonic() + self.interval

    def _receive(self, until: float) -> bytes | None:
        """The next datagram, or None once ``until`` (monotonic time) has passed."""
        remaining = until - time.monotonic()
        if remaining <= 0:
            return None
        self.socket.settimeout(remaining)
        try:
            return self.socket.recv(65536)
        except TimeoutError:
            return None

    def stop(self, timeout: float = 6.0) -> None:
        """Publish what the processes sent until now, then end the thread (or give up on a dead CloudWatch)."""
        self._stopping.set()
        self.socket.sendto(b"", ("127.0.0.1", self.port))  # datagrams before this one are merged first
        self.join(timeout)

    def _publish(self, stats: InvocationStats) -> None:
        timestamp = datetime.now(UTC)
        try:
            client = self._cloudwatch()
            invocations = stats.metric_data(self.dimensions, timestamp)
            if invocations:
                client.put_metric_data(Namespace=NAMESPACE, MetricData=invocations)
            client.put_metric_data(Namespace=INSTANCE_NAMESPACE, MetricData=self._utilization(timestamp))
            self._failures = 0
        except Exception as exc:  # CloudWatch down or misconfigured: keep serving, say so once per outage
            self._failures += 1
            if self._failures == 1:
                log.warning("cannot publish endpoint metrics to CloudWatch (will keep trying): %s", exc)

    def _cloudwatch(self):
        if self._client is None:
            from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook
            from botocore.config import Config

            from tasks.config import load_config

            # Short timeouts and no retries: a dead CloudWatch must not stall the next interval's datapoints.
            config = Config(connect_timeout=2, read_timeout=5, retries={"total_max_attempts": 1})
            aws_conn_id = self.aws_conn_id or load_config().aws_conn_id
            hook = AwsBaseHook(aws_conn_id=aws_conn_id, client_type="cloudwatch", config=config)
            self._client = hook.get_conn()
        return self._client

    def _utilization(self, timestamp: datetime) -> list[dict]:
        """CPU (percent summed over cores, as SageMaker reports it) and memory of this server's processes."""
        import psutil

        main = psutil.Process()
        cpu = rss = 0.0
        current = {}
        for process in [main, *main.children(recursive=True)]:
            process = self._processes.get(process.pid, process)  # cpu_percent measures since its last call
            try:
                cpu += process.cpu_percent()
                rss += process.memory_info().rss
            except psutil.NoSuchProcess:
                continue
            current[process.pid] = process
        self._processes = current
        memory = 100.0 * rss / psutil.virtual_memory().total
        return [
            {"MetricName": "CPUUtilization", "Dimensions": self.dimensions, "Timestamp": timestamp,
             "Value": cpu, "Unit": "Percent"},
            {"MetricName": "MemoryUtilization", "Dimensions": self.dimensions, "Timestamp": timestamp,
             "Value": memory, "Unit": "Percent"},
        ]  # fmt: skip
