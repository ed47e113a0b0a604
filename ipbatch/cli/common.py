"""What the command groups share: settings from options, printing a job's summary and a
verification, logging for the long-running commands, the report page."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.config import Settings, redact_url
from ipbatch.exits import job_exit

if TYPE_CHECKING:
    from workers.context import StageContext

log = logging.getLogger("ipbatch")


def settings_from(args: argparse.Namespace) -> Settings:
    """The settings, with the options that override them (`--models`, `--no-score`)."""
    overrides: dict[str, Any] = {}
    if getattr(args, "models", None):
        overrides["models"] = args.models
    if getattr(args, "no_score", False):
        overrides["score"] = False
    return Settings(**overrides)


@contextmanager
def stage_context(settings: Settings) -> Iterator[StageContext]:
    """A context on the ledger the settings name (one-machine mode without
    IPBATCH_DATABASE_URL), closed after the block."""
    from workers.context import StageContext

    local = settings.database_url is None
    ctx = StageContext.create(settings, mode="local" if local else "distributed")
    try:
        yield ctx
    finally:
        ctx.close()


def print_summary(summary: Any) -> int:
    """A run's outcome, and its exit code (`job_exit`)."""
    total = sum(summary.counts.values())
    print(f"job {summary.job_id}: {summary.status}")
    if summary.error:
        print(f"  {summary.error}")
    print(
        "items: "
        + ", ".join(f"{k} {v}" for k, v in sorted(summary.counts.items()))
        + f" (of {total})"
    )
    per_item = summary.seconds / total if total else 0.0
    print(
        f"images this run: {summary.images} in {summary.seconds:.1f} s ({per_item:.2f} s per item)"
        + (f"; the job's made before and copied: {summary.reused}" if summary.reused else "")
    )
    for row_id, code, message in summary.failures:
        print(f"  failed {row_id or '(no id)'}: {code}: {message}")
    failed = summary.counts.get("failed", 0)
    if failed > len(summary.failures):
        print(f"  ... and {failed - len(summary.failures)} more: `ipbatch status {summary.job_id}`")
    print(f"images:   {summary.output_uri}")
    print(f"database: {redact_url(summary.database)}")
    return job_exit(str(summary.status))


def print_verified(verified: Any, *, limit: int = 20) -> int:
    """`verify`'s findings; 0 if every output is whole, 1 otherwise."""
    how = "size, sha256, decoding" if verified.deep else "exists, size"
    print(f"verify {verified.job_id}: {verified.checked} outputs checked ({how}): ", end="")
    print(f"{len(verified.problems)} problems" if verified.problems else "all whole")
    for p in verified.problems[:limit]:
        print(f"  {p.row_id}: {p.uri}: {p.what}")
    if len(verified.problems) > limit:
        print(f"  ... and {len(verified.problems) - limit} more (--json lists them all)")
    return 1 if verified.problems else 0


def configure_logging(fmt: str, level: str | None = None) -> None:
    """IPBATCH_LOG_FORMAT for the long-running commands (worker, producer, reaper)."""
    root = logging.getLogger()
    if level is not None:
        root.setLevel(level.upper())
    if fmt == "json":
        from workers.metrics import JsonFormatter

        for handler in root.handlers:
            handler.setFormatter(JsonFormatter())


def write_report(settings: Settings, job_id: str | None, path: Path, *, limit: int) -> str:
    """The job's report page at `path` (job None: the most recently started job); returns
    what to say about it."""
    from ipbatch.report import Thumbnails, render
    from storage.ledger.db import make_engine
    from storage.objectstore import ObjectStores

    engine = make_engine(settings.ledger_url())
    stores = ObjectStores(s3_endpoint_url=settings.s3_endpoint_url, s3_region=settings.s3_region)
    try:
        if job_id is None:
            from ipbatch import status

            latest = status.collect(engine, limit=1)
            if not latest:
                raise LookupError("no jobs yet")
            job_id = latest[0]["job_id"]
        thumbnails = Thumbnails(stores, settings.max_image_pixels, settings.max_reference_bytes)
        page = render(engine, thumbnails, job_id=job_id, limit=limit)
    finally:
        engine.dispose()
    path.write_text(page, encoding="utf-8")
    return f"{path}: {len(page) / 1024:.0f} KiB"
