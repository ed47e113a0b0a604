"""Ingest: stream a job's manifest into items, a chunk at a time; a bad row fails alone.

Ingest claims the job (a lease with a fencing token, like a stage's claim on items), so a
duplicate message does nothing and a dead ingest's job is taken over. It resumes where the
last one stopped: rows already in the ledger are skipped, and the pending items an earlier
ingest recorded are sent on again (a duplicate message finds nothing to claim).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import IO, Any

from core.errors import Action, ConfigError, ErrorCode, ObjectNotFound, classify
from pipeline.manifest import Row
from pipeline.manifest_reader import ParsedRow, detect_format, read_manifest
from storage.ledger import bulk, items, jobs
from storage.lifecycle import EMBED
from storage.models import ItemStatus, JobStatus
from workers.context import StageContext
from workers.stages.common import Send, chunked, finalize_jobs, send_waiting

log = logging.getLogger(__name__)


@dataclass
class IngestSummary:
    rows: int = 0
    valid: int = 0
    invalid: int = 0
    skipped: int = 0  # already in the ledger (a resumed ingest)


class _ClaimLost(Exception):
    """Another ingest took the job over (ours lapsed): stop, write nothing more."""


class _Unreadable(Exception):
    """The manifest is not there, or may not be read: the job fails (not the worker)."""


def run(ctx: StageContext, *, job_id: str, send: Send) -> IngestSummary:
    """Read the job's manifest into items and send the valid ones to the embed stage."""
    summary = IngestSummary()
    # 1. claim the job (nothing to do if another ingest holds it, or it was fully read)
    with ctx.sessions.begin() as session:
        job = jobs.get(session, job_id=job_id)
        if job is None:
            log.warning("ingest for unknown job %s: nothing to do", job_id)
            return summary
        token = jobs.claim_ingest(
            session,
            job_id=job_id,
            worker=ctx.worker,
            lease_seconds=ctx.settings.lease_seconds,
            now=ctx.clock(),
        )
        manifest_uri = job.manifest_uri
        already = items.max_row_index(session, job_id=job_id)
    if token is None:
        log.info("job %s: ingest held elsewhere, done or ended: nothing to do", job_id)
        return summary
    with _holding_job(ctx, job_id, token):
        # 2. stream the rows after the last one recorded, a chunk of items at a time
        rows = _rows_after(ctx, manifest_uri, already, summary)
        for chunk in _chunks(rows, ctx.settings.ingest_chunk):
            _record_chunk(ctx, job_id, token, chunk, send)
        # 3. a resumed ingest sends on what the one before it recorded (and maybe not sent)
        if already >= 0:
            send_waiting(ctx, job_id=job_id, stage=EMBED, send=send, statuses=[EMBED.waiting])
        # 4. the whole manifest is read: from now on the job can finish
        with ctx.sessions.begin() as session:
            jobs.finish_ingest(
                session,
                job_id=job_id,
                token=token,
                total_rows=summary.rows,
                now=ctx.clock(),
                worker=ctx.worker,
            )
    finalize_jobs(ctx, [job_id])
    return summary


@contextmanager
def _holding_job(ctx: StageContext, job_id: str, token: str) -> Iterator[None]:
    """The ingest's claim scope: on an outage or a configuration error the job is given back
    (it waits for ingest again) and the error goes on to the caller; a manifest that cannot
    be read fails the job; a claim taken over ends this ingest quietly."""
    try:
        yield
    except _ClaimLost:
        log.warning("job %s: another ingest took it over; this one stops", job_id)
    except _Unreadable as exc:
        _fail_job(ctx, job_id, f"manifest unreadable: {exc}")
    except BaseException as exc:
        decision = classify(exc)
        if decision.action is Action.FAIL:
            log.error("ingest of job %s failed", job_id, exc_info=exc)
            _fail_job(ctx, job_id, f"ingest failed: {decision.message}")
            return
        try:
            with ctx.sessions.begin() as session:
                jobs.release_ingest(
                    session,
                    job_id=job_id,
                    token=token,
                    now=ctx.clock(),
                    worker=ctx.worker,
                    message=f"ingest given back: {decision.message}",
                )
        except Exception:
            log.warning("could not give job %s back; its ingest lease will lapse", job_id)
        raise


def _fail_job(ctx: StageContext, job_id: str, message: str) -> None:
    with ctx.sessions.begin() as session:
        jobs.fail(session, job_id=job_id, message=message, now=ctx.clock(), worker=ctx.worker)


def _rows_after(
    ctx: StageContext, manifest_uri: str, already: int, summary: IngestSummary
) -> Iterator[dict[str, Any]]:
    """The manifest's rows after row index `already`, as item values (valid: pending with
    the validated row in params; invalid: failed as invalid_row with the reason)."""
    with _manifest(ctx, manifest_uri) as stream:
        for parsed in read_manifest(stream, detect_format(manifest_uri), adapters=ctx.adapters):
            summary.rows += 1
            if parsed.index <= already:
                summary.skipped += 1
                continue
            if parsed.row is None:
                summary.invalid += 1
            else:
                summary.valid += 1
            yield _item_values(parsed)


@contextmanager
def _manifest(ctx: StageContext, manifest_uri: str) -> Iterator[IO[bytes]]:
    """The manifest, streamed; missing or forbidden (access denied, a malformed URI) is the
    job's problem. Reads that fail half way are outages, raised as they are."""
    with ExitStack() as stack:
        try:
            stream = stack.enter_context(ctx.stores.for_uri(manifest_uri).open(manifest_uri))
        except (ObjectNotFound, ConfigError) as exc:
            raise _Unreadable(str(exc)) from exc
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
    ctx: StageContext, job_id: str, token: str, chunk: list[dict[str, Any]], send: Send
) -> None:
    """One transaction per chunk, under the job's lock and claim (renewed by it): a cancel
    that came first makes every row of the chunk a cancelled item; then the valid ones go to
    the embed stage."""
    with ctx.sessions.begin() as session:
        status = jobs.hold_ingest(
            session,
            job_id=job_id,
            token=token,
            lease_seconds=ctx.settings.lease_seconds,
            now=ctx.clock(),
        )
        if status is None:
            raise _ClaimLost()
        if status == JobStatus.CANCELLED:  # every row still gets its item, cancelled
            for values in chunk:
                if values["status"] == ItemStatus.PENDING:
                    values |= {"status": ItemStatus.CANCELLED, "error_message": "cancelled"}
        pending = bulk.add_items(session, job_id=job_id, rows=chunk, now=ctx.clock())
    for ids in chunked(pending, ctx.settings.generate_batch):
        send(EMBED, ids)
