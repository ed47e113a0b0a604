"""A word when a job ends: `{output}/{job}/results.jsonl`, and its webhook called.

`after_end(ctx, job_ids)` runs where a job may just have ended (a stage's last items, a cancel,
the one-machine runner): for each job that has ended with nothing left in flight, the results
file is written (one JSON line per manifest row: id, status, error_code, message, outputs,
scores, seed, reused) and recorded, then its webhook, if it has one, gets the job's summary
(POST, JSON) once. It never raises: what could not be done now (S3 or the webhook away) the
reaper does on a later pass (`catch_up`), the webhook backing off between tries
(`storage.ledger.results`). The webhook URL may carry a token: only its host is ever logged.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

from core.errors import ConfigError, short
from core.uris import join_uri
from storage.ledger import jobs, results
from workers.context import StageContext

log = logging.getLogger(__name__)

RESULTS_FILE = "results.jsonl"
WEBHOOK_TIMEOUT = 10.0  # seconds for one POST


def check_webhook_url(url: str) -> str:
    """An http(s) URL, or ConfigError (said before the job is registered)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"the webhook must be an http:// or https:// URL, got {_shown(url)}")
    return url


def _shown(url: str) -> str:
    """The URL as logs show it: scheme and host, never its path or query (tokens live there)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or '?'}/..." if parts.scheme else "(not a URL)"


def after_end(ctx: StageContext, job_ids: Iterable[str]) -> None:
    """Results and webhook of the jobs that have ended with nothing in flight; never raises."""
    for job_id in sorted(set(job_ids)):
        try:
            if write_results(ctx, job_id):
                notify(ctx, job_id)
        except Exception as exc:  # the reaper's next pass does it
            log.warning(
                "job %s: results or webhook not done yet (%s); the reaper tries again",
                job_id,
                short(exc),
                extra={"job_id": job_id},
            )


def write_results(ctx: StageContext, job_id: str) -> bool:
    """Write the job's results.jsonl if it has ended with nothing in flight (once); whether
    its results are written now."""
    with ctx.sessions.begin() as session:
        job = jobs.get(session, job_id=job_id)
        if job is None or not results.settled(session, job_id=job_id):
            return False
        if job.results_uri is not None:
            return True
        uri = join_uri(job.output_uri, job_id, RESULTS_FILE)
        data = b"".join(
            json.dumps(row, sort_keys=True).encode() + b"\n"
            for row in results.rows(session, job_id=job_id)
        )
    ctx.stores.for_uri(uri).put(uri, data, content_type="application/x-ndjson")
    with ctx.sessions.begin() as session:
        results.record_results(session, job_id=job_id, uri=uri)
    log.info("job %s: results at %s", job_id, uri, extra={"job_id": job_id})
    return True


def notify(ctx: StageContext, job_id: str) -> bool | None:
    """POST the job's summary to its webhook if one is due now; True if it answered 2xx,
    False if not (counted, tried again later), None if nothing was due."""
    now = ctx.clock()
    with ctx.sessions.begin() as session:
        job = jobs.get(session, job_id=job_id)
        if job is None or not results.webhook_due(session, job_id=job_id, now=now):
            return None
        url, body = str(job.webhook_url), results.summary(session, job_id=job_id)
    answered, why = post(url, body)
    with ctx.sessions.begin() as session:
        if answered:
            results.webhook_answered(session, job_id=job_id, now=ctx.clock())
            log.info("job %s: webhook %s told", job_id, _shown(url), extra={"job_id": job_id})
            return True
        tries = results.webhook_failed(session, job_id=job_id, now=ctx.clock())
    log.warning(
        "job %s: webhook %s did not take the summary (%s); try %d of %d",
        job_id,
        _shown(url),
        why,
        tries,
        results.WEBHOOK_TRIES,
        extra={"job_id": job_id},
    )
    return False


def post(url: str, body: dict[str, Any], timeout: float = WEBHOOK_TIMEOUT) -> tuple[bool, str]:
    """One POST of `body` as JSON: (answered 2xx, what happened otherwise)."""
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "User-Agent": "ipbatch"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return 200 <= answer.status < 300, f"HTTP {answer.status}"
    except urllib.error.HTTPError as exc:
        return False, f"HTTP {exc.code}"
    except (OSError, ValueError) as exc:  # refused, unreachable, timed out
        return False, type(exc).__name__


def catch_up(ctx: StageContext, *, limit: int = 20) -> int:
    """The reaper's pass: results of ended jobs not written yet, webhooks due again.
    Returns how many jobs were looked at."""
    with ctx.sessions.begin() as session:
        pending = results.without_results(session, limit=limit)
        due = results.due_webhooks(session, now=ctx.clock(), limit=limit)
    after_end(ctx, pending)
    for job_id in due:
        try:
            notify(ctx, job_id)
        except Exception as exc:
            log.warning("job %s: webhook not tried (%s)", job_id, short(exc))
    return len(pending) + len(due)
