"""Jobs made through the real stages, for tests that then drive one stage by hand."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from core.config import Settings
from storage.ledger import items
from storage.lifecycle import EMBED
from storage.migrate import upgrade
from workers.context import StageContext
from workers.stages import ingest, jobs
from workers.stages.common import no_send


def local_context(home: Path, models: Path, **settings: Any) -> StageContext:
    """A one-machine stage context (SQLite ledger under `home`, migrated); `clock=` and
    `worker=` go to the context, the rest to Settings. The caller closes it."""
    options = {k: settings.pop(k) for k in ("clock", "worker") if k in settings}
    config = Settings(home=home, models=str(models), **settings)
    upgrade(config.ledger_url())
    return StageContext.create(config, mode="local", **options)


def write_manifest(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def ingest_job(ctx: StageContext, *, manifest: Path, output: Path) -> tuple[str, list[int]]:
    """Register and ingest a job through the stages: (job id, its pending item ids)."""
    job_id, _ = jobs.register(ctx, manifest_uri=str(manifest), output_uri=str(output))
    ingest.run(ctx, job_id=job_id, send=no_send)
    with ctx.sessions.begin() as session:
        pending = items.all_ids(session, job_id=job_id, status=EMBED.waiting)
    return job_id, pending
