"""Publishing an object whose bytes the writer knows: afterwards the key holds exactly them.

Outputs and cache entries are deterministic: the worker that holds an item's claim (or a
cache key's lock) knows which bytes belong at the key. An object already there is the
result only if it is those bytes. It can be other bytes because

- an upload was cut off on a server that keeps what it received (s3rver leaves a 0-byte or
  truncated object when the writer is killed mid-upload),
- an earlier attempt made the same picture in another batch (float rounding differs with
  the batch's composition: measured, one value in 12,288 by one level on the tiny models),
- or an earlier attempt made another picture (a changed model, a bug).

`publish` writes with first-writer-wins (`put_new`), and when the key exists compares: size
and ETag (a single-part upload's MD5) first, a read-back where the ETag cannot tell. Equal
bytes are kept. Other bytes are shown to the caller's `inspect`, which either names the
reason they may be replaced ("empty", "undecodable", ...) or raises (a different picture:
`ItemError(output_conflict)`, the object left as evidence). A replacement happens only while
`still_ours()` holds (the writer's claim, checked against the ledger), and is logged and
counted in `ipbatch_objects_repaired_total{kind, reason}`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from prometheus_client import Counter

from core.errors import ObjectNotFound
from storage.objectstore import ObjectStore

log = logging.getLogger(__name__)

REPAIRED = Counter(
    "ipbatch_objects_repaired_total",
    "Objects found at a key holding other bytes than the writer's (cut-off uploads, a "
    "broken cache entry, another rendering) and replaced, by kind (output, embedding) and "
    "reason",
    ["kind", "reason"],
)

Inspect = Callable[[bytes], str]  # the stored bytes -> why they may be replaced (or raise)


class Outcome(StrEnum):
    CREATED = "created"  # nothing was there: written now
    KEPT = "kept"  # the same bytes were there: left alone
    REPAIRED = "repaired"  # other bytes were there: replaced by these
    NOT_OURS = "not_ours"  # other bytes were there, but the writer's claim had lapsed


@dataclass(frozen=True)
class Published:
    outcome: Outcome
    reason: str | None = None  # why the old object was replaced (REPAIRED, NOT_OURS)


def publish(
    store: ObjectStore,
    uri: str,
    data: bytes,
    *,
    kind: str,
    content_type: str = "application/octet-stream",
    inspect: Inspect | None = None,
    still_ours: Callable[[], bool] = lambda: True,
) -> Published:
    """Make the object at `uri` hold exactly `data` (see the module's text)."""
    for _ in range(3):  # an object deleted between the 412 and the read: try to create again
        if store.put_new(uri, data, content_type=content_type):
            return Published(Outcome.CREATED)
        stat = store.stat(uri)
        if stat is None:
            continue
        if stat.size == len(data) and stat.md5_is(data):
            return Published(Outcome.KEPT)
        try:
            stored = store.get(uri)  # what it is decides whether it may be replaced
        except ObjectNotFound:
            continue
        if stored == data:
            return Published(Outcome.KEPT)
        reason = inspect(stored) if inspect is not None else _plain_reason(stored)
        if not still_ours():
            log.warning("%s holds other bytes (%s) but the claim has lapsed: left", uri, reason)
            return Published(Outcome.NOT_OURS, reason)
        store.put(uri, data, content_type=content_type)
        REPAIRED.labels(kind, reason).inc()
        log.warning(
            "repaired %s: it held %d bytes (%s), replaced by this worker's %d",
            uri,
            len(stored),
            reason,
            len(data),
        )
        return Published(Outcome.REPAIRED, reason)
    raise ObjectNotFound(f"{uri} kept appearing and vanishing while it was written")


def _plain_reason(stored: bytes) -> str:
    return "empty" if not stored else "other bytes"
