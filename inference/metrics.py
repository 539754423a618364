"""SageMaker endpoint metrics for the local server, published to CloudWatch the way SageMaker names them.

Each server process counts its invocations in memory (a few additions per request, in the event loop) and
sends its totals as one UDP datagram to a collector thread in the main process: as soon as its requests pause
(IDLE_FLUSH_S without one), and every interval under sustained load. The collector merges them and publishes
them with `put_metric_data` as soon as a burst of traffic is over, at the latest at the end of each interval,
when it also samples CPU and memory of the server's processes. So a check that reads CloudWatch after its
load finds the load's datapoints there within three idle periods, whatever the interval. CloudWatch is reached through a
plain boto3 client and the standard environment (AWS_ENDPOINT_URL for the local CloudWatch, moto server, in
local mode). Requests never wait for CloudWatch: a slow or dead CloudWatch only costs the collector thread its
datapoints.

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
# A server process sends its counts once it has seen no request for this long, and the collector publishes a
# finished burst this long after the first process said so, so that the others' last counts (sent within the
# same idle period) go in the same put. Long enough that requests a few milliseconds apart count as one burst
# and CloudWatch gets at most a few puts a second under a trickle of requests; short enough that a check
# reading CloudWatch right after its load does not wait for it.
IDLE_FLUSH_S = 0.25


class InvocationStats:
    """Samples (a process's since its last datagram, the collector's since its last put), summed up per metric
    as CloudWatch StatisticValues (count, sum, min, max).

    Each invocation adds a 1 to Invocations, a 0 or a 1 to each error metric (so their Average is the error
    rate, as on SageMaker), its latencies in microseconds, and no ModelLatency when it never reached the model.
    """

    def __init__(self, summaries: dict[str, list[float]] | None = None):
        self.summaries = summaries or {}

    def __bool__(self) -> bool:
        return bool(self.summaries)

    @property
    def invocations(self) -> float:
        summary = self.summaries.get("Invocations")
        return summary[0] if summary else 0

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
        samples = {
            "Invocations": 1,
            "Invocation4XXErrors": int(400 <= status < 500),
            "Invocation5XXErrors": int(status >= 500),
            "ModelLatency": model_us,
            "OverheadLatency": overhead_us,
        }
        for name, value in samples.items():
            if value is not None:
                self.add(name, 1, value, value, value)

    def merge(self, other: InvocationStats) -> None:
        for name, summary in other.summaries.items():
            self.add(name, *summary)

    def metric_data(self, dimensions: list[dict], timestamp: datetime) -> list[dict]:
        return [
            {
                "MetricName": name,
                "Dimensions": dimensions,
                "Timestamp": timestamp,
                "Unit": UNITS[name],
                "StatisticValues": dict(zip(_STATISTICS, summary, strict=True)),
            }
            for name, summary in self.summaries.items()
        ]


class StatsSender:
    """In a server process: counts invocations, and sends the totals to the collector once the requests pause
    (IDLE_FLUSH_S without one) or, under sustained load, every interval.

    The request path only adds to the counts: a single task looks at them every idle period, and counts that
    have not grown since its last look mean that the burst is over (no timer per request)."""

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
            self._task = asyncio.get_running_loop().create_task(self._send_when_idle())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            self.flush(burst_over=True)  # the server is going: whatever it counted is final
            self._socket.close()

    def flush(self, burst_over: bool) -> None:
        """Send the counts so far; ``burst_over`` asks the collector to publish them without waiting for the
        interval's end."""
        stats, self.stats = self.stats, InvocationStats()
        if stats and self._socket:
            message = {"stats": stats.summaries, "burst_over": burst_over}
            try:
                self._socket.sendto(json.dumps(message).encode(), self._address)
            except OSError as exc:  # the collector is gone (server shutting down): nothing to report to
                log.debug("metrics datagram not sent: %s", exc)

    async def _send_when_idle(self) -> None:
        loop = asyncio.get_running_loop()
        period = min(IDLE_FLUSH_S, self._interval)  # an interval shorter than the idle period still holds
        sent_at, seen = loop.time(), 0
        while True:
            await asyncio.sleep(period)
            count = self.stats.invocations
            if not count:
                sent_at = loop.time()  # nothing to send: the next interval starts with the next request
                continue
            if count == seen:  # no request since the last look
                self.flush(burst_over=True)
            elif loop.time() - sent_at >= self._interval:
                self.flush(burst_over=False)
            else:
                seen = count
                continue
            sent_at, seen = loop.time(), 0


class MetricsPublisher(threading.Thread):
    """In the main server process: collects the processes' totals and publishes them to CloudWatch."""

    def __init__(self, endpoint_name: str, variant_name: str, interval: float):
        super().__init__(name="cloudwatch-metrics", daemon=True)
        self.dimensions = [
            {"Name": "EndpointName", "Value": endpoint_name},
            {"Name": "VariantName", "Value": variant_name},
        ]
        self.interval = interval
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self._stopping = threading.Event()
        self._client = None
        self._processes = {}
        self._failures = 0

    def run(self) -> None:
        # Build the client now, while the server processes load the model: loading botocore's service model takes
        # a core for a fraction of a second, which at the first publish would come out of the requests' time.
        # Failing here is no matter: each publish tries again, and says why.
        with contextlib.suppress(Exception):
            self._cloudwatch()
        stats = InvocationStats()
        interval_end = time.monotonic() + self.interval
        burst_end = None  # when to publish the counts of a burst that is over, before the interval ends
        while True:
            datagram = self._receive(until=interval_end if burst_end is None else min(burst_end, interval_end))
            if datagram:
                try:
                    message = json.loads(datagram)
                    stats.merge(InvocationStats(message["stats"]))
                except (ValueError, TypeError, KeyError, AttributeError) as exc:
                    log.warning("ignoring a malformed metrics datagram: %s", exc)
                    continue
                if message.get("burst_over") and burst_end is None:
                    burst_end = time.monotonic() + IDLE_FLUSH_S
                continue
            # A burst is over, the interval is over, or stop() woke us up with an empty datagram.
            interval_over = self._stopping.is_set() or time.monotonic() >= interval_end
            self._publish(stats, utilization=interval_over)
            if self._stopping.is_set():
                return
            stats, burst_end = InvocationStats(), None
            if interval_over:
                interval_end = time.monotonic() + self.interval

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

    def stop(self, timeout: float = 1.0) -> None:
        """Publish what the processes sent until now, then end the thread; give up after ``timeout`` seconds (a
        slow or dead CloudWatch) so that a server told to stop does stop."""
        self._stopping.set()
        self.socket.sendto(b"", ("127.0.0.1", self.port))  # datagrams before this one are merged first
        self.join(timeout)

    def _publish(self, stats: InvocationStats, utilization: bool) -> None:
        """Put the invocation counts (if any), and with ``utilization`` a sample of CPU and memory (once per
        interval: a sample of a fraction of a second would say little)."""
        timestamp = datetime.now(UTC)
        try:
            client = self._cloudwatch()
            invocations = stats.metric_data(self.dimensions, timestamp)
            if invocations:
                client.put_metric_data(Namespace=NAMESPACE, MetricData=invocations)
            if utilization:
                client.put_metric_data(Namespace=INSTANCE_NAMESPACE, MetricData=self._utilization(timestamp))
            self._failures = 0
        except Exception as exc:  # CloudWatch down or misconfigured: keep serving, say so once per outage
            self._failures += 1
            if self._failures == 1:
                log.warning("cannot publish endpoint metrics to CloudWatch (will keep trying): %s", exc)

    def _cloudwatch(self):
        if self._client is None:
            import boto3
            from botocore.config import Config

            # Short timeouts and no retries: a dead CloudWatch must not stall the next interval's datapoints.
            config = Config(connect_timeout=2, read_timeout=5, retries={"total_max_attempts": 1})
            self._client = boto3.client("cloudwatch", config=config)
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
            {
                "MetricName": "CPUUtilization",
                "Dimensions": self.dimensions,
                "Timestamp": timestamp,
                "Value": cpu,
                "Unit": "Percent",
            },
            {
                "MetricName": "MemoryUtilization",
                "Dimensions": self.dimensions,
                "Timestamp": timestamp,
                "Value": memory,
                "Unit": "Percent",
            },
        ]
