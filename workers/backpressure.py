"""Back-pressure: while a dependency is away, a worker takes no work and waits for it.

`patiently(work, ...)` runs `work`; when it fails because S3, the database, the broker or the
network went away (`classify`: RETRY), the claim scope has already given its items back, and
instead of churning (claim, fail, release, again) the worker waits with growing backoff and
checks the dependency itself (a cheap probe: `SELECT 1`, a HEAD of the object that failed)
before running `work` again. Under Celery the worker holds its one message meanwhile
(prefetch 1, late acks), so the rest of the queue stays in the broker for healthy workers.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

from core.errors import Action, Decision, classify

log = logging.getLogger(__name__)
T = TypeVar("T")


class OutOfPatience(Exception):
    """A dependency stayed away longer than the caller's patience; `cause` is its last error."""

    def __init__(self, cause: BaseException, waited: float) -> None:
        super().__init__(f"still failing after {waited:.0f} s: {cause}")
        self.cause = cause


def delay(failures: int, *, cap: float, base: float = 1.0, jitter: float = 0.5) -> float:
    """Full exponential backoff with some jitter: base * 2^(n-1), at most `cap`, times a
    factor in [1 - jitter, 1]."""
    return min(cap, base * 2 ** (failures - 1)) * (1 - jitter * random.random())


def patiently(
    work: Callable[[], T],
    *,
    probe: Callable[[Decision], bool],
    patience: float,
    backoff_max: float,
    sleep: Callable[[float], None] = time.sleep,
    monotonic: Callable[[], float] = time.monotonic,
) -> T:
    """Run `work`, waiting out outages (see the module). Errors that are not outages go on
    at once; an outage longer than `patience` seconds raises OutOfPatience."""
    started = monotonic()
    while True:
        try:
            return work()
        except Exception as exc:
            decision = classify(exc)
            if decision.action is not Action.RETRY:
                raise
            _wait_until_back(decision, exc, started, probe, patience, backoff_max, sleep, monotonic)


def _wait_until_back(
    decision: Decision,
    exc: Exception,
    started: float,
    probe: Callable[[Decision], bool],
    patience: float,
    backoff_max: float,
    sleep: Callable[[float], None],
    monotonic: Callable[[], float],
) -> None:
    failures = 1
    while True:
        pause = delay(failures, cap=backoff_max)
        waited = monotonic() - started
        if waited + pause > patience:
            raise OutOfPatience(exc, waited) from exc
        log.warning(
            "%s is away (%s): taking no work; checking again in %.1f s",
            decision.dependency,
            decision.message,
            pause,
        )
        sleep(pause)
        if probe(decision):
            return
        failures += 1
