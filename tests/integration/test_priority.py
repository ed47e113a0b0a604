"""Priority and turns over real workers. The generate queue holds, in this order, a 24-row
job's 12 messages, a 2-row job's (same level) and a 2-row high-priority job's, before the
generate worker starts: the high job's message is delivered first (RabbitMQ delivers higher
priorities first) and the 2-row job of the same level gets the second turn of its level
(`items.next_turn`), instead of waiting behind all 12 (first in, first out)."""

from __future__ import annotations

import time
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


def test_high_priority_first_then_jobs_of_one_level_take_turns(
    make_cluster: Any, reference_images: dict[str, Path]
) -> None:
    cluster: Cluster = make_cluster()
    cluster.start_worker("embedder", "ingest,embed")
    cluster.upload_references(reference_images)
    output = f"s3://{cluster.bucket}/out"
    large = cluster.submit("jobs/large.jsonl", _rows(cluster.bucket, 24, "large"), "out")
    same_level = cluster.submit("jobs/medium.jsonl", _rows(cluster.bucket, 2, "medium"), "out")
    small_manifest = cluster.put_manifest("jobs/small.jsonl", _rows(cluster.bucket, 2, "small"))
    small = cluster.cli("submit", small_manifest, "--output", output, "--priority", "high").strip()
    deadline = time.monotonic() + 240
    while cluster.count("SELECT COUNT(*) FROM items WHERE status = 'ready'") < 28:
        assert time.monotonic() < deadline, f"not all embedded:\n{cluster.log_tail()}"
        time.sleep(0.5)
    cluster.start_worker("generator", "generate")
    for job_id in (small, same_level, large):
        assert cluster.wait_for_job(job_id, timeout=300)["status"] == "succeeded"
    with cluster.engine.connect() as conn:
        jobs = conn.execute(sa.text("SELECT id, priority, finished_at FROM jobs")).all()
    priorities = {job_id: level for job_id, level, _ in jobs}
    finished = {job_id: at for job_id, _, at in jobs}
    assert priorities == {large: 1, same_level: 1, small: 2}  # normal, normal, high
    print(
        f"small (high) finished {(finished[large] - finished[small]).total_seconds():.1f} s and"
        f" medium {(finished[large] - finished[same_level]).total_seconds():.1f} s before large"
    )
    assert finished[small] < finished[large], "the high-priority job waited for the large one"
    assert finished[small] < finished[same_level], "the high-priority job waited for its peer"
    assert finished[same_level] < finished[large], "the 2-row job waited for the whole 24-row one"
