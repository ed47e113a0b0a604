"""Time, injectable.

Leases, heartbeats and the reaper compare timestamps. The ledger takes `now` from its caller,
and a stage context carries a `Clock`, so tests move time forward on purpose instead of racing
the wall clock on a loaded machine.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

Clock = Callable[[], datetime]


def utcnow() -> datetime:
    """The wall clock, timezone-aware (the default `Clock`)."""
    return datetime.now(UTC)
