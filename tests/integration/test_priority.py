"""Job priority over real workers: a small high-priority job submitted after a large one
overtakes its backlog (its messages carry a higher priority; RabbitMQ delivers those first)
and finishes first; without a priority it would wait for all of the large job."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa
from helpers.cluster import Cluster


def _rows(bucket: str, n: int, prefix: str) -> list[dict[str, Any]]:
    refs = ("red", "blue", "green")
    return [
        {"id": f"{prefix}-{i}", "reference": f"s3://{bucket}/refs/{refs[i % 3]}.png", "steps": 3}
        for i in range(n)
    ]


def test_a_small_high_priority_job_finishes_before_a_large_earlier_one(
    cluster: Cluster, reference_images: dict[str, Path]
) -> None:
    cluster.upload_references(reference_images)
    output = f"s3://{cluster.bucket}/out"
    large = cluster.submit("jobs/large.jsonl", _rows(cluster.bucket, 24, "large"), "out")
    small_manifest = cluster.put_manifest("jobs/small.jsonl", _rows(cluster.bucket, 2, "small"))
    small = cluster.cli("submit", small_manifest, "--output", output, "--priority", "high").strip()
    ended_small = cluster.wait_for_job(small, timeout=300)
    ended_large = cluster.wait_for_job(large, timeout=300)
    assert ended_small["status"] == ended_large["status"] == "succeeded"
    with cluster.engine.connect() as conn:
        jobs = conn.execute(sa.text("SELECT id, priority, finished_at FROM jobs")).all()
    priorities = {job_id: level for job_id, level, _ in jobs}
    finished = {job_id: at for job_id, _, at in jobs}
    assert priorities == {large: 1, small: 2}  # normal, high
    print(f"small finished {(finished[large] - finished[small]).total_seconds():.1f} s before")
    assert finished[small] < finished[large], "the high-priority job waited for the large one"
