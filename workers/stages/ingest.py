"""Ingest: stream a job's manifest into items, a chunk at a time; a bad row fails alone.

Ingest claims the job (`claimed_job`: a lease with a fencing token, like a stage's claim on
items), so a duplicate message does nothing and a dead ingest's job is taken over. It resumes
where the last one stopped: rows already in the ledger are skipped, and the pending items an
earlier ingest recorded are sent on again (a duplicate message finds nothing to claim).

A chunk is recorded (one transaction) by a writer thread while the next chunk is read and
validated, and its embed messages are published by a third thread, so the ledger's and the
broker's time overlaps the validation's. Chunks are recorded in order and the first failure
stops the rest: what is in the ledger is always the manifest's first rows, with no gap for a
resume to miss.
"""

from __future__ import annotations

import functools
import logging
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import IO, Any

from core.errors import ConfigError, ErrorCode, ObjectNotFound
from pipeline.manifest import Row
from pipeline.manifest_reader import NotAManifest, ParsedRow, detect_format, read_manifest
from storage.ledger import bulk, items, job_claims, jobs
from storage.lifecycle import EMBED, INGEST
from storage.models import ItemStatus, JobStatus
from workers.claims import JobClaim, JobInputError, claimed_job, hold_job
from workers.context import StageContext
from workers.stages.common import Send, finalize_jobs, send_in_messages, send_waiting

log = logging.getLogger(__name__)

# While an ingest runs, a thread waiting for the GIL takes it after 0.5 ms, not Python's
# 5 ms: the writer makes ~10 round trips to the ledger per chunk and, back from each, waits
# for the reading thread to let go. Measured with bench/ingest.py (200,000 rows): 5 ms 11.6 s,
# 0.5 ms 10.5 s, 0.1 ms 11.0 s (threads swapping too often).
WRITER_SWITCH_INTERVAL = 0.0005


@dataclass
class IngestSummary:
    rows: int = 0
    valid: int = 0
    invalid: int = 0
    skipped: int = 0  # already in the ledger (a resumed ingest)


def run(ctx: StageContext, *, job_id: str, send: Send) -> IngestSummary:
    """Read the job's manifest into items and send the valid ones to the embed stage."""
    summary = IngestSummary()
    # 1. claim the job (nothing to do if another ingest holds it, or it was fully read)
    with claimed_job(ctx, INGEST, job_id) as claim:
        if claim is None:
            log.info("job %s: ingest held elsewhere, done or ended: nothing to do", job_id)
            return summary
        with ctx.sessions.begin() as session:
            job = jobs.get(session, job_id=job_id)
            assert job is not None, "a claimed job exists"
            manifest_uri = job.manifest_uri
            already = items.max_row_index(session, job_id=job_id)
        # 2. stream the rows after the last one recorded, a chunk of items at a time
        rows = _rows_after(ctx, manifest_uri, already, summary)
        _record_in_order(ctx, claim, _chunks(rows, ctx.settings.ingest_chunk), send)
        # 3. a resumed ingest sends on what the one before it recorded (and maybe not sent)
        if already >= 0:
            send_waiting(ctx, job_id=job_id, stage=EMBED, send=send, statuses=[EMBED.waiting])
        # 4. the whole manifest is read: from now on the job can finish
        with ctx.sessions.begin() as session:
            job_claims.end(
                session,
                job_id=job_id,
                token=claim.token,
                now=ctx.clock(),
                worker=ctx.worker,
                message=f"manifest read: {summary.rows} rows",
                values={"total_rows": summary.rows},
            )
    finalize_jobs(ctx, [job_id])
    return summary


def _rows_after(
    ctx: StageContext, manifest_uri: str, already: int, summary: IngestSummary
) -> Iterator[dict[str, Any]]:
    """The manifest's rows after row index `already`, as item values (valid: pending with
    the validated row in params; invalid: failed as invalid_row with the reason)."""
    with _manifest(ctx, manifest_uri) as stream:
        parsed_rows = read_manifest(stream, detect_format(manifest_uri), adapters=ctx.adapters)
        for parsed in _or_job_error(parsed_rows, manifest_uri):
            summary.rows += 1
            if parsed.index <= already:
                summary.skipped += 1
                continue
            if parsed.row is None:
                summary.invalid += 1
            else:
                summary.valid += 1
            yield _item_values(parsed)


def _or_job_error(rows: Iterator[ParsedRow[Row]], manifest_uri: str) -> Iterator[ParsedRow[Row]]:
    """A file that is not a manifest at all fails its job with one message."""
    try:
        yield from rows
    except NotAManifest as exc:
        raise JobInputError(f"{manifest_uri}: {exc}") from exc


@contextmanager
def _manifest(ctx: StageContext, manifest_uri: str) -> Iterator[IO[bytes]]:
    """The manifest, streamed; missing or forbidden (access denied, a malformed URI) is the
    job's problem. Reads that fail half way are outages, raised as they are."""
    with ExitStack() as stack:
        try:
            stream = stack.enter_context(ctx.stores.for_uri(manifest_uri).open(manifest_uri))
        except (ObjectNotFound, ConfigError) as exc:
            raise JobInputError(f"manifest unreadable: {exc}") from exc
        yield stream


def _item_values(parsed: ParsedRow[Row]) -> dict[str, Any]:
    if parsed.row is not None:
        return {
            "row_id": parsed.row_id,
            "row_index": parsed.index,
            "status": ItemStatus.PENDING,
            "params": parsed.row.params_json(),  # serialized here, not on the writer
        }
    return {
        "row_id": parsed.row_id,
        "row_index": parsed.index,
        "status": ItemStatus.FAILED,
        "params": parsed.raw,
        "error_code": ErrorCode.INVALID_ROW.value,
        "error_message": parsed.error,
    }


def _chunks(rows: Iterator[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    chunk: list[dict[str, Any]] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _record_in_order(
    ctx: StageContext, claim: JobClaim, chunks: Iterator[list[dict[str, Any]]], send: Send
) -> None:
    """Record each chunk (`_record_chunk`) on a writer thread while the next one is read,
    and publish its embed messages on a publisher thread while the writer goes on: one chunk
    in the writer's hands at a time, the next waiting. The first error (a chunk's write or a
    publish) stops the rest: later chunks return at once, unrecorded, and it is raised here.
    Items recorded but not sent are waiting items: a resumed ingest sends them."""
    stopped = threading.Event()
    published: list[Future[None]] = []  # appended by the writer only

    def stop_on_error(step: Callable[[], None]) -> None:
        if stopped.is_set():  # an earlier step failed: nothing after it is done
            return
        try:
            step()
        except BaseException:
            stopped.set()
            raise

    def record(chunk: list[dict[str, Any]]) -> None:
        pending = _record_chunk(ctx, claim, chunk)
        published.append(
            publisher.submit(
                stop_on_error, lambda: send_in_messages(ctx.settings, send, EMBED, pending)
            )
        )

    written: deque[Future[None]] = deque()
    with (
        _switch_interval(WRITER_SWITCH_INTERVAL),
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="ingest-publisher") as publisher,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="ingest-writer") as writer,
    ):
        try:
            for chunk in chunks:
                if stopped.is_set():
                    break
                written.append(writer.submit(stop_on_error, functools.partial(record, chunk)))
                if len(written) > 1:  # the chunk before: recorded (or raise its error)
                    written.popleft().result()
            while written:
                written.popleft().result()
            for sent in published:
                sent.result()
        except BaseException:
            stopped.set()  # what is queued returns at once; the chunk being written ends
            raise


@contextmanager
def _switch_interval(seconds: float) -> Iterator[None]:
    previous = sys.getswitchinterval()
    sys.setswitchinterval(seconds)
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


def _record_chunk(ctx: StageContext, claim: JobClaim, chunk: list[dict[str, Any]]) -> list[int]:
    """One transaction per chunk, under the job's lock and claim (renewed by it): a cancel
    that came first makes every row of the chunk a cancelled item. Returns the items to send
    to the embed stage."""
    with ctx.sessions.begin() as session:
        status = hold_job(ctx, session, claim)
        if status != JobStatus.RUNNING:  # cancelled or stopped: every row gets its item, cancelled
            for values in chunk:
                if values["status"] == ItemStatus.PENDING:
                    values |= {"status": ItemStatus.CANCELLED, "error_message": str(status)}
        pending = bulk.add_items(session, job_id=claim.job_id, rows=chunk, now=ctx.clock())
        now = ctx.clock()
        if jobs.stop_if_too_many_failed(session, job_id=claim.job_id, now=now, worker=ctx.worker):
            pending = []  # the job stopped: what this chunk added is cancelled with it
    return pending
