"""What several stages share: how work is sent on, references read, jobs finished."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from core.errors import ConfigError, ErrorCode, ItemError, ObjectNotFound
from pipeline.images import decode_reference
from pipeline.sources import check_allowed, resolve_reference
from storage.ledger import items, jobs
from storage.lifecycle import EMBED, JobStage, Stage
from storage.models import ItemStatus
from workers import metrics
from workers.stages.results import after_end

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from core.config import Settings
    from storage.embcache import Cached, CacheKey
    from workers.context import StageContext

log = logging.getLogger(__name__)

# Send items on to a stage's workers (a Celery message per chunk; nothing on one machine).
Send = Callable[[Stage, list[int]], None]
SendJob = Callable[[str], None]  # a job's ingest
SendJobStage = Callable[[JobStage, str], None]  # a job to a job stage (ingest, train)


def no_send(stage: Stage, item_ids: list[int]) -> None:
    """The one-machine runner runs every stage itself: nothing to send."""


def chunked(ids: Sequence[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(ids), size):
        yield list(ids[start : start + size])


def send_in_messages(settings: Settings, send: Send, stage: Stage, ids: Sequence[int]) -> None:
    """`ids` to `stage`, in messages of the stage's size: IPBATCH_EMBED_BATCH items for the
    embed stage (an ingest publishes a message per that many rows), IPBATCH_GENERATE_BATCH
    for the generate stage (a message is one stage call, batched within)."""
    size = settings.embed_batch if stage.name == EMBED.name else settings.generate_batch
    for chunk in chunked(ids, size):
        send(stage, chunk)


def read_reference(ctx: StageContext, uri: str) -> bytes:
    """A reference's bytes. What the row names is the row's business: a missing object fails
    the item, and so does one the workers may not read (access denied, a malformed URI): one
    bad row must never stop a worker as a configuration error would."""
    try:
        return ctx.stores.for_uri(uri).get(uri)
    except ObjectNotFound as exc:
        raise ItemError(ErrorCode.REFERENCE_NOT_FOUND, f"{uri} does not exist") from exc
    except ConfigError as exc:
        raise ItemError(
            ErrorCode.REFERENCE_FORBIDDEN,
            f"{uri} cannot be read ({exc}); check the URI, the bucket policy or the workers' "
            "credentials, then `ipbatch retry`",
        ) from exc


@dataclass(frozen=True)
class CachedImage:
    uri: str  # as resolved against the manifest
    sha256: str  # of the picture's bytes
    cached: Cached  # the cache entry of what was made of it


def cache_image(
    ctx: StageContext,
    written: str,
    *,
    manifest_uri: str,
    cache_root: str,
    seen: dict[str, str],
    key_of: Callable[[str], CacheKey],
    make: Callable[[bytes, str], dict[str, torch.Tensor]],
    keep: dict[str, bytes] | None = None,
    found: dict[CacheKey, Cached] | None = None,
    given: bytes | None = None,
) -> CachedImage:
    """One picture a row names, through the content-addressed cache (the embed stage's and
    training's one way): resolved against the manifest, allowed or refused, read once (`seen`
    memoises its hash; `keep`, where given, its bytes too, for a caller that makes several
    things of one picture), and what `make(data, uri)` makes of it found under
    `key_of(sha256)` or made and stored now (under the key's lock: workers that miss the same
    key at once make it once). `found`, where given, memoises the cache entries (a message's
    rows that share a picture look its entry up once). `given`: the bytes of a picture ipbatch
    makes itself (the "noise" negative), named `written`: nothing to resolve, allow or read."""
    data: bytes | None = given
    if given is not None:
        uri = written
    else:
        uri = resolve_reference(written, manifest_uri=manifest_uri)
        check_allowed(uri, allowed=ctx.settings.allowed_sources, local_mode=ctx.local_mode)
        data = None if keep is None else keep.get(uri)
    if uri not in seen:
        data = given if given is not None else read_reference(ctx, uri)
        seen[uri] = hashlib.sha256(data).hexdigest()
        if keep is not None:
            keep[uri] = data
    key = key_of(seen[uri])

    def compute() -> dict[str, torch.Tensor]:
        log.info(
            "computing %s of %s",
            key.kind,
            uri,
            extra={"key": f"{key.content_sha256}/{key.encoder}/{key.kind}", "worker": ctx.worker},
        )
        return make(data if data is not None else read_reference(ctx, uri), uri)

    if found is not None and key in found:
        cached = replace(found[key], hit=True)
    else:
        cached = ctx.cache.ensure(key=key, cache_root=cache_root, compute=compute)
        if found is not None:
            found[key] = cached
    metrics.CACHE.labels("hit" if cached.hit else "miss").inc()
    return CachedImage(uri, seen[uri], cached)


def decode(ctx: StageContext, data: bytes, *, name: str) -> Image.Image:
    return decode_reference(
        data,
        name=name,
        max_pixels=ctx.settings.max_image_pixels,
        max_bytes=ctx.settings.max_reference_bytes,
    )


def send_waiting(
    ctx: StageContext, *, job_id: str, stage: Stage, send: Send, statuses: Iterable[ItemStatus]
) -> int:
    """Send every item of a job in `statuses` to `stage` again, a page at a time."""
    total = 0
    with ctx.sessions.begin() as session:
        pages = items.iter_id_pages(
            session, job_id=job_id, statuses=list(statuses), page_size=ctx.settings.ingest_chunk
        )
        for ids in pages:
            send_in_messages(ctx.settings, send, stage, ids)
            total += len(ids)
    return total


def finalize_jobs(ctx: StageContext, job_ids: Iterable[str]) -> None:
    """Jobs with more failed rows than their --max-failures stop; jobs whose last item just
    ended finish (succeeded, partial or failed)."""
    for job_id in sorted(set(job_ids)):
        with ctx.sessions.begin() as session:
            now = ctx.clock()
            reason = jobs.stop_if_too_many_failed(
                session, job_id=job_id, now=now, worker=ctx.worker
            )
            if reason is not None:
                log.warning("job %s %s", job_id, reason, extra={"job_id": job_id})
            jobs.finalize(session, job_id=job_id, now=now, worker=ctx.worker)
    after_end(ctx, job_ids)
