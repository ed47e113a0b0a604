"""Thin Celery tasks: decode ids, call a stage, enqueue the next one. Nothing else.

The stage context (database engine, S3 client, models) is built on the first task a worker
process runs, never at import and never in the prefork parent.
"""

from __future__ import annotations

import functools
import logging

from kombu.exceptions import OperationalError as BrokerError
from sqlalchemy.exc import InterfaceError, OperationalError

from core.config import Settings
from core.errors import RetryableError
from workers import stages
from workers.celery_app import app
from workers.context import StageContext

log = logging.getLogger(__name__)
RETRY = {
    # S3 / network (RetryableError), the database or the broker going away (a message that
    # could not be sent); input errors never get here
    "autoretry_for": (RetryableError, OperationalError, InterfaceError, BrokerError),
    "retry_backoff": 2,
    "retry_backoff_max": 120,
    "retry_jitter": True,
    "max_retries": 8,
}


@functools.cache
def context() -> StageContext:
    return StageContext.create(Settings(), mode="distributed")


@app.task(name="ipbatch.ingest", **RETRY)
def ingest(job_id: str) -> None:
    summary = stages.ingest(context(), job_id=job_id, enqueue=send_embed)
    log.info("job %s ingested: %s", job_id, summary)


@app.task(name="ipbatch.embed", **RETRY)
def embed(item_ids: list[int]) -> None:
    summary = stages.embed(context(), item_ids=item_ids)
    for batch in stages.chunked(summary.ready, context().settings.generate_batch):
        generate.delay(batch)
    if summary.held:  # another worker's claim: if that worker died, take over when it lapses
        embed.apply_async((summary.held,), countdown=summary.retry_in + 1)


@app.task(name="ipbatch.generate", **RETRY)
def generate(item_ids: list[int]) -> None:
    summary = stages.generate(context(), item_ids=item_ids)
    if summary.held:
        generate.apply_async((summary.held,), countdown=summary.retry_in + 1)


def send_embed(item_ids: list[int]) -> None:
    for batch in stages.chunked(item_ids, context().settings.generate_batch):
        embed.delay(batch)


def send_generate(item_ids: list[int]) -> None:
    for batch in stages.chunked(item_ids, context().settings.generate_batch):
        generate.delay(batch)
