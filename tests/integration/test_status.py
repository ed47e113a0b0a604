"""`ipbatch status`'s numbers: stages, rate and ETA of a running job, on both dialects."""

from __future__ import annotations

from datetime import timedelta

import pytest
import sqlalchemy as sa

from core.clock import utcnow
from ipbatch import status
from storage.ledger import bulk, db, items, job_claims, jobs
from storage.lifecycle import INGEST
from storage.models import ItemStatus, Job


def test_rate_and_eta_of_a_running_job(ledger_engine: sa.Engine) -> None:
    sessions = db.make_sessions(ledger_engine)
    now = utcnow()
    with sessions.begin() as s:
        job_id, _ = jobs.create(
            s, name="night", manifest_uri="m", manifest_sha256="f" * 64, output_uri="/o", now=now
        )
        job_claims.claim(s, job_id=job_id, stage=INGEST, worker="w", lease_seconds=60, now=now)
        s.execute(
            sa.update(Job)
            .where(Job.id == job_id)
            .values(started_at=utcnow() - timedelta(seconds=100))
        )
        rows = [
            {"row_id": f"r{i}", "row_index": i, "status": ItemStatus.PENDING, "params": {}}
            for i in range(10)
        ]
        ids = bulk.add_items(s, job_id=job_id, rows=rows, now=now)
    steps = [
        (ItemStatus.PENDING, ItemStatus.EMBEDDING),
        (ItemStatus.EMBEDDING, ItemStatus.READY),
        (ItemStatus.READY, ItemStatus.RUNNING),
        (ItemStatus.RUNNING, ItemStatus.SUCCEEDED),
    ]
    with sessions.begin() as s:
        for (a, b), upto in zip(steps, (9, 7, 5, 4), strict=True):
            items.transition(s, item_ids=ids[:upto], from_status=a, to_status=b, now=now)
        items.transition(
            s,
            item_ids=ids[9:],
            from_status=ItemStatus.PENDING,
            to_status=ItemStatus.FAILED,
            now=now,
            error_code="no_face",
            message="no face",
        )
    [job] = status.collect(ledger_engine, job_id=job_id)
    assert job["stages"] == {
        "pending": 0,
        "embedding": 2,
        "ready": 2,
        "running": 1,
        "succeeded": 4,
        "failed": 1,
        "cancelled": 0,
    }
    assert job["failures"] == {"no_face": 1}
    assert 0.039 < job["items_per_second"] < 0.041  # 4 items in 100 s
    left = 10 - 4 - 1
    assert job["eta_seconds"] == pytest.approx(left / job["items_per_second"], abs=1)
    assert job["percent_done"] == 50.0
    assert "eta" in status.bars(job) and "1 x no_face" in status.table([job])
    assert [j["job_id"] for j in status.collect(ledger_engine)] == [job_id]
