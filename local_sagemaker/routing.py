"""Which model server answers an invocation: each endpoint's routes (its servers, by weight or target variant), the
requests in flight to each server, and the answers each server gave.

The routes live in the service's process, so a blue/green switch is one assignment: no request can pick the old
fleet after it, and the per-server count of requests in flight tells the switch when the old fleet has drained.
Every answer is also a sample (status, model and overhead latency) for the alarms that guard a deployment
(local_sagemaker.alarms).
"""

from __future__ import annotations

import collections
import dataclasses
import random

from local_sagemaker import capture

SAMPLES_KEPT = 100_000  # per server: enough for any alarm period at local request rates


@dataclasses.dataclass(frozen=True)
class Target:
    """One model server and the share of its endpoint's traffic it takes."""

    url: str
    variant: str
    config: str
    weight: float
    capture: capture.Settings | None = None  # the config's data capture for this variant (local_sagemaker.capture)


@dataclasses.dataclass
class Sample:
    at: float  # time.time()
    status: int
    model_us: float | None
    overhead_us: float


class Router:
    """Endpoint name → its targets; requests in flight and answers seen, per server."""

    def __init__(self):
        self.routes: dict[str, tuple[Target, ...]] = {}
        self.in_flight: collections.Counter[str] = collections.Counter()
        self.samples: dict[str, collections.deque[Sample]] = collections.defaultdict(
            lambda: collections.deque(maxlen=SAMPLES_KEPT)
        )

    def set(self, endpoint: str, targets: list[Target]) -> None:
        self.routes[endpoint] = tuple(target for target in targets if target.weight > 0)

    def remove(self, endpoint: str) -> None:
        self.routes.pop(endpoint, None)

    def idle(self, urls: set[str]) -> bool:
        return not any(self.in_flight[url] for url in urls)

    def pick(self, endpoint: str, variant: str | None) -> Target | None:
        targets = self.routes.get(endpoint)
        if not targets:
            return None
        if variant:
            targets = tuple(target for target in targets if target.variant == variant)
            if not targets:
                return None
        if len(targets) == 1:
            return targets[0]
        return random.choices(targets, weights=[target.weight for target in targets])[0]

    def samples_since(self, urls: set[str], since: float) -> list[Sample]:
        return [sample for url in urls for sample in list(self.samples.get(url, ())) if sample.at >= since]

    def forget(self, urls: set[str]) -> None:
        """Drop what was kept about servers that are stopped: their URLs are never routed to again."""
        for url in urls:
            self.samples.pop(url, None)
            if not self.in_flight[url]:
                del self.in_flight[url]
