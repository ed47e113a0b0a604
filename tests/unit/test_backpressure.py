"""Back-pressure: while a dependency is away the worker waits, checks it with a probe, and
runs its work again only once it answers, never churning. Time is injected."""

from __future__ import annotations

import pytest

from core.errors import Decision, ErrorCode, ItemError, RetryableError
from workers.backpressure import OutOfPatience, delay, patiently


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def monotonic(self) -> float:
        return self.now


def test_work_runs_again_only_once_the_dependency_answers() -> None:
    clock = FakeTime()
    tries: list[float] = []
    probes: list[Decision] = []
    answers = iter([False, False, True])  # S3 comes back at the third probe

    def work() -> str:
        tries.append(clock.now)
        if len(tries) == 1:
            raise RetryableError("S3 unreachable", dependency="s3", resource="s3://b/k")
        return "done"

    def probe(decision: Decision) -> bool:
        probes.append(decision)
        return next(answers)

    result = patiently(
        work,
        probe=probe,
        patience=600,
        backoff_max=60,
        sleep=clock.sleep,
        monotonic=clock.monotonic,
    )
    assert result == "done"
    assert len(tries) == 2  # one failure, one success: no try while S3 was away
    assert [p.resource for p in probes] == ["s3://b/k"] * 3
    # growing waits (exponential with jitter: base * 2^(n-1) times a factor in [0.5, 1])
    assert [0.5 <= s <= 1 for s in clock.sleeps[:1]] == [True]
    assert 1 <= clock.sleeps[1] <= 2 and 2 <= clock.sleeps[2] <= 4


def test_errors_that_are_not_outages_go_on_at_once() -> None:
    clock = FakeTime()

    def work() -> None:
        raise ItemError(ErrorCode.NO_FACE, "no face")

    with pytest.raises(ItemError):
        patiently(
            work,
            probe=lambda d: True,
            patience=600,
            backoff_max=60,
            sleep=clock.sleep,
            monotonic=clock.monotonic,
        )
    assert clock.sleeps == []


def test_an_outage_longer_than_the_patience_gives_up() -> None:
    clock = FakeTime()

    def work() -> None:
        raise RetryableError("database gone", dependency="database")

    with pytest.raises(OutOfPatience) as raised:
        patiently(
            work,
            probe=lambda d: False,
            patience=100,
            backoff_max=30,
            sleep=clock.sleep,
            monotonic=clock.monotonic,
        )
    assert isinstance(raised.value.cause, RetryableError)
    assert sum(clock.sleeps) <= 100 and max(clock.sleeps) <= 30


def test_backoff_grows_to_its_cap() -> None:
    assert [delay(n, cap=60, jitter=0) for n in (1, 2, 3, 6, 7, 20)] == [1, 2, 4, 32, 60, 60]
