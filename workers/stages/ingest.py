"""Ingest: stream a job's manifest into items, a chunk at a time; a bad row fails alone.

Ingest claims the job (`claimed_job`: a lease with a fencing token, like a stage's claim on
items), so a duplicate message does nothing and a dead ingest's job is taken over. It resumes
where the last one stopped: rows already in the ledger are skipped, and the pending items an
earlier ingest recorded are sent on again (a duplicate message finds nothing to claim).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
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
from workers.stages.common import Send, chunked, finalize_jobs, send_waiting

log = logging.getLogger(__name__)


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
        for chunk in _chunks(rows, ctx.settings.ingest_chunk):
            _record_chunk(ctx, claim, chunk, send)
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
            "params": parsed.row.to_params(),
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


def _record_chunk(
    ctx: StageContext, claim: JobClaim, chunk: list[dict[str, Any]], send: Send
) -> None:
    """One transaction per chunk, under the job's lock and claim (renewed by it): a cancel
    that came first makes every row of the chunk a cancelled item; then the valid ones go to
    the embed stage."""
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
    for ids in chunked(pending, ctx.settings.generate_batch):
        send(EMBED, ids)
