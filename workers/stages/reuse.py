"""Reuse: an image made before with the same fingerprint is copied, not generated again.

A catalog's nightly manifest is mostly last night's rows. Each image's fingerprint
(`pipeline.fingerprint`: the weights by content, the backend, every call input of the row, its
cached inputs' keys, scoring, the image index) is recorded with its output; the generate stage
asks, before any diffusers call, which of its claimed rows have every image on record, and
copies those:

1. the bytes of the output it came from are read and must still hash to its recorded sha256
   (an object that vanished or changed is not reused: the row is generated, never failed);
2. they are published at the new job's key like a generated image (`storage.publish`: first
   writer wins, and only while this worker holds the item's claim: a worker whose lease
   lapsed copies nothing), so the copy is the same bytes, bit for bit (its embedded metadata
   names the job and row that made it);
3. the `outputs` row is recorded with the same sha256, seed, size and scores, `reused_from`
   naming the output it was copied from, in the transaction that marks the item succeeded.

The object is read and written, not copied with S3's CopyObject: the copy must obey the same
first-writer-wins and claim checks as every other write, and checking the sha256 reads it
anyway (an image is a few hundred kilobytes; its generation seconds of a GPU).
A job submitted with `--no-reuse` generates everything (and its images are reusable later).
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from core.errors import ErrorCode, ObjectNotFound
from core.uris import join_uri
from pipeline.fingerprint import backend_of, generation_fingerprint
from pipeline.images import CONTENT_TYPES, judge_stored_output
from pipeline.manifest import Row
from storage.ledger import outputs as output_ledger
from storage.models import Output
from storage.publish import Outcome, Published, publish
from workers import metrics

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from workers.claims import ClaimedWork
    from workers.context import StageContext

log = logging.getLogger(__name__)


class Wanted(Protocol):
    """A claimed row, as far as reuse needs it (generate's entries)."""

    @property
    def item_id(self) -> int: ...
    @property
    def job_id(self) -> str: ...
    @property
    def row(self) -> Row: ...
    @property
    def output_uri(self) -> str: ...
    @property
    def fingerprints(self) -> tuple[str, ...]: ...


def output_uri_for(output_uri: str, job_id: str, row_id: str, k: int, fmt: str) -> str:
    """Where image k of a row of a job is stored."""
    return join_uri(output_uri, job_id, row_id, f"{k}.{fmt}")


def publish_output(
    ctx: StageContext, uri: str, data: bytes, fmt: str, *, still_ours: Callable[[], bool]
) -> Published:
    """Store an image's bytes at its key, generated or copied: first writer wins; an object
    already there (a crash between upload and commit, a late duplicate, an upload cut off)
    stays only if it is these bytes (`storage.publish`)."""
    return publish(
        ctx.stores.for_uri(uri),
        uri,
        data,
        kind="output",
        content_type=CONTENT_TYPES[fmt],
        inspect=functools.partial(judge_stored_output, made=data, uri=uri),
        still_ours=still_ours,
    )


def fingerprints(
    ctx: StageContext, row: Row, inputs: Sequence[str], *, memo: dict[object, str] | None = None
) -> tuple[str, ...]:
    """The fingerprint of each image of `row` on this worker (see `pipeline.fingerprint`).
    `inputs`: the cache keys (URIs) of the row's embeddings and prepared inputs. `memo`: the
    weights' digests of the rows of one message (each file's size and time looked at once)."""
    pool = ctx.generators
    presets = [pool.resolve(spec.adapter) for spec in row.adapter_specs()]
    controlnets = tuple(c.model for c in row.control or ())
    key = (tuple(presets), controlnets)
    memo = {} if memo is None else memo
    if key not in memo:
        memo[key] = ctx.weights.of(presets[0].family, presets, controlnets)
    weights = memo[key]
    assert pool.acceleration is not None, "the context gives its pool an Acceleration"
    backend = backend_of(pool.device, pool.dtype, pool.acceleration)
    scorer = ctx.scorer
    scoring = None
    if scorer is not None:  # scores are copied with the image; a threshold may pick another
        threshold = ctx.settings.score_threshold if row.regenerate else None
        scoring = {
            "scorer": scorer.fingerprint,
            "threshold": threshold,
            "tries": ctx.settings.score_tries if threshold is not None else None,
        }
    return tuple(
        generation_fingerprint(
            weights=weights,
            backend=backend,
            row=row,
            inputs=inputs,
            scoring=scoring,
            image_index=k,
        )
        for k in range(row.num_images)
    )


@dataclass
class Reused:
    """What `copy_made_before` did: items copied here, and items another worker took over
    meanwhile (its lease lapsed: nothing written here). Neither is generated here."""

    copied: list[int] = field(default_factory=list)
    taken_over: list[int] = field(default_factory=list)

    @property
    def handled(self) -> set[int]:
        return {*self.copied, *self.taken_over}


def copy_made_before(ctx: StageContext, work: ClaimedWork, wanted: Sequence[Wanted]) -> Reused:
    """Copy the images of every row in `wanted` whose images were all made before."""
    found = _made_before(ctx, {fp for w in wanted for fp in w.fingerprints})
    reused = Reused()
    for w in wanted:
        sources = [found.get(fp) for fp in w.fingerprints]
        if not all(sources):
            continue
        with work.item(w.item_id, unexpected=ErrorCode.INTERNAL):
            outcome = _copy(ctx, work, w, [s for s in sources if s is not None])
            if outcome is not None:
                (reused.copied if outcome else reused.taken_over).append(w.item_id)
    return reused


def _made_before(ctx: StageContext, wanted: set[str]) -> dict[str, dict[str, Any]]:
    """The newest recorded output for each fingerprint asked for."""
    if not wanted:
        return {}
    from sqlalchemy import select

    found: dict[str, dict[str, Any]] = {}
    with ctx.sessions.begin() as session:
        rows = session.scalars(
            select(Output).where(Output.fingerprint.in_(sorted(wanted))).order_by(Output.id)
        )
        for out in rows:
            assert out.fingerprint is not None
            found[out.fingerprint] = {
                "id": out.id,
                "uri": out.uri,
                "sha256": out.sha256,
                "size": out.size,
                "seed": out.seed,
                "width": out.width,
                "height": out.height,
                "clip_i": out.clip_i,
                "clip_t": out.clip_t,
            }
    return found


def _copy(
    ctx: StageContext, work: ClaimedWork, w: Wanted, sources: list[dict[str, Any]]
) -> bool | None:
    """Copy one row's images: True if copied, False if the claim was lost (another worker
    stores and records it), None if one of them is gone or changed (generate the row)."""
    if not work.still_held([w.item_id]):
        return False
    copies: list[tuple[dict[str, Any], str, bytes]] = []
    for k, source in enumerate(sources):
        try:
            data = ctx.stores.for_uri(source["uri"]).get(source["uri"])
        except ObjectNotFound:
            log.info("item %d: %s is gone: generated again", w.item_id, source["uri"])
            return None
        if hashlib.sha256(data).hexdigest() != source["sha256"]:
            log.warning(
                "item %d: %s changed since it was recorded: generated again",
                w.item_id,
                source["uri"],
            )
            return None
        uri = output_uri_for(w.output_uri, w.job_id, w.row.id, k, w.row.output_format)
        copies.append((source, uri, data))
    stored = []
    for k, (source, uri, data) in enumerate(copies):
        published = publish_output(
            ctx,
            uri,
            data,
            w.row.output_format,
            still_ours=lambda: bool(work.still_held([w.item_id])),
        )
        if published.outcome is Outcome.NOT_OURS:
            return False
        stored.append(
            {
                **{key: value for key, value in source.items() if key not in ("id", "uri")},
                "image_index": k,
                "uri": uri,
                "fingerprint": w.fingerprints[k],
                "reused_from": source["id"],
                "gpu_seconds": 0.0,  # a copy takes no GPU time
            }
        )
    made = {w.item_id: output_ledger.ItemOutputs(stored)}
    record = functools.partial(record_made, made=made, now=ctx.clock())
    if not work.done([w.item_id], record=record):
        return False  # taken over before the record: the other worker's stands
    metrics.ITEMS.labels("generate", "done").inc()
    metrics.REUSED.inc(len(stored))
    log.info("item %d: %d images made before, copied", w.item_id, len(stored))
    return True


def record_made(
    session: Session, moved: list[int], *, made: dict[int, output_ledger.ItemOutputs], now: Any
) -> None:
    """`ClaimedWork.done`'s record: the outputs of the items that moved (generated or copied)."""
    output_ledger.record(session, made={i: made[i] for i in moved}, now=now)
