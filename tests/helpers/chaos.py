"""A chaos run over a real deployment: jobs flow through real worker processes while, at
seeded random moments, worker pool processes and whole workers are killed (SIGKILL), workers
are paused past their lease (SIGSTOP ... SIGCONT), the database's connections are cut and the
S3 server goes away for a few seconds. Then it checks what ipbatch promises:

- every row ended in exactly one terminal status (here: succeeded; every row is valid);
- the `outputs` rows are exactly the stored objects, keys and checksums, and `ipbatch verify
  --deep` finds every recorded output whole (no cut-off upload was recorded);
- one `embeddings` row and one object per key, and no embedding computed once it was
  recorded (the cache never bypassed); computations lost to a fault are counted.

The same seed gives the same plan of faults (what, when, to whom), so a failure can be
replayed: `IPBATCH_CHAOS_SEED=N pytest tests/integration/test_chaos.py`, or
`bench/chaos.py --seed N`. Used by
tests/integration/test_chaos.py (small) and bench/chaos.py (large).
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from helpers.cluster import Cluster, FlakyS3
from helpers.services import terminate_connections

FAULTS = ("kill_pool", "kill_worker", "pause_worker", "cut_database", "s3_outage", "cut_upload")
WORKERS = {"w1": "ingest,embed,generate", "w2": "ingest,embed,generate", "gen": "generate"}
REFERENCES = ("red", "blue", "green")


@dataclass
class Plan:
    seed: int
    jobs: int = 2
    rows: int = 20  # per job
    steps: int = 4
    faults_for: float = 60.0  # seconds during which faults happen (each kind once, first)
    gap: tuple[float, float] = (2.0, 5.0)  # seconds between two faults
    lease: int = 6
    finish_within: float = 300.0  # after the faults


@dataclass
class Report:
    seed: int
    faults: list[tuple[float, str, str]] = field(default_factory=list)  # (t, fault, target)
    jobs: list[str] = field(default_factory=list)
    items: int = 0
    images: int = 0
    seconds: float = 0.0
    recomputed: int = 0  # computations whose result a fault lost (computed again later)
    reclaims: int = 0  # items taken over after a lease ran out (re-claimed, or by the reaper)
    releases: int = 0  # items given back (outages)
    fenced: int = 0  # writes refused to workers that lost their claim
    cut_uploads: int = 0  # objects left by cut-off uploads (each replaced by its image)

    def summary(self) -> str:
        counts = Counter(f for _, f, _ in self.faults)
        return (
            f"seed {self.seed}: {len(self.faults)} faults {dict(counts)}; {len(self.jobs)} jobs, "
            f"{self.items} items, {self.images} images in {self.seconds:.0f} s; re-claims "
            f"{self.reclaims}, releases {self.releases}, embeddings computed again "
            f"{self.recomputed}, cut-off uploads replaced {self.cut_uploads}"
        )


def settings(plan: Plan, flaky: FlakyS3) -> dict[str, str]:
    return {
        "IPBATCH_S3_ENDPOINT_URL": flaky.endpoint,
        "IPBATCH_LEASE_SECONDS": str(plan.lease),
        "IPBATCH_GENERATE_BATCH": "4",
        "IPBATCH_EMBED_BATCH": "4",
        "IPBATCH_BATCH_IMAGES": "4",
        "IPBATCH_REQUEUE_AFTER": "15",
        "IPBATCH_BACKOFF_MAX": "4",
        # kills can hit an item's batch a few times: the cap on deliveries is not under test
        "IPBATCH_MAX_DELIVERIES": "50",
    }


def run(
    cluster: Cluster,
    flaky: FlakyS3,
    plan: Plan,
    references: dict[str, Path],
    database_url: str,
) -> Report:
    rng = random.Random(plan.seed)
    report = Report(plan.seed)
    began = time.monotonic()
    for name, queues in WORKERS.items():
        cluster.start_worker(name, queues)
    cluster.start("reaper", "reaper", "--every", "2")
    cluster.upload_references(references)
    for j in range(plan.jobs):
        rows = [
            {
                "id": f"j{j}-r{i}",
                "prompt": f"product {i} of job {j}",
                "reference": f"s3://{cluster.bucket}/refs/{REFERENCES[(i + j) % 3]}.png",
                "steps": plan.steps,
                "num_images": 1 + (i % 3 == 0),
            }
            for i in range(plan.rows)
        ]
        report.jobs.append(cluster.submit(f"chaos/job-{j}.jsonl", rows, "chaos"))
    # the faults, at seeded moments, once generation has begun
    cluster.wait_until(report.jobs[0], lambda p: p["running"] > 0, deadline=time.monotonic() + 120)
    started = time.monotonic()
    # every kind of fault once, in a seeded order (a cut-off upload first, while items wait),
    # then seeded random ones while the time lasts
    first = ["cut_upload", *rng.sample([f for f in FAULTS if f != "cut_upload"], len(FAULTS) - 1)]
    while time.monotonic() - started < plan.faults_for and not _all_ended(cluster, report.jobs):
        time.sleep(rng.uniform(*plan.gap))
        fault = first.pop(0) if first else rng.choice(FAULTS)
        target = _inflict(cluster, flaky, fault, rng, plan, database_url, report)
        if fault == "cut_upload" and not report.cut_uploads:  # every item stored meanwhile
            first.insert(0, "cut_upload")  # tried again after the next gap
        report.faults.append((round(time.monotonic() - started, 1), fault, target))
    # everything back, then every job must finish
    for job_id in report.jobs:
        progress = cluster.wait_for_job(job_id, timeout=plan.finish_within)
        assert progress["status"] == "succeeded", (report.summary(), cluster.not_succeeded(job_id))
    report.seconds = time.monotonic() - began
    _check(cluster, report)
    return report


def _all_ended(cluster: Cluster, jobs: list[str]) -> bool:
    ended = ("succeeded", "partial", "failed")
    return all(cluster.progress(j).get("status") in ended for j in jobs)


def _busy(cluster: Cluster) -> str:
    """The worker that claimed items last (faults that hit work in flight test more)."""
    with cluster.engine.connect() as conn:
        last = conn.execute(
            sa.text(
                "SELECT worker FROM item_events WHERE to_status IN ('embedding', 'running')"
                " ORDER BY id DESC LIMIT 1"
            )
        ).scalar()
    name = str(last).split("@", 1)[0] if last else ""  # events name the worker's --hostname
    return name if name in WORKERS else sorted(WORKERS)[0]


def _inflict(
    cluster: Cluster,
    flaky: FlakyS3,
    fault: str,
    rng: random.Random,
    plan: Plan,
    database_url: str,
    report: Report,
) -> str:
    name = _busy(cluster) if rng.random() < 0.7 else rng.choice(sorted(WORKERS))
    if fault == "kill_pool":  # the process running a stage dies; Celery starts another
        pool = cluster.pool(name)
        for pid in pool:
            os.kill(pid, signal.SIGKILL)
        return name
    if fault == "kill_worker":  # the whole worker (a machine lost), started again
        os.killpg(cluster.processes[name].pid, signal.SIGKILL)
        cluster.processes[name].wait()
        cluster.start_worker(name, WORKERS[name])
        return name
    if fault == "pause_worker":  # a long GC pause, a stopped VM: longer than its lease
        pause = rng.uniform(plan.lease + 2, plan.lease + 8)
        os.killpg(cluster.processes[name].pid, signal.SIGSTOP)
        time.sleep(pause)
        os.killpg(cluster.processes[name].pid, signal.SIGCONT)
        return f"{name} for {pause:.0f} s"
    if fault == "cut_database":
        return f"{terminate_connections(database_url)} connections"
    if fault == "cut_upload":
        return _cut_uploads(cluster, rng, report)
    outage = rng.uniform(2, 6)
    flaky.outage(outage)
    return f"{outage:.0f} s"


def _cut_uploads(cluster: Cluster, rng: random.Random, report: Report) -> str:
    """What killed uploads leave on a server that keeps what it received: the first image of
    up to three items not yet stored becomes a 0-byte or truncated object. Created only where
    no object is (If-None-Match), as an upload that was cut off would have: a stored image is
    never overwritten behind the workers' backs."""
    from botocore.exceptions import ClientError

    with cluster.engine.connect() as conn:
        waiting = conn.execute(
            sa.text(
                "SELECT job_id, row_id, status FROM items WHERE job_id = ANY(:j)"
                " AND status IN ('ready', 'running') ORDER BY id"
            ),
            {"j": report.jobs},
        ).all()
    # items not yet claimed by a generate worker first: a running one may be stored already
    ready = [(j, r) for j, r, status in waiting if status == "ready"]
    running = [(j, r) for j, r, status in waiting if status == "running"]
    picked = rng.sample(ready, min(3, len(ready)))
    picked += rng.sample(running, min(3 - len(picked), len(running)))
    cut = 0
    for job_id, row_id in picked:
        body = b"" if rng.random() < 0.5 else b"\x89PNG\r\n\x1a\n" + rng.randbytes(200)
        try:
            cluster.s3.put_object(
                Bucket=cluster.bucket,
                Key=f"chaos/{job_id}/{row_id}/0.png",
                Body=body,
                IfNoneMatch="*",
            )
            cut += 1
        except ClientError:  # stored meanwhile: nothing to cut off
            pass
    report.cut_uploads += cut
    return f"{cut} uploads"


def _check(cluster: Cluster, report: Report) -> None:
    with cluster.engine.connect() as conn:
        statuses = conn.execute(
            sa.text("SELECT status, COUNT(*) FROM items WHERE job_id = ANY(:j) GROUP BY status"),
            {"j": report.jobs},
        ).all()
        report.items = sum(n for _, n in statuses)
        assert dict(statuses) == {"succeeded": report.items}, statuses
        asked = dict(
            conn.execute(
                sa.text(
                    "SELECT job_id, SUM(CAST(params->>'num_images' AS INTEGER)) FROM items"
                    " WHERE job_id = ANY(:j) GROUP BY job_id"
                ),
                {"j": report.jobs},
            ).all()
        )
        events = conn.execute(
            sa.text(
                "SELECT e.from_status, e.to_status, e.message FROM item_events e JOIN items i"
                " ON i.id = e.item_id WHERE i.job_id = ANY(:j)"
            ),
            {"j": report.jobs},
        ).all()
        keys = conn.execute(
            sa.text("SELECT content_sha256, encoder, kind, uri, created_at FROM embeddings")
        ).all()
    for job_id in report.jobs:
        cluster.assert_one_set_of_outputs(job_id, prefix="chaos", asked=int(asked[job_id]))
        found = json.loads(cluster.cli("verify", job_id, "--deep", "--json"))
        assert (found["checked"], found["problems"]) == (int(asked[job_id]), []), found
    report.images = sum(int(n) for n in asked.values())
    report.reclaims = sum(
        1 for f, t, m in events if m and ("re-claimed" in m or m.startswith("lease expired"))
    )
    report.releases = sum(1 for _, _, m in events if m and m.startswith("retrying:"))
    # the cache: one row and one object per key; nothing computed once it was recorded
    recorded = {f"{sha}/{enc}/{kind}": created for sha, enc, kind, _uri, created in keys}
    assert len(recorded) == len(keys)
    for _sha, _enc, _kind, uri, _created in keys:
        cluster.s3.head_object(
            Bucket=cluster.bucket, Key=uri.removeprefix(f"s3://{cluster.bucket}/")
        )
    computations = _computations(cluster)
    for key, when, _worker in computations:
        assert key in recorded, key
        assert when <= recorded[key], f"{key} computed at {when}, after it was recorded"
    per_key = Counter(key for key, _, _ in computations)
    report.recomputed = sum(n - 1 for n in per_key.values())


def _computations(cluster: Cluster) -> list[tuple[str, datetime, str]]:
    """(key, when, worker) of every embedding computation the workers logged."""
    found = []
    for path in cluster.logs.values():
        for line in path.read_text().splitlines():
            try:
                entry: dict[str, Any] = json.loads(line)
            except ValueError:
                continue
            if entry.get("key") and str(entry.get("message", "")).startswith("computing"):
                found.append(
                    (entry["key"], datetime.fromisoformat(entry["time"]), entry.get("worker", ""))
                )
    return found
