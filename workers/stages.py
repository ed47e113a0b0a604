"""The stages: register, ingest, embed, generate. Shared by Celery and `ipbatch run`.

Each stage takes ids, claims its items with a guarded transition in the ledger, does its
work and records the result; neither runner has logic of its own. A permanent `ItemError`
fails its item alone; a `RetryableError` (or a `ConfigError`: the models folder is wrong)
releases the claimed items and propagates, so the caller (Celery's retry, or the runner)
can try again or stop with a clear message.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy.exc import InterfaceError, OperationalError

from core.errors import ConfigError, ErrorCode, ItemError, ObjectNotFound, RetryableError
from core.uris import join_uri
from pipeline.images import CONTENT_TYPES, decode_reference, encode_output
from pipeline.manifest import Row, detect_format, read_manifest
from pipeline.sources import check_allowed, resolve_reference
from storage import ledger
from storage.models import ItemStatus, JobStatus
from workers import metrics
from workers.context import StageContext

if TYPE_CHECKING:  # the model stack loads in the embed/generate stages, not for ingest
    import torch
    from sqlalchemy.orm import Session

    from pipeline.embedder import ReferenceEncoder
    from pipeline.generator import GenerationRequest, GenerationResult
    from pipeline.scores import ClipScorer

log = logging.getLogger(__name__)

Enqueue = Callable[[list[int]], None]
T = TypeVar("T")


def chunked(ids: Sequence[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(ids), size):
        yield list(ids[start : start + size])


# --- register -----------------------------------------------------------------------------


def manifest_sha256(ctx: StageContext, manifest_uri: str) -> str:
    digest = hashlib.sha256()
    with ctx.stores.for_uri(manifest_uri).open(manifest_uri) as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def register_job(
    ctx: StageContext, *, manifest_uri: str, output_uri: str, name: str | None = None
) -> tuple[str, bool]:
    """Record a job for a manifest; the same bytes and output give the same job."""
    sha = manifest_sha256(ctx, manifest_uri)
    with ctx.sessions.begin() as session:
        return ledger.create_job(
            session,
            name=name or PurePosixPath(manifest_uri.rstrip("/")).name,
            manifest_uri=manifest_uri,
            manifest_sha256=sha,
            output_uri=output_uri.rstrip("/"),
        )


# --- ingest -------------------------------------------------------------------------------


@dataclass
class IngestSummary:
    rows: int = 0
    valid: int = 0
    invalid: int = 0
    skipped: int = 0  # already in the ledger (a resumed ingest)


def _item_values(parsed: Any) -> dict[str, Any]:
    if parsed.row is not None:
        params = parsed.row.to_params()
        return {
            "row_id": parsed.row_id,
            "row_index": parsed.index,
            "status": ItemStatus.PENDING,
            "params": params,
        }
    return {
        "row_id": parsed.row_id,
        "row_index": parsed.index,
        "status": ItemStatus.FAILED,
        "params": parsed.raw,
        "error_code": ErrorCode.INVALID_ROW.value,
        "error_message": parsed.error,
    }


def ingest(ctx: StageContext, *, job_id: str, enqueue: Enqueue) -> IngestSummary:
    """Stream the manifest into items (a bad row fails alone) and enqueue the pending ones.

    Idempotent: rows already in the ledger are skipped, so a redelivered or resumed ingest
    continues where the last one stopped; pending items are enqueued again (claims are
    guarded, so a duplicate message does nothing).
    """
    summary = IngestSummary()
    with ctx.sessions.begin() as session:
        job = ledger.get_job(session, job_id=job_id)
        if job is None:
            raise ItemError(ErrorCode.INTERNAL, f"no job {job_id}")
        if not ledger.start_job(session, job_id=job_id):
            log.info("job %s is %s: nothing to ingest", job_id, job.status)
            return summary
        manifest_uri, already = job.manifest_uri, ledger.max_row_index(session, job_id=job_id)
        fully_ingested = job.total_rows is not None
    chunk: list[dict[str, Any]] = []

    def flush() -> None:
        with ctx.sessions.begin() as session:
            if ledger.lock_job_status(session, job_id=job_id) == JobStatus.CANCELLED:
                for values in chunk:  # every row still gets its item, cancelled
                    if values["status"] == ItemStatus.PENDING:
                        values |= {"status": ItemStatus.CANCELLED, "error_message": "cancelled"}
            pending = ledger.add_items(session, job_id=job_id, rows=chunk)
        chunk.clear()
        if pending:
            enqueue(pending)

    if not fully_ingested:
        try:
            with ctx.stores.for_uri(manifest_uri).open(manifest_uri) as stream:
                for parsed in read_manifest(stream, detect_format(manifest_uri)):
                    summary.rows += 1
                    if parsed.index <= already:
                        summary.skipped += 1
                        continue
                    if parsed.row is None:
                        summary.invalid += 1
                    else:
                        summary.valid += 1
                    chunk.append(_item_values(parsed))
                    if len(chunk) >= ctx.settings.ingest_chunk:
                        flush()
        except ObjectNotFound as exc:
            with ctx.sessions.begin() as session:
                ledger.fail_job(session, job_id=job_id, message=f"manifest unreadable: {exc}")
            return summary
        if chunk:
            flush()
        with ctx.sessions.begin() as session:
            ledger.mark_ingested(session, job_id=job_id, total_rows=summary.rows)
    if already >= 0 or fully_ingested:  # resumed: re-enqueue what an earlier run left
        requeue_job(ctx, job_id=job_id, enqueue=enqueue, statuses=(ItemStatus.PENDING,))
    with ctx.sessions.begin() as session:
        ledger.finalize_job(session, job_id=job_id)
    return summary


def requeue_job(
    ctx: StageContext, *, job_id: str, enqueue: Enqueue, statuses: Sequence[ItemStatus]
) -> int:
    """Enqueue every item of a job in `statuses` again, a page at a time."""
    total = 0
    with ctx.sessions.begin() as session:
        pages = ledger.iter_id_pages(
            session, job_id=job_id, statuses=statuses, page_size=ctx.settings.ingest_chunk
        )
        for ids in pages:
            enqueue(ids)
            total += len(ids)
    return total


def cancel_job(ctx: StageContext, *, job_id: str) -> int:
    """Cancel a job at once: items not started are cancelled now, running ones at the end
    of their batch. Returns how many items were cancelled now."""
    with ctx.sessions.begin() as session:
        if ledger.get_job(session, job_id=job_id) is None:
            raise ConfigError(f"no job {job_id}")
        return ledger.cancel_job(session, job_id=job_id, worker=ctx.worker)


def retry_job(
    ctx: StageContext, *, job_id: str, enqueue_embed: Enqueue, enqueue_generate: Enqueue
) -> tuple[int, int]:
    """Failed items (not invalid rows) back to pending, and every waiting item of the job
    queued again: the retried ones, and any left waiting without a message (e.g. released
    when a worker hit a configuration error). A duplicate message finds nothing to claim.
    Returns (items retried, other waiting items queued again)."""
    with ctx.sessions.begin() as session:
        if ledger.get_job(session, job_id=job_id) is None:
            raise ConfigError(f"no job {job_id}")
        retried = ledger.retry_failed(session, job_id=job_id, worker=ctx.worker)
    pending = requeue_job(ctx, job_id=job_id, enqueue=enqueue_embed, statuses=[ItemStatus.PENDING])
    ready = requeue_job(ctx, job_id=job_id, enqueue=enqueue_generate, statuses=[ItemStatus.READY])
    return len(retried), pending + ready - len(retried)


def reap(
    ctx: StageContext,
    *,
    enqueue_embed: Enqueue,
    enqueue_generate: Enqueue,
    queue_depth: Callable[[str], int] | None = None,
) -> int:
    """Items whose worker's lease ran out (killed, machine lost, hung past its heartbeat) go
    back to waiting and are queued again. With `queue_depth` (messages waiting in a queue),
    items waiting for a stage whose queue is empty, unmoved for IPBATCH_REQUEUE_AFTER
    seconds, lost their message (a broker restart, a publish or retry that failed for good):
    they are queued again too. Safe to run anywhere, any number of times: moves are guarded
    transitions, a live worker's items are never touched, and a duplicate message finds
    nothing to claim. Returns how many items were queued again."""
    total = 0
    for working, waiting, queue, enqueue in (
        (ItemStatus.EMBEDDING, ItemStatus.PENDING, "embed", enqueue_embed),
        (ItemStatus.RUNNING, ItemStatus.READY, "generate", enqueue_generate),
    ):
        total += _requeue(
            ctx,
            functools.partial(ledger.expired_leases, working=working),
            working,
            waiting,
            enqueue,
            "lease expired: released by the reaper",
        )
        if queue_depth is not None and queue_depth(queue) == 0:
            total += _requeue(
                ctx,
                functools.partial(
                    ledger.stale_waiting, waiting=waiting, idle_seconds=ctx.settings.requeue_after
                ),
                waiting,
                waiting,
                enqueue,
                f"no message for {ctx.settings.requeue_after:g} s and the {queue} queue is "
                "empty: queued again by the reaper",
            )
    return total


def _requeue(
    ctx: StageContext,
    find: Callable[[Session], list[int]],
    from_status: ItemStatus,
    to_status: ItemStatus,
    enqueue: Enqueue,
    why: str,
) -> int:
    total = 0
    while True:
        with ctx.sessions.begin() as session:
            found = find(session)
            moved = ledger.transition(
                session,
                item_ids=found,
                from_status=from_status,
                to_status=to_status,
                worker=ctx.worker,
                message=why,
            )
        for chunk in chunked(moved, ctx.settings.generate_batch):
            enqueue(chunk)
        total += len(moved)
        if not moved or len(found) < 1000:
            return total


# --- embed --------------------------------------------------------------------------------


@dataclass
class EmbedSummary:
    ready: list[int] = field(default_factory=list)
    held: list[int] = field(default_factory=list)  # another worker holds them (live lease)
    retry_in: float = 0.0  # seconds until the first of those leases runs out
    failed: int = 0
    computed: int = 0
    cached: int = 0


def _fail(ctx: StageContext, item_id: int, from_status: ItemStatus, error: ItemError) -> None:
    with ctx.sessions.begin() as session:
        moved = ledger.transition(
            session,
            item_ids=[item_id],
            from_status=from_status,
            to_status=ItemStatus.FAILED,
            worker=ctx.worker,
            error_code=error.code.value,
            message=error.message,
        )
    metrics.ITEMS.labels(metrics.STAGE_OF[from_status.value], "failed").inc(len(moved))


# Not the item's fault: S3 or the network (RetryableError), the database going away, or a
# configuration problem. The items go back to waiting and the task is retried with backoff.
NOT_THE_ITEMS_FAULT = (RetryableError, ConfigError, OperationalError, InterfaceError)


def _release(
    ctx: StageContext, item_ids: Sequence[int], working: ItemStatus, waiting: ItemStatus, why: str
) -> None:
    """Give claimed items back, refunding the claim: an outage is not the item's fault and
    must not count towards IPBATCH_MAX_DELIVERIES (best effort: with the database away, their
    lease runs out instead and the redelivered message or the reaper takes them)."""
    try:
        with ctx.sessions.begin() as session:
            moved = ledger.transition(
                session,
                item_ids=item_ids,
                from_status=working,
                to_status=waiting,
                worker=ctx.worker,
                message=why,
                refund_attempt=True,
            )
        metrics.ITEMS.labels(metrics.STAGE_OF[working.value], "released").inc(len(moved))
    except (OperationalError, InterfaceError):
        log.warning("could not release %d items; their lease will lapse", len(item_ids))


def _short(exc: BaseException) -> str:
    """One line for the item history (SQLAlchemy errors carry the statement)."""
    return str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__


def _read_reference(ctx: StageContext, uri: str) -> bytes:
    try:
        return ctx.stores.for_uri(uri).get(uri)
    except ObjectNotFound as exc:
        raise ItemError(ErrorCode.REFERENCE_NOT_FOUND, f"{uri} does not exist") from exc


def _each_claimed(
    ctx: StageContext,
    work: Sequence[T],
    *,
    item_id: Callable[[T], int],
    working: ItemStatus,
    waiting: ItemStatus,
    unexpected: ErrorCode,
    process: Callable[[T], None],
) -> int:
    """Run `process` on each claimed item; returns how many failed.

    An `ItemError` fails that item alone. Any other exception fails it with `unexpected`
    (the trace goes to the log). A `RetryableError` or `ConfigError` releases this item and
    every item not reached yet back to `waiting`, then propagates.
    """
    failed = 0
    for position, entry in enumerate(work):
        try:
            process(entry)
        except ItemError as error:
            _fail(ctx, item_id(entry), working, error)
            failed += 1
        except NOT_THE_ITEMS_FAULT as exc:
            rest = [item_id(e) for e in work[position:]]
            _release(ctx, rest, working, waiting, f"retrying: {_short(exc)}")
            raise
        except Exception as exc:  # a bug or a model failure: fail the item, log the trace
            log.exception("item %s failed in state %s", item_id(entry), working)
            message = f"{type(exc).__name__}: {exc} (the trace is in the worker log)"
            _fail(ctx, item_id(entry), working, ItemError(unexpected, message))
            failed += 1
    return failed


@contextmanager
def _heartbeat(ctx: StageContext, item_ids: Sequence[int], working: ItemStatus) -> Iterator[None]:
    """While the block runs, renew this worker's claim on `item_ids` every third of the lease
    (a thread), so only a dead or hung worker's items are ever taken over."""
    stop = threading.Event()
    lease = ctx.settings.lease_seconds

    def beat() -> None:
        while not stop.wait(lease / 3):
            try:
                with ctx.sessions.begin() as session:
                    ledger.extend_leases(
                        session, item_ids=item_ids, working=working, lease_seconds=lease
                    )
            except Exception:  # the database is away: the claim may lapse, never a crash
                log.warning("heartbeat for %d items failed", len(item_ids), exc_info=True)

    thread = threading.Thread(target=beat, name="heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _finalize_jobs(ctx: StageContext, job_ids: set[str]) -> None:
    for job_id in sorted(job_ids):
        with ctx.sessions.begin() as session:
            ledger.finalize_job(session, job_id=job_id)


@dataclass(frozen=True)
class _EmbedWork:
    item_id: int
    params: dict[str, Any]
    job_id: str
    manifest_uri: str
    output_uri: str


def embed(ctx: StageContext, *, item_ids: Sequence[int]) -> EmbedSummary:
    """Compute (or find cached) the embeddings every claimed item needs; mark them ready."""
    summary = EmbedSummary()
    with ctx.sessions.begin() as session:
        claimed = ledger.claim(
            session,
            item_ids=item_ids,
            waiting=ItemStatus.PENDING,
            working=ItemStatus.EMBEDDING,
            worker=ctx.worker,
            lease_seconds=ctx.settings.lease_seconds,
            max_attempts=ctx.settings.max_deliveries,
        )
        others = sorted(set(item_ids) - set(claimed))
        summary.held, summary.retry_in = ledger.held_elsewhere(
            session, item_ids=others, working=ItemStatus.EMBEDDING
        )
        # embedded by an earlier delivery whose worker may have died before queueing them
        summary.ready += [
            i.id
            for i in ledger.load_items(session, item_ids=others)
            if i.status == ItemStatus.READY
        ]
        work = []
        for item in ledger.load_items(session, item_ids=claimed):
            job = ledger.get_job(session, job_id=item.job_id)
            assert job is not None and item.params is not None, "pending items carry their row"
            work.append(_EmbedWork(item.id, item.params, job.id, job.manifest_uri, job.output_uri))
    seen: dict[str, str] = {}  # this call's memo: a shared reference is read and hashed once

    def process(entry: _EmbedWork) -> None:
        links = _embed_item(ctx, entry.params, entry.manifest_uri, entry.output_uri, seen, summary)
        with ctx.sessions.begin() as session:
            ledger.link_embeddings(session, item_id=entry.item_id, links=links)
            moved = ledger.transition(
                session,
                item_ids=[entry.item_id],
                from_status=ItemStatus.EMBEDDING,
                to_status=ItemStatus.READY,
                worker=ctx.worker,
            )
        summary.ready += moved
        metrics.ITEMS.labels("embed", "done").inc(len(moved))

    with _heartbeat(ctx, claimed, ItemStatus.EMBEDDING):
        summary.failed = _each_claimed(
            ctx,
            work,
            item_id=lambda entry: entry.item_id,
            working=ItemStatus.EMBEDDING,
            waiting=ItemStatus.PENDING,
            unexpected=ErrorCode.INTERNAL,
            process=process,
        )
    _finalize_jobs(ctx, {entry.job_id for entry in work})
    return summary


def _embed_item(
    ctx: StageContext,
    params: dict[str, Any],
    manifest_uri: str,
    output_uri: str,
    seen: dict[str, str],
    summary: EmbedSummary,
) -> list[dict[str, Any]]:
    from storage.embcache import CacheKey

    row = Row.model_validate(params)
    links: list[dict[str, Any]] = []
    for adapter_index, spec in enumerate(row.adapter_specs()):
        encoder = ctx.encoder(spec.adapter)
        for reference_index, reference in enumerate(spec.references):
            uri = resolve_reference(reference, manifest_uri=manifest_uri)
            check_allowed(uri, allowed=ctx.settings.allowed_sources, local_mode=ctx.local_mode)
            data: bytes | None = None
            if uri not in seen:
                data = _read_reference(ctx, uri)
                seen[uri] = hashlib.sha256(data).hexdigest()
            key = CacheKey(seen[uri], encoder.fingerprint, encoder.kind.value)
            compute = functools.partial(_compute_embedding, ctx, encoder, uri, data)
            with ctx.sessions.begin() as session:
                embedding_id, cached = ctx.cache.get_or_compute(
                    session, key=key, cache_root=ctx.cache_root(output_uri), compute=compute
                )
            if cached:
                summary.cached += 1
            else:
                summary.computed += 1
            metrics.CACHE.labels("hit" if cached else "miss").inc()
            links.append(
                {
                    "adapter_index": adapter_index,
                    "reference_index": reference_index,
                    "embedding_id": embedding_id,
                    "reference_uri": uri,
                }
            )
    return links


def _compute_embedding(
    ctx: StageContext, encoder: ReferenceEncoder, uri: str, data: bytes | None
) -> dict[str, torch.Tensor]:
    raw = data if data is not None else _read_reference(ctx, uri)
    image = decode_reference(
        raw,
        name=uri,
        max_pixels=ctx.settings.max_image_pixels,
        max_bytes=ctx.settings.max_reference_bytes,
    )
    return encoder.encode(image, name=uri)


# --- generate -----------------------------------------------------------------------------


@dataclass
class GenerateSummary:
    succeeded: int = 0
    failed: int = 0
    images: int = 0
    held: list[int] = field(default_factory=list)  # another worker holds them (live lease)
    retry_in: float = 0.0


def output_uri_for(output_uri: str, job_id: str, row_id: str, k: int, fmt: str) -> str:
    return join_uri(output_uri, job_id, row_id, f"{k}.{fmt}")


def adapter_set(params: dict[str, Any] | None) -> tuple[str, ...]:
    """Which warm pipeline an item needs (items are grouped by it to avoid reloads)."""
    if not params:
        return ()
    if params.get("adapters"):
        return tuple(str(spec.get("adapter", "sd15")) for spec in params["adapters"])
    return (str(params.get("adapter", "sd15")),)


def _combine(tensors: list[dict[str, torch.Tensor]], how: str) -> dict[str, torch.Tensor]:
    """Several references of one adapter: average them, or concatenate as extra tokens."""
    import torch

    combined = {name: torch.cat([t[name] for t in tensors]) for name in tensors[0]}
    if how == "average" and len(tensors) > 1:
        return {name: value.mean(dim=0, keepdim=True) for name, value in combined.items()}
    return combined


@dataclass(frozen=True)
class _GenerateWork:
    item_id: int
    row_id: str
    params: dict[str, Any]
    job_id: str
    output_uri: str
    embeddings: list[tuple[int, str]]  # (adapter_index, cache uri), in reference order
    references: list[tuple[str, str]]  # (content sha256, uri) of each distinct reference


@dataclass(frozen=True)
class _Prepared:
    """A claimed item with its embeddings loaded: ready for a diffusers call."""

    entry: _GenerateWork
    row: Row
    request: GenerationRequest


def generate(ctx: StageContext, *, item_ids: Sequence[int]) -> GenerateSummary:
    """Generate, upload and record the images of every claimed item.

    Items that can share a diffusers call are batched (up to `batch_images` images a call);
    encoding, uploading and recording one batch overlaps generating the next.
    """
    summary = GenerateSummary()
    with ctx.sessions.begin() as session:
        claimed = ledger.claim(
            session,
            item_ids=item_ids,
            waiting=ItemStatus.READY,
            working=ItemStatus.RUNNING,
            worker=ctx.worker,
            lease_seconds=ctx.settings.lease_seconds,
            max_attempts=ctx.settings.max_deliveries,
        )
        summary.held, summary.retry_in = ledger.held_elsewhere(
            session, item_ids=sorted(set(item_ids) - set(claimed)), working=ItemStatus.RUNNING
        )
        work = []
        for item in ledger.load_items(session, item_ids=claimed):
            job = ledger.get_job(session, job_id=item.job_id)
            assert job is not None and item.params is not None and item.row_id is not None
            links = ledger.item_embeddings(session, item_id=item.id)
            embeddings = [(link.adapter_index, emb.uri) for link, emb in links]
            references = list(
                dict.fromkeys((emb.content_sha256, link.reference_uri) for link, emb in links)
            )
            work.append(
                _GenerateWork(
                    item.id,
                    item.row_id,
                    item.params,
                    job.id,
                    job.output_uri,
                    embeddings,
                    references,
                )
            )

    claimed_ids = [entry.item_id for entry in work]
    with _heartbeat(ctx, claimed_ids, ItemStatus.RUNNING):
        _generate_claimed(ctx, work, summary)
    _finalize_jobs(ctx, {entry.job_id for entry in work})
    return summary


def _generate_claimed(
    ctx: StageContext, work: list[_GenerateWork], summary: GenerateSummary
) -> None:
    # 1. requests, with the cached embeddings loaded (fetched in parallel first; a bad item
    #    fails alone)
    loaded = _prefetch(ctx, {uri for entry in work for _, uri in entry.embeddings})
    prepared: list[_Prepared] = []
    summary.failed += _each_claimed(
        ctx,
        work,
        item_id=lambda entry: entry.item_id,
        working=ItemStatus.RUNNING,
        waiting=ItemStatus.READY,
        unexpected=ErrorCode.INTERNAL,
        process=lambda entry: prepared.append(_prepare(ctx, entry, loaded)),
    )
    # 2. batches of rows that can share a call; 3. generate each while the previous one is
    #    encoded, uploaded and recorded on the finisher thread
    batches = plan_batches(prepared, max_images=ctx.batch_images)
    finishing: list[Future[None]] = []
    started = 0
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="finish") as finisher:
            for batch in batches:
                if any(f.done() and f.exception() for f in finishing):
                    break
                started += 1
                batch = _drop_cancelled(ctx, batch)
                if not batch:
                    continue
                results, scored = _score_batch(ctx, batch, _run_batch(ctx, batch))
                finishing.append(
                    finisher.submit(_finish_batch, ctx, batch, results, scored, summary)
                )
    except NOT_THE_ITEMS_FAULT as exc:  # from _run_batch: not one item's fault
        _release(
            ctx,
            [p.entry.item_id for b in batches[started - 1 :] for p in b],
            ItemStatus.RUNNING,
            ItemStatus.READY,
            f"retrying: {_short(exc)}",
        )
        raise
    errors = [e for f in finishing if (e := f.exception()) is not None]
    if errors:
        unrun = [p.entry.item_id for b in batches[started:] for p in b]
        _release(ctx, unrun, ItemStatus.RUNNING, ItemStatus.READY, f"retrying: {_short(errors[0])}")
        raise errors[0]


def _drop_cancelled(ctx: StageContext, batch: list[_Prepared]) -> list[_Prepared]:
    """At a batch boundary: items whose job was cancelled are cancelled instead of generated
    (`ipbatch cancel` stops running items here). Returns the rest of the batch."""
    job_ids = {p.entry.job_id for p in batch}
    with ctx.sessions.begin() as session:
        cancelled = {
            job_id
            for job_id in job_ids
            if (job := ledger.get_job(session, job_id=job_id)) is not None
            and job.status == JobStatus.CANCELLED
        }
        if not cancelled:
            return batch
        ledger.transition(
            session,
            item_ids=[p.entry.item_id for p in batch if p.entry.job_id in cancelled],
            from_status=ItemStatus.RUNNING,
            to_status=ItemStatus.CANCELLED,
            worker=ctx.worker,
            message="job cancelled",
        )
    return [p for p in batch if p.entry.job_id not in cancelled]


def _prefetch(ctx: StageContext, uris: set[str]) -> dict[str, dict[str, torch.Tensor]]:
    """Load cached embeddings on a few threads, so that S3 round trips overlap. A fetch that
    fails is left out: the row's own `_prepare` fetches it again and fails or retries it."""

    def fetch(uri: str) -> tuple[str, dict[str, torch.Tensor] | None]:
        try:
            return uri, ctx.cache.load(uri)
        except Exception:
            return uri, None

    if len(uris) <= 1:
        return {}
    with ThreadPoolExecutor(max_workers=min(8, len(uris)), thread_name_prefix="fetch") as pool:
        return {uri: t for uri, t in pool.map(fetch, sorted(uris)) if t is not None}


def plan_batches(prepared: Sequence[_Prepared], *, max_images: int) -> list[list[_Prepared]]:
    """Group rows that can share a diffusers call (same pipeline and `batch_key`), in manifest
    order within a group, into batches of at most `max_images` images (a bigger row: alone)."""
    from pipeline.generator import batch_key

    groups: dict[tuple[object, ...], list[_Prepared]] = {}
    for p in prepared:
        key = (adapter_set(p.entry.params), batch_key(p.request))
        groups.setdefault(key, []).append(p)
    batches: list[list[_Prepared]] = []
    for group in sorted(groups.values(), key=lambda g: adapter_set(g[0].entry.params)):
        batch: list[_Prepared] = []
        for p in group:
            if batch and sum(b.row.num_images for b in batch) + p.row.num_images > max_images:
                batches.append(batch)
                batch = []
            batch.append(p)
        if batch:
            batches.append(batch)
    return batches


def _run_batch(ctx: StageContext, batch: list[_Prepared]) -> list[GenerationResult | BaseException]:
    """One diffusers call for the batch; if it fails, each row alone, so that one bad row
    fails by itself. Retryable and configuration errors propagate."""
    generator = ctx.generators.get(adapter_set(batch[0].entry.params))
    try:
        with metrics.BATCH_SECONDS.time():
            return list(generator.generate_batch([p.request for p in batch]))
    except NOT_THE_ITEMS_FAULT:
        raise
    except Exception as exc:
        if len(batch) == 1:
            return [exc]
        log.warning("a batch of %d rows failed (%s); running them one by one", len(batch), exc)
    results: list[GenerationResult | BaseException] = []
    for p in batch:
        try:
            results.append(generator.generate(p.request))
        except NOT_THE_ITEMS_FAULT:
            raise
        except Exception as exc:
            results.append(exc)
    return results


def _finish_batch(
    ctx: StageContext,
    batch: list[_Prepared],
    results: list[GenerationResult | BaseException],
    scored: dict[int, _Scored],
    summary: GenerateSummary,
) -> None:
    """Encode and upload every image of the batch, then record all its items in one
    transaction (outputs rows with their scores, attempts, succeeded). Runs on the finisher
    thread."""
    done: list[tuple[int, list[dict[str, Any]], str | None]] = []
    by_item = {p.entry.item_id: r for p, r in zip(batch, results, strict=True)}

    def upload(p: _Prepared) -> None:
        result = by_item[p.entry.item_id]
        if isinstance(result, BaseException):
            raise result
        scores = scored.get(p.entry.item_id)
        outputs = _store_images(ctx, p, result)
        if scores is not None:
            for out, (ci, ct) in zip(outputs, scores.scores, strict=True):
                out |= {"clip_i": ci, "clip_t": ct}
        done.append((p.entry.item_id, outputs, result.warning))

    try:
        summary.failed += _each_claimed(
            ctx,
            batch,
            item_id=lambda p: p.entry.item_id,
            working=ItemStatus.RUNNING,
            waiting=ItemStatus.READY,
            unexpected=ErrorCode.MODEL_ERROR,
            process=upload,
        )
    finally:  # items whose images are all stored are recorded, even if a later one failed
        if done:
            with ctx.sessions.begin() as session:
                recorded = [
                    (item_id, len(outputs))
                    for item_id, outputs, warning in done
                    if ledger.complete_item(
                        session,
                        item_id=item_id,
                        outputs=outputs,
                        worker=ctx.worker,
                        warning=warning,
                        attempts=scored[item_id].attempts if item_id in scored else (),
                    )
                ]
            images = sum(n for _, n in recorded)
            summary.succeeded += len(recorded)
            summary.images += images
            metrics.ITEMS.labels("generate", "done").inc(len(recorded))
            metrics.IMAGES.inc(images)
            log.info(
                "stored %d images of %d items",
                images,
                len(recorded),
                extra={
                    "job_ids": sorted({p.entry.job_id for p in batch}),
                    "item_ids": [item_id for item_id, _ in recorded],
                    "worker": ctx.worker,
                },
            )


@dataclass
class _Scored:
    scores: list[tuple[float, float | None]]  # per image: (clip_i, clip_t)
    attempts: list[dict[str, Any]]  # output_attempts rows


def _score_batch(
    ctx: StageContext, batch: list[_Prepared], results: list[GenerationResult | BaseException]
) -> tuple[list[GenerationResult | BaseException], dict[int, _Scored]]:
    """CLIP-I and CLIP-T of every image; with IPBATCH_SCORE_THRESHOLD, images below it are
    generated again with the next seed (up to IPBATCH_SCORE_TRIES attempts) and the best kept.
    Runs on the generation thread (regenerating needs the GPU)."""
    scorer = ctx.scorer
    if scorer is None:
        return results, {}
    import torch

    scored: dict[int, _Scored] = {}
    refs: dict[str, torch.Tensor] = {}
    out: list[GenerationResult | BaseException] = []
    for p, result in zip(batch, results, strict=True):
        if isinstance(result, BaseException):
            out.append(result)
            continue
        try:
            references = torch.cat(
                [
                    _reference_score(ctx, scorer, sha, uri, p, refs)
                    for sha, uri in p.entry.references
                ]
            )
            text = scorer.text_embeds([p.row.prompt])[0] if p.row.prompt else None
            result, scored[p.entry.item_id] = _score_item(ctx, p, result, references, text)
        except NOT_THE_ITEMS_FAULT:
            raise
        except Exception as exc:  # this item alone: it fails with its error
            out.append(exc)
            continue
        out.append(result)
    return out, scored


def _score_item(
    ctx: StageContext,
    p: _Prepared,
    result: GenerationResult,
    references: torch.Tensor,
    text: torch.Tensor | None,
) -> tuple[GenerationResult, _Scored]:
    from pipeline.scores import clip_i, clip_t

    scorer = ctx.scorer
    assert scorer is not None
    embeds = scorer.image_embeds(result.images)
    scores = [(clip_i(e, references), clip_t(e, text)) for e in embeds]
    images, seeds = list(result.images), list(result.seeds)
    attempts = [
        {"image_index": k, "attempt": 0, "seed": seed, "clip_i": ci, "clip_t": ct, "kept": True}
        for k, (seed, (ci, ct)) in enumerate(zip(seeds, scores, strict=True))
    ]
    threshold = ctx.settings.score_threshold
    if threshold is not None:
        generator = ctx.generators.get(adapter_set(p.entry.params))
        for k in range(len(images)):
            kept = attempts[k]
            for attempt in range(1, ctx.settings.score_tries):
                if scores[k][0] >= threshold:
                    break
                seed = (p.request.seed + k + attempt * p.request.num_images) % 2**32
                again = generator.generate(replace(p.request, seed=seed, num_images=1))
                [embed] = scorer.image_embeds(again.images)
                ci, ct = clip_i(embed, references), clip_t(embed, text)
                row = {"image_index": k, "attempt": attempt, "seed": seed}
                attempts.append(row | {"clip_i": ci, "clip_t": ct, "kept": False})
                if ci > scores[k][0]:  # better: this one is kept
                    kept["kept"], attempts[-1]["kept"], kept = False, True, attempts[-1]
                    images[k], seeds[k], scores[k] = again.images[0], seed, (ci, ct)
    kept_result = replace(result, images=images, seeds=seeds)
    return kept_result, _Scored(scores, attempts)


def _reference_score(
    ctx: StageContext,
    scorer: ClipScorer,
    sha: str,
    uri: str,
    p: _Prepared,
    memo: dict[str, torch.Tensor],
) -> torch.Tensor:
    """The scoring model's embedding of a reference, [1, d]: content-addressed in the cache
    like the adapters' embeddings, so each reference is scored once, ever."""
    from storage.embcache import CacheKey

    if sha not in memo:
        key = CacheKey(sha, scorer.fingerprint, "clip_score")
        computed: dict[str, torch.Tensor] = {}

        def compute() -> dict[str, torch.Tensor]:
            image = decode_reference(
                _read_reference(ctx, uri),
                name=uri,
                max_pixels=ctx.settings.max_image_pixels,
                max_bytes=ctx.settings.max_reference_bytes,
            )
            computed["pos"] = scorer.image_embeds([image])
            return computed

        with ctx.sessions.begin() as session:
            embedding_id, cached = ctx.cache.get_or_compute(
                session, key=key, cache_root=ctx.cache_root(p.entry.output_uri), compute=compute
            )
            uri_of_cached = ledger.embedding_uri(session, embedding_id=embedding_id)
        metrics.CACHE.labels("hit" if cached else "miss").inc()
        if cached:
            computed = ctx.cache.load(uri_of_cached)
        memo[sha] = computed["pos"]
    return memo[sha]


def _prepare(
    ctx: StageContext, entry: _GenerateWork, loaded: dict[str, dict[str, torch.Tensor]]
) -> _Prepared:
    from pipeline.generator import AdapterInput, GenerationRequest

    row = Row.model_validate(entry.params)
    inputs: list[AdapterInput] = []
    for adapter_index, spec in enumerate(row.adapter_specs()):
        uris = [uri for a, uri in entry.embeddings if a == adapter_index]
        if len(uris) != len(spec.references):
            raise ItemError(ErrorCode.INTERNAL, "embeddings missing for this item; retry it")
        tensors = []
        for uri in uris:
            if uri not in loaded:
                loaded[uri] = ctx.cache.load(uri)
            tensors.append(loaded[uri])
        parts = _combine(tensors, spec.combine)
        inputs.append(
            AdapterInput(
                adapter=spec.adapter,
                scale=spec.scale,
                pos=parts["pos"],
                neg=parts["neg"],
                clip_pos=parts.get("clip_pos"),
                clip_neg=parts.get("clip_neg"),
            )
        )
    request = GenerationRequest(
        prompt=row.prompt,
        negative_prompt=row.negative_prompt,
        adapters=inputs,
        num_images=row.num_images,
        seed=row.effective_seed(),
        steps=row.steps,
        guidance_scale=row.guidance_scale,
        width=row.width,
        height=row.height,
    )
    return _Prepared(entry, row, request)


def _store_images(
    ctx: StageContext, prepared: _Prepared, result: GenerationResult
) -> list[dict[str, Any]]:
    entry, row = prepared.entry, prepared.row
    outputs = []
    for k, (image, seed) in enumerate(zip(result.images, result.seeds, strict=True)):
        metadata = {
            "job_id": entry.job_id,
            "row_id": entry.row_id,
            "image_index": k,
            "seed": seed,
            "prompt": row.prompt,
            "negative_prompt": row.negative_prompt,
            "steps": row.steps,
            "guidance_scale": row.guidance_scale,
            "adapters": [s.model_dump(mode="json") for s in row.adapter_specs()],
        }
        data = encode_output(image, row.output_format, metadata)
        uri = output_uri_for(entry.output_uri, entry.job_id, entry.row_id, k, row.output_format)
        # first writer wins: after a crash between upload and commit, or a late duplicate,
        # the stored image is kept and recorded as it is (never two versions of one key)
        data = ctx.stores.for_uri(uri).put_new(
            uri, data, content_type=CONTENT_TYPES[row.output_format]
        )
        outputs.append(
            {
                "image_index": k,
                "uri": uri,
                "sha256": hashlib.sha256(data).hexdigest(),
                "seed": seed,
                "width": result.width,
                "height": result.height,
            }
        )
    return outputs
