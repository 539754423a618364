"""How a test waits for something that happens in another process or thread: ask again until the answer is right."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    probe: Callable[[], T],
    done: Callable[[T], object] = bool,
    *,
    timeout: float,
    interval: float = 0.2,
    failure: str | Callable[[T], object] | None = None,
    fail: bool = True,
) -> T:
    """``probe()``'s first answer that ``done`` accepts, asked every ``interval`` seconds.

    Once ``timeout`` seconds have passed, the wait fails with a message: ``failure`` when it is a string (with the
    time waited), ``failure(answer)`` when it is a callable, else the last answer itself (a described job says what
    it was doing). With ``fail=False`` the last answer is returned instead, for the callers that check it
    themselves."""
    deadline = time.monotonic() + timeout
    while True:
        answer = probe()
        if done(answer):
            return answer
        if time.monotonic() >= deadline:
            if not fail:
                return answer
            if isinstance(failure, str):
                raise AssertionError(f"{failure}: not within {timeout:.0f} s")
            raise AssertionError(answer if failure is None else failure(answer))
        time.sleep(interval)
